"""Per-scan HDF5 results and the per-run JSON summary.

Layout of ``<output_dir>/<run_id>/scan_NNNN.h5`` (also in README.md, "Results files"):

- ``/images``  (n_det, scan_y, scan_x) float64, virtual detector images (counts);
  attrs ``axes``, ``units``.
- ``/valid``   (scan_y, scan_x) bool, positions that were filled.
- ``/layout/names``, ``/layout/roles`` (n_det,) strings; ``/layout/centroids_mrad``
  (n_det, 2) (theta_x, theta_y) in mrad; ``/layout/weights`` (n_det, det_y, det_x) or
  (n_det, n_segments) float32; attrs ``disc_center_px`` (row, col), ``disc_radius_px``.
- ``/calibration`` group: one attribute per Calibration field (units in the name).
- root attrs: ``run_id``, ``scan``, ``complete``, ``frames``, ``duplicates``, ``gaps``,
  ``positions_filled``, ``positions_missing``, ``started``, ``finished`` (s since epoch),
  ``livestereo_version``, ``start_metadata`` (JSON).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import h5py
import numpy as np

from livestereo import __version__
from livestereo.daemon.products import LayoutInfo, ScanImages
from livestereo.daemon.scan_template import ScanTemplate, TemplateCache
from livestereo.protocol.messages import Calibration


def safe_name(run_id: str) -> str:
    """A run id made safe for a folder name."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return keep.strip(".") or "run"


def scan_path(output_dir: Path, run_id: str, scan: int) -> Path:
    return Path(output_dir) / safe_name(run_id) / f"scan_{scan:04d}.h5"


def _scan_values(result: ScanImages) -> dict[str, object]:
    """The root attributes that change from scan to scan of a run, in file order."""
    return {"scan": result.scan, "complete": result.complete,
            **{k: v for k, v in result.stats.items() if v is not None}}


def _fill_scan(f: h5py.File, result: ScanImages, values: dict, images: np.ndarray, valid: np.ndarray) -> None:
    """A scan file's whole content: ``result``'s run-level parts with these per-scan values."""
    f.attrs["livestereo_version"] = __version__
    f.attrs["run_id"] = result.run_id
    for k, v in values.items():
        f.attrs[k] = v
    f.attrs["start_metadata"] = json.dumps(result.start_metadata, default=str)
    d = f.create_dataset("images", data=images)
    d.attrs["axes"] = "detector, scan_y, scan_x"
    d.attrs["units"] = "counts"
    f.create_dataset("valid", data=valid)
    _copy_run_groups(f, result.layout, result.calibration)


#: byte templates of recent runs' scan files (livestereo.daemon.scan_template)
_SCAN_TEMPLATES = TemplateCache()


def write_scan(result: ScanImages, path: Path) -> Path:
    """Write one scan's virtual images (atomically: a temporary file renamed into place).

    From the run's byte template where one could be built (the same file, ~10x cheaper and
    almost without the GIL), otherwise through h5py."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".h5.part")
    values = _scan_values(result)
    images, valid = np.asarray(result.images), np.asarray(result.valid, dtype=bool)  # /valid is documented bool
    key = (result.run_id, json.dumps(result.start_metadata, default=str), images.shape, images.dtype.str,
           valid.shape, tuple((k, np.asarray(v).dtype.str) for k, v in values.items()))
    template = _SCAN_TEMPLATES.get(
        (result.layout, result.calibration), key,
        lambda: ScanTemplate.build(lambda f, v, i, m: _fill_scan(f, result, v, i, m), values, images, valid))
    if template is not None:
        with open(tmp, "wb") as fh:
            for part in template.render(values, images, valid):
                fh.write(part)
    else:
        with h5py.File(tmp, "w", libver="earliest") as f:
            _fill_scan(f, result, values, images, valid)
    os.replace(tmp, path)
    return path


def write_layout(g: h5py.Group, layout: LayoutInfo) -> None:
    g.create_dataset("names", data=np.array(layout.names, dtype=h5py.string_dtype()))
    g.create_dataset("roles", data=np.array(layout.roles, dtype=h5py.string_dtype()))
    c = g.create_dataset("centroids_mrad", data=layout.centroids_mrad)
    c.attrs["axes"] = "detector, (theta_x, theta_y)"
    w = np.ascontiguousarray(layout.weights)  # gzip + shuffle, one chunk per detector
    g.create_dataset("weights", data=w, chunks=(1, *w.shape[1:]), compression="gzip", shuffle=True)
    if layout.disc_center_px is not None:
        g.attrs["disc_center_px"] = np.asarray(layout.disc_center_px, dtype=np.float64)
    if layout.disc_radius_px is not None:
        g.attrs["disc_radius_px"] = float(layout.disc_radius_px)


#: in-memory HDF5 files holding the ``layout`` and ``calibration`` groups of recent runs:
#: every scan of a run writes the same ones, and building them again (compressing the
#: weights, ~25 objects and attributes through h5py) cost more than the rest of a scan file;
#: each scan copies them in two calls instead (the same objects, bit for bit). Keyed by the
#: run's own LayoutInfo and Calibration objects, which every scan of a run shares (held
#: here, so their ids cannot be reused by other objects).
_TEMPLATES: list[tuple[LayoutInfo, Calibration, h5py.File]] = []
_TEMPLATES_SIZE = 4
_TEMPLATES_LOCK = threading.Lock()


def _copy_run_groups(f: h5py.File, layout: LayoutInfo, cal: Calibration) -> None:
    """``/layout`` and ``/calibration`` into ``f``, from the run's template."""
    with _TEMPLATES_LOCK:
        template = next((t for lay, c, t in _TEMPLATES if lay is layout and c is cal), None)
        if template is None:
            template = h5py.File(f"livestereo-template-{id(layout)}-{id(cal)}", "w", driver="core", backing_store=False)
            write_layout(template.create_group("layout"), layout)
            write_calibration(template.create_group("calibration"), cal)
            _TEMPLATES.append((layout, cal, template))
            while len(_TEMPLATES) > _TEMPLATES_SIZE:
                _TEMPLATES.pop(0)[2].close()
        template.copy(template["layout"], f, "layout")
        template.copy(template["calibration"], f, "calibration")


def write_calibration(g: h5py.Group, cal: Calibration) -> None:
    for key, value in cal.model_dump().items():
        if value is not None:
            g.attrs[key] = np.asarray(value, dtype=np.float64)


def read_scan(path: str | Path) -> dict:
    """Read a scan file back into plain arrays (for tests and tools)."""
    with h5py.File(path, "r") as f:
        out = {k: v for k, v in f.attrs.items()}
        out["images"] = f["images"][()]
        out["valid"] = f["valid"][()]
        out["names"] = [n.decode() if isinstance(n, bytes) else n for n in f["layout/names"][()]]
        out["centroids_mrad"] = f["layout/centroids_mrad"][()]
        out["calibration"] = {k: v for k, v in f["calibration"].attrs.items()}
    return out


def write_run_summary(output_dir: Path, summary: dict) -> Path:
    path = Path(output_dir) / safe_name(summary["run_id"]) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path
