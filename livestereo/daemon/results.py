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
import xxhash

from livestereo import __version__
from livestereo.daemon.products import LayoutInfo, ScanImages
from livestereo.protocol.messages import Calibration


def safe_name(run_id: str) -> str:
    """A run id made safe for a folder name."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return keep.strip(".") or "run"


def scan_path(output_dir: Path, run_id: str, scan: int) -> Path:
    return Path(output_dir) / safe_name(run_id) / f"scan_{scan:04d}.h5"


def write_scan(result: ScanImages, path: Path) -> Path:
    """Write one scan's virtual images (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".h5.part")
    with h5py.File(tmp, "w") as f:
        f.attrs["livestereo_version"] = __version__
        f.attrs["run_id"] = result.run_id
        f.attrs["scan"] = result.scan
        f.attrs["complete"] = result.complete
        for k, v in result.stats.items():
            if v is not None:
                f.attrs[k] = v
        f.attrs["start_metadata"] = json.dumps(result.start_metadata, default=str)
        d = f.create_dataset("images", data=result.images, chunks=True)
        d.attrs["axes"] = "detector, scan_y, scan_x"
        d.attrs["units"] = "counts"
        f.create_dataset("valid", data=result.valid)
        write_layout(f.create_group("layout"), result.layout)
        write_calibration(f.create_group("calibration"), result.calibration)
    os.replace(tmp, path)
    return path


def write_layout(g: h5py.Group, layout: LayoutInfo) -> None:
    g.create_dataset("names", data=np.array(layout.names, dtype=h5py.string_dtype()))
    g.create_dataset("roles", data=np.array(layout.roles, dtype=h5py.string_dtype()))
    c = g.create_dataset("centroids_mrad", data=layout.centroids_mrad)
    c.attrs["axes"] = "detector, (theta_x, theta_y)"
    _write_weights(g, layout.weights)
    if layout.disc_center_px is not None:
        g.attrs["disc_center_px"] = np.asarray(layout.disc_center_px, dtype=np.float64)
    if layout.disc_radius_px is not None:
        g.attrs["disc_radius_px"] = float(layout.disc_radius_px)


#: compressed chunks of recently written layout weights: every scan of a run writes the same
#: weights, and compressing them again cost ~8 ms per scan file (a 1024-position scan of
#: 256x256 frames takes ~50 ms to acquire at 20 k frames/s)
_WEIGHT_CHUNKS: dict[tuple, list[tuple[tuple[int, ...], int, bytes]]] = {}
_WEIGHT_CHUNKS_SIZE = 4
_WEIGHT_CHUNKS_LOCK = threading.Lock()


def _write_weights(g: h5py.Group, weights: np.ndarray) -> None:
    """``/layout/weights``: gzip + shuffle, one chunk per detector. The compressed chunks of
    weights seen recently are copied as they are (HDF5's direct chunk write) instead of being
    compressed again; the dataset is the same either way."""
    w = np.ascontiguousarray(weights)
    chunks = (1, *w.shape[1:])
    ds = g.create_dataset("weights", shape=w.shape, dtype=w.dtype, chunks=chunks, compression="gzip", shuffle=True)
    key = (w.shape, w.dtype.str, xxhash.xxh3_128_intdigest(w))
    with _WEIGHT_CHUNKS_LOCK:
        cached = _WEIGHT_CHUNKS.get(key)
    if cached is not None:
        for offset, filter_mask, data in cached:
            ds.id.write_direct_chunk(offset, data, filter_mask)
        return
    ds[...] = w
    ds.flush()
    cached = []
    for d in range(w.shape[0]):
        offset = (d,) + (0,) * (w.ndim - 1)
        filter_mask, data = ds.id.read_direct_chunk(offset)
        cached.append((offset, filter_mask, bytes(data)))
    with _WEIGHT_CHUNKS_LOCK:
        _WEIGHT_CHUNKS[key] = cached
        while len(_WEIGHT_CHUNKS) > _WEIGHT_CHUNKS_SIZE:
            del _WEIGHT_CHUNKS[next(iter(_WEIGHT_CHUNKS))]


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
