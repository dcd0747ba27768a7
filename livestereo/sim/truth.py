"""Ground truth of a simulated scan: 3D curves, height map, line masks, stereo disparity.

All maps are on the scan grid (ny, nx) = (row, col), position (row, col) at (x, y) = (col p, row p)
nm, with the scan's drift applied and the scan jitter ignored. HDF5 layout (:func:`write_truth`):

- ``/`` attrs: format, units, simulator metadata (material, thickness_nm, zone_axis, seed, ...)
  and ``sim_config`` (the SimConfig as JSON);
- ``/calibration`` attrs: the start message's calibration (None fields left out);
- ``/scan_NNNN`` attrs: scan, stereo_thetas_mrad (2, 2), drift_offset_nm (2,);
  ``curves/<id>`` (n, 3) float64 points x, y, z (nm; attrs kind, closed, glide_plane_normal,
  glide_plane_hkl, velocity_nm_per_scan); ``height_nm`` (ny, nx) float32 dz = z - focus (nm,
  NaN off the lines); ``line_mask`` (2, ny, nx) uint8 for views A and B; ``disparity_px``
  (ny, nx, 2) float32 (d_x, d_y) position in A minus position in B (px, NaN off the lines of A).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from livestereo.sim.render import disparity_map, height_map, line_masks
from livestereo.sim.scene import Scene

TRUTH_FORMAT = "livestereo-sim-truth/1"


def scene_truth(scene: Scene, scan_shape: tuple[int, int], scan_step_nm: float, stereo_thetas_mrad: np.ndarray,
                width_px: float = 1.0) -> dict[str, Any]:
    """Truth maps of ``scene`` for the stereo pair ``stereo_thetas_mrad`` (2, 2) (mrad): A, B."""
    th = np.asarray(stereo_thetas_mrad, dtype=np.float64).reshape(2, 2)
    return {
        "ids": [d.id for d in scene.dislocations],
        "kinds": [d.kind for d in scene.dislocations],
        "curves": [np.asarray(d.points_nm, dtype=np.float64) for d in scene.dislocations],
        "closed": [bool(d.closed) for d in scene.dislocations],
        "glide_plane_normals": [np.asarray(d.glide_plane_normal, dtype=np.float64) for d in scene.dislocations],
        "glide_plane_hkl": [tuple(d.glide_plane_hkl) for d in scene.dislocations],
        "velocities_nm_per_scan": [float(d.velocity_nm_per_scan) for d in scene.dislocations],
        "height_nm": height_map(scene, scan_shape, scan_step_nm, width_px),
        "line_mask": line_masks(scene, th, scan_shape, scan_step_nm, width_px),
        "disparity_px": disparity_map(scene, th[0], th[1], scan_shape, scan_step_nm, width_px),
        "stereo_thetas_mrad": th,
        "drift_offset_nm": np.asarray(scene.offset_nm, dtype=np.float64).copy(),
        "focus_nm": float(scene.focus_nm),
        "thickness_nm": float(scene.thickness_nm),
    }


def _attr(value: Any) -> Any:
    """An HDF5-storable attribute value (None -> omitted by the caller)."""
    if isinstance(value, (list, tuple)):
        arr = np.asarray(value)
        if arr.dtype == object:
            return json.dumps(value)
        return arr
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def write_truth(path: str | Path, truths: Iterable[dict[str, Any]], calibration: dict[str, Any],
                metadata: dict[str, Any]) -> None:
    """Write truth dicts (from ``Simulator.truth``) to an HDF5 file (layout in the module docstring)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["format"] = TRUTH_FORMAT
        f.attrs["units"] = "lengths nm, angles mrad, disparities px; images (row, col) = (y, x)"
        for k, v in metadata.items():
            if v is not None:
                f.attrs[k] = _attr(v)
        cal = f.create_group("calibration")
        for k, v in calibration.items():
            if v is not None:
                cal.attrs[k] = _attr(v)
        for t in truths:
            g = f.create_group(f"scan_{int(t['scan']):04d}")
            g.attrs["scan"] = int(t["scan"])
            g.attrs["stereo_thetas_mrad"] = np.asarray(t["stereo_thetas_mrad"])
            g.attrs["drift_offset_nm"] = np.asarray(t["drift_offset_nm"])
            g.attrs["focus_nm"] = float(t["focus_nm"])
            curves = g.create_group("curves")
            curves.attrs["units"] = "nm; columns x, y, z; z = 0 at the foil mid-plane, +z along the beam"
            for i, ident in enumerate(t["ids"]):
                d = curves.create_dataset(str(ident), data=np.asarray(t["curves"][i], dtype=np.float64).reshape(-1, 3))
                d.attrs["kind"] = t["kinds"][i]
                d.attrs["closed"] = bool(t["closed"][i])
                d.attrs["glide_plane_normal"] = np.asarray(t["glide_plane_normals"][i])
                d.attrs["glide_plane_hkl"] = np.asarray(t["glide_plane_hkl"][i])
                d.attrs["velocity_nm_per_scan"] = float(t["velocities_nm_per_scan"][i])
                d.attrs["units"] = "nm"
            d = g.create_dataset("height_nm", data=np.asarray(t["height_nm"], dtype=np.float32), compression="gzip")
            d.attrs["units"] = "nm"
            d.attrs["description"] = "dz = z - focus of the line at each line pixel of the theta = 0 view; NaN elsewhere"
            d = g.create_dataset("line_mask", data=np.asarray(t["line_mask"]).astype(np.uint8), compression="gzip")
            d.attrs["description"] = "(2, ny, nx) projected line centres in views A and B (stereo_thetas_mrad)"
            d = g.create_dataset("disparity_px", data=np.asarray(t["disparity_px"], dtype=np.float32), compression="gzip")
            d.attrs["units"] = "px"
            d.attrs["description"] = ("(ny, nx, 2) = (d_x, d_y): position in view A minus position in view B "
                                      "at the line pixels of A, = (theta_B - theta_A) 1e-3 dz / p; NaN elsewhere")


def read_truth(path: str | Path) -> dict[str, Any]:
    """Read a truth file back: {"attrs", "calibration", "scans": {scan: {...}}} (arrays as numpy)."""
    import h5py

    out: dict[str, Any] = {"scans": {}}
    with h5py.File(path, "r") as f:
        out["attrs"] = dict(f.attrs)
        out["calibration"] = dict(f["calibration"].attrs)
        for name, g in f.items():
            if not name.startswith("scan_"):
                continue
            curves = {int(k): np.asarray(v) for k, v in g["curves"].items()}
            out["scans"][int(g.attrs["scan"])] = {
                "curves": curves,
                "kinds": {int(k): str(v.attrs["kind"]) for k, v in g["curves"].items()},
                "height_nm": np.asarray(g["height_nm"]),
                "line_mask": np.asarray(g["line_mask"]).astype(bool),
                "disparity_px": np.asarray(g["disparity_px"]),
                "stereo_thetas_mrad": np.asarray(g.attrs["stereo_thetas_mrad"]),
                "drift_offset_nm": np.asarray(g.attrs["drift_offset_nm"]),
            }
    return out
