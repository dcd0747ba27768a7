"""Crystal-frame analysis of 3D dislocation lines, and the per-scan result container.

Per line (see :mod:`livestereo.compute.crystal` for frames and conventions):

- fractional coordinates f = A^-1 U x of every point (x in nm, microscope frame);
- line direction: the first principal axis (PCA tangent) of the centred points, indexed
  to the nearest low-index [uvw] with the angle between them (deg);
- habit plane: the normal is the smallest singular vector of the centred points, but only
  when the line is curved enough to define a plane: the ratio s1/s0 of the second to the
  first singular value must reach ``min_curvature_ratio`` and the rms out-of-line spread
  s1/sqrt(n) must exceed ``min_spread_sigma`` times the median depth uncertainty; else
  the habit plane is "undetermined".  Indexed to the nearest low-index (hkl) with the angle
  between the normals (deg).  ``planarity`` = s2/s1 (0 for a perfectly planar line).

HDF5 layout written by :meth:`DislocationResult.write_hdf5` into a group (the caller adds
``maps/prob``, ``maps/disparity``, ... next to it), documented in
:mod:`livestereo.commands.reconstruct`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from livestereo.compute.crystal import Material, Orientation
from livestereo.compute.lines import DislocationLine

__all__ = ["DislocationResult", "LineAnalysis", "analyse_line", "analyse_lines", "line_svd", "reconstruct_from_maps"]

UNDETERMINED = "undetermined"


@dataclasses.dataclass
class LineAnalysis:
    """Crystal-frame description of one line.

    Attributes:
        line_id: id of the DislocationLine.
        fractional: (n, 3) fractional coordinates (lattice units) of the points.
        direction: (3,) unit line direction (microscope frame, PCA tangent).
        direction_indices: (3,) real-valued [uvw] (largest |component| = 1).
        direction_uvw: nearest low-index [uvw].
        direction_angle_deg: angle between the line direction and [uvw] (deg).
        habit: "determined" or "undetermined".
        habit_normal: (3,) unit plane normal (microscope frame) or None.
        habit_indices: (3,) real-valued (hkl) or None.
        habit_hkl: nearest low-index (hkl) or None.
        habit_angle_deg: angle between the normal and (hkl)'s normal (deg) or None.
        singular_values: (3,) singular values of the centred points (nm), descending.
        curvature_ratio: s1/s0; planarity: s2/s1 (NaN if s1 = 0).
    """

    line_id: int
    fractional: np.ndarray
    direction: np.ndarray
    direction_indices: np.ndarray
    direction_uvw: tuple[int, int, int]
    direction_angle_deg: float
    habit: str
    habit_normal: np.ndarray | None
    habit_indices: np.ndarray | None
    habit_hkl: tuple[int, int, int] | None
    habit_angle_deg: float | None
    singular_values: np.ndarray
    curvature_ratio: float
    planarity: float

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "line_id": self.line_id,
            "direction": _r(self.direction),
            "direction_indices": _r(self.direction_indices),
            "direction_uvw": list(self.direction_uvw),
            "direction_angle_deg": _r(self.direction_angle_deg),
            "habit_plane": self.habit,
            "habit_normal": _r(self.habit_normal) if self.habit_normal is not None else None,
            "habit_indices": _r(self.habit_indices) if self.habit_indices is not None else None,
            "habit_hkl": list(self.habit_hkl) if self.habit_hkl is not None else None,
            "habit_angle_deg": _r(self.habit_angle_deg) if self.habit_angle_deg is not None else None,
            "singular_values_nm": _r(self.singular_values),
            "curvature_ratio": _r(self.curvature_ratio),
            "planarity": _r(self.planarity),
        }


def _r(x, nd: int = 6):
    if x is None:
        return None
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        v = float(a)
        return round(v, nd) if math.isfinite(v) else None
    return [(_r(v, nd)) for v in a]


def line_svd(points_nm) -> tuple[np.ndarray, np.ndarray]:
    """(singular values (3,) descending, right singular vectors (3, 3) as rows) of the
    centred points (n, 3)."""
    P = np.asarray(points_nm, dtype=np.float64)
    P = P[np.all(np.isfinite(P), axis=1)]
    if len(P) < 2:
        raise ValueError("a line needs at least 2 finite points")
    C = P - P.mean(axis=0)
    _, s, vt = np.linalg.svd(C, full_matrices=True)
    s = np.concatenate([s, np.zeros(3 - len(s))])
    return s, vt


def analyse_line(line: DislocationLine, orientation: Orientation, *, max_index: int = 3,
                 min_curvature_ratio: float = 0.05, min_spread_sigma: float = 3.0) -> LineAnalysis:
    """Crystal-frame analysis of one line (see the module docstring)."""
    pts = np.asarray(line.points_nm, dtype=np.float64)
    s, vt = line_svd(pts)
    direction = vt[0]
    if direction[np.argmax(np.abs(direction))] < 0:
        direction = -direction
    uvw, ang = orientation.index_line_direction(direction, max_index)
    n = len(pts)
    curv = float(s[1] / s[0]) if s[0] > 0 else 0.0
    plan = float(s[2] / s[1]) if s[1] > 0 else float("nan")
    sig = np.asarray(line.sigma_z_nm, dtype=np.float64)
    sig_med = float(np.nanmedian(sig)) if np.isfinite(sig).any() else 0.0
    spread = s[1] / math.sqrt(n)
    curved = curv >= min_curvature_ratio and spread > min_spread_sigma * sig_med and n >= 3
    if curved:
        normal = vt[2]
        if normal[np.argmax(np.abs(normal))] < 0:
            normal = -normal
        hkl, hang = orientation.index_plane_normal(normal, max_index)
        habit, hidx = "determined", orientation.plane_indices(normal)
    else:
        normal, hkl, hang, habit, hidx = None, None, None, UNDETERMINED, None
    return LineAnalysis(
        line_id=line.id,
        fractional=orientation.to_fractional(pts),
        direction=direction,
        direction_indices=orientation.direction_indices(direction),
        direction_uvw=uvw,
        direction_angle_deg=float(ang),
        habit=habit,
        habit_normal=normal,
        habit_indices=hidx,
        habit_hkl=hkl,
        habit_angle_deg=None if hang is None else float(hang),
        singular_values=s,
        curvature_ratio=curv,
        planarity=plan,
    )


def analyse_lines(lines: list[DislocationLine], material: Material, orientation: Orientation, *,
                  max_index: int = 3, min_curvature_ratio: float = 0.05,
                  min_spread_sigma: float = 3.0) -> list[LineAnalysis]:
    """Crystal-frame analysis of every line; ``orientation`` must be built on
    ``material.lattice`` (ValueError otherwise)."""
    if orientation.lattice != material.lattice:
        raise ValueError(f"orientation lattice {orientation.lattice} is not the lattice of {material.name}")
    return [analyse_line(ln, orientation, max_index=max_index, min_curvature_ratio=min_curvature_ratio,
                         min_spread_sigma=min_spread_sigma) for ln in lines]


@dataclasses.dataclass
class DislocationResult:
    """The 3D dislocation reconstruction of one scan.

    Attributes:
        scan: scan number within the series.
        lines: reconstructed lines (microscope frame, nm).
        analyses: crystal-frame analyses (same order as lines) or None without a crystal.
        thetas_mrad: (K, 2) incident angles of the views (mrad); view 0 is the reference.
        scan_step_nm: p (nm).
        thickness_nm: foil thickness (nm) or None.
        material: the material or None.
        orientation: the orientation or None.
        metadata: free-form (JSON-serialisable) description.
    """

    scan: int
    lines: list[DislocationLine]
    analyses: list[LineAnalysis] | None
    thetas_mrad: np.ndarray
    scan_step_nm: float
    thickness_nm: float | None = None
    material: Material | None = None
    orientation: Orientation | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json_dict(self, *, points: bool = True) -> dict[str, Any]:
        """A JSON-serialisable summary; ``points=False`` leaves out per-point arrays."""
        amap = {a.line_id: a for a in (self.analyses or [])}
        lines = []
        for ln in self.lines:
            d: dict[str, Any] = {
                "id": ln.id,
                "n_points": ln.n_points,
                "length_nm": _r(ln.length_nm, 3),
                "closed": ln.closed,
                "mean_probability": _r(ln.mean_probability, 4),
                "z_range_nm": _r([np.nanmin(ln.points_nm[:, 2]), np.nanmax(ln.points_nm[:, 2])], 3),
                "median_sigma_z_nm": _r(np.nanmedian(ln.sigma_z_nm), 4) if np.isfinite(ln.sigma_z_nm).any() else None,
            }
            if points:
                d["points_nm"] = [_r(p, 4) for p in ln.points_nm]
                d["sigma_z_nm"] = _r(ln.sigma_z_nm, 4)
            a = amap.get(ln.id)
            if a is not None:
                d["crystal"] = a.to_json_dict()
                if points:
                    d["crystal"]["fractional"] = [_r(p, 5) for p in a.fractional]
            lines.append(d)
        return {
            "scan": self.scan,
            "n_lines": len(self.lines),
            "scan_step_nm": self.scan_step_nm,
            "thickness_nm": self.thickness_nm,
            "thetas_mrad": _r(self.thetas_mrad, 4),
            "material": self.material.name if self.material else None,
            "lattice": self.material.lattice.model_dump() if self.material else None,
            "orientation": self.orientation.to_json_dict() if self.orientation else None,
            "metadata": self.metadata,
            "lines": lines,
        }

    def write_hdf5(self, group) -> None:
        """Write into an open h5py Group (layout in livestereo.commands.reconstruct)."""
        g = group
        g.attrs["format"] = "livestereo.dislocations"
        g.attrs["format_version"] = 1
        g.attrs["scan"] = int(self.scan)
        g.attrs["n_lines"] = len(self.lines)
        g.attrs["scan_step_nm"] = float(self.scan_step_nm)
        g.attrs["thickness_nm"] = float("nan") if self.thickness_nm is None else float(self.thickness_nm)
        g.attrs["metadata"] = json.dumps(self.metadata, default=str)
        g.create_dataset("thetas_mrad", data=np.asarray(self.thetas_mrad, dtype=np.float64))
        if self.material is not None:
            m = g.create_group("crystal")
            m.attrs["material"] = self.material.name
            m.attrs["structure"] = self.material.structure
            for k, v in self.material.lattice.model_dump().items():
                m.attrs[k] = float("nan") if v is None else float(v)
            m.create_dataset("A_nm", data=self.material.lattice.A)
            if self.orientation is not None:
                o = self.orientation
                m.create_dataset("U", data=np.asarray(o.U))
                m.attrs["U_meaning"] = "columns e_x, e_y, e_z (microscope axes) in crystal-Cartesian coordinates"
                if o.zone_axis is not None:
                    m.attrs["zone_axis"] = np.asarray(o.zone_axis, dtype=np.int64)
                    m.attrs["g"] = np.asarray(o.g, dtype=np.int64)
                    m.attrs["g_angle_deg"] = float(o.g_angle_deg or 0.0)
        amap = {a.line_id: a for a in (self.analyses or [])}
        lg = g.create_group("lines")
        for ln in self.lines:
            d = lg.create_group(f"{ln.id:04d}")
            d.create_dataset("points_nm", data=ln.points_nm)
            d.create_dataset("sigma_z_nm", data=ln.sigma_z_nm)
            d.create_dataset("pixels_px", data=ln.pixels_px)
            d.attrs["length_nm"] = float(ln.length_nm)
            d.attrs["closed"] = bool(ln.closed)
            d.attrs["mean_probability"] = float(ln.mean_probability)
            a = amap.get(ln.id)
            if a is None:
                continue
            d.create_dataset("fractional", data=a.fractional)
            d.attrs["direction"] = a.direction
            d.attrs["direction_indices"] = a.direction_indices
            d.attrs["direction_uvw"] = np.asarray(a.direction_uvw, dtype=np.int64)
            d.attrs["direction_angle_deg"] = a.direction_angle_deg
            d.attrs["habit_plane"] = a.habit
            d.attrs["singular_values_nm"] = a.singular_values
            d.attrs["curvature_ratio"] = a.curvature_ratio
            d.attrs["planarity"] = a.planarity
            if a.habit_hkl is not None:
                d.attrs["habit_normal"] = a.habit_normal
                d.attrs["habit_indices"] = a.habit_indices
                d.attrs["habit_hkl"] = np.asarray(a.habit_hkl, dtype=np.int64)
                d.attrs["habit_angle_deg"] = a.habit_angle_deg


def reconstruct_from_maps(prob, disparity, thetas_mrad, scan_step_nm: float, *, sigma_disparity=None,
                          valid=None, pairs=None, thickness_nm: float | None = None,
                          material: Material | None = None, orientation: Orientation | None = None,
                          scan: int = 0, params=None, metadata: dict | None = None) -> DislocationResult:
    """Detection map(s) + disparity map(s) -> :class:`DislocationResult` (lines, and the
    crystal analysis when both material and orientation are given).  The same function
    serves ``livestereo reconstruct`` and the live daemon (pure compute, no torch)."""
    from livestereo.compute.lines import extract_lines

    lines = extract_lines(prob, disparity, thetas_mrad, scan_step_nm, pairs=pairs,
                          sigma_disparity=sigma_disparity, valid=valid, params=params)
    analyses = None
    if material is not None and orientation is not None:
        analyses = analyse_lines(lines, material, orientation)
    return DislocationResult(scan, lines, analyses, np.asarray(thetas_mrad, dtype=np.float64),
                             float(scan_step_nm), thickness_nm, material, orientation, dict(metadata or {}))
