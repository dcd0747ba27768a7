"""The particle table: one row per reconstructed particle, written to HDF5 and CSV per scan.

Units: x_nm, y_nm in scan axes (x = column * p, y = row * p, nm), z_nm = height dz above the
probe crossover (nm, beam along +z), radius_nm (apparent radius, mean over views),
sigma_z_nm (1-sigma depth uncertainty from the least-squares fit), view_xy_px (n, n_seg, 2)
the detected (x, y) position in each segment image (px, NaN where not used).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FLAGS", "ParticleTable", "flag_names", "write_particle_table", "read_particle_table"]

#: Flag bits of ParticleTable.flags.
FLAGS = {
    "missing_view": 1,  # found in fewer views than there are segments
    "edge": 2,  # touches the image border or an unfilled part of the scan in some view
    "ambiguous": 4,  # another match with as many views fitted almost as well
    "crowded": 8,  # another detection touches this one in some view: position and depth may be biased
    "elongated": 16,  # the blob is not round (median over views): often two particles seen as one
}

_COLUMNS = ("id", "x_nm", "y_nm", "z_nm", "radius_nm", "sigma_z_nm", "n_views", "views", "residual_px", "flags")


def flag_names(bits: int) -> list[str]:
    """Names of the flags set in ``bits``."""
    return [name for name, b in FLAGS.items() if int(bits) & b]


@dataclasses.dataclass
class ParticleTable:
    """Particles reconstructed from one set of segment images (one scan). Arrays of length n."""

    id: np.ndarray
    x_nm: np.ndarray
    y_nm: np.ndarray
    z_nm: np.ndarray
    radius_nm: np.ndarray
    sigma_z_nm: np.ndarray
    n_views: np.ndarray
    views: np.ndarray
    """Bitmask of the segments used (bit X = segment X)."""
    residual_px: np.ndarray
    """Weighted rms residual of the least-squares fit (px)."""
    flags: np.ndarray
    """Bits of FLAGS."""
    view_xy_px: np.ndarray
    """(n, n_seg, 2) detected (x, y) per segment image (px); NaN where the view was not used."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """segment_angles_mrad, scan_step_nm, n_detections per view, sigma_xy_px, timings_ms ..."""

    def __len__(self) -> int:
        return int(self.id.shape[0])

    @classmethod
    def empty(cls, n_seg: int, meta: dict | None = None) -> "ParticleTable":
        f = np.zeros(0)
        i = np.zeros(0, dtype=np.int64)
        return cls(i, f, f.copy(), f.copy(), f.copy(), f.copy(), i.copy(), np.zeros(0, np.uint32), f.copy(),
                   np.zeros(0, np.uint32), np.zeros((0, n_seg, 2)), dict(meta or {}))

    def flag_strings(self) -> list[str]:
        """'|'-joined flag names per particle ('' when none)."""
        return ["|".join(flag_names(b)) for b in self.flags]

    def positions_nm(self) -> np.ndarray:
        """(n, 3) x, y, z in nm."""
        return np.stack([self.x_nm, self.y_nm, self.z_nm], 1)


def write_particle_table(table: ParticleTable, h5, csv_path: str | Path | None = None) -> None:
    """Write ``table`` to HDF5 (a file path, created/overwritten, or an open h5py Group) and to CSV.

    HDF5: one dataset per column plus view_xy_px, and flags_names; table.meta as attributes
    (arrays as datasets under meta/). CSV columns: id, x_nm, y_nm, z_nm, radius_nm,
    sigma_z_nm, n_views, views, residual_px, flags (names joined by '|').
    """
    import h5py

    def _write(g):
        for c in _COLUMNS:
            if c in g:
                del g[c]
            g.create_dataset(c, data=getattr(table, c))
        for c in ("view_xy_px",):
            if c in g:
                del g[c]
            g.create_dataset(c, data=table.view_xy_px)
        g.attrs["flag_bits"] = ",".join(f"{k}={v}" for k, v in FLAGS.items())
        g.attrs["units"] = "x_nm, y_nm: scan axes (nm); z_nm: height above the probe crossover (nm)"
        if "meta" in g:
            del g["meta"]
        mg = g.create_group("meta")
        for k, v in table.meta.items():
            if isinstance(v, dict):
                for k2, v2 in v.items():
                    mg.attrs[f"{k}.{k2}"] = v2
            elif isinstance(v, (list, tuple, np.ndarray)):
                mg.create_dataset(k, data=np.asarray(v))
            elif v is not None:
                mg.attrs[k] = v

    if isinstance(h5, (str, Path)):
        with h5py.File(h5, "w") as f:
            _write(f)
    else:
        _write(h5)
    if csv_path is not None:
        with open(csv_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(_COLUMNS)
            names = table.flag_strings()
            for i in range(len(table)):
                w.writerow([int(table.id[i]), f"{table.x_nm[i]:.3f}", f"{table.y_nm[i]:.3f}", f"{table.z_nm[i]:.3f}",
                            f"{table.radius_nm[i]:.3f}", f"{table.sigma_z_nm[i]:.3f}", int(table.n_views[i]),
                            int(table.views[i]), f"{table.residual_px[i]:.4f}", names[i]])


def read_particle_table(h5) -> ParticleTable:
    """Read a table written by write_particle_table (path or h5py Group)."""
    import h5py

    def _read(g):
        cols = {c: np.asarray(g[c]) for c in _COLUMNS}
        meta: dict[str, Any] = {}
        if "meta" in g:
            for k, v in g["meta"].attrs.items():
                meta[k] = v
            for k in g["meta"]:
                meta[k] = np.asarray(g["meta"][k])
        return ParticleTable(view_xy_px=np.asarray(g["view_xy_px"]), meta=meta, **cols)

    if isinstance(h5, (str, Path)):
        with h5py.File(h5, "r") as f:
            return _read(f)
    return _read(h5)
