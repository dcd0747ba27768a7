"""One scan's views -> 3D dislocations: the code path ``livestereo reconstruct`` runs offline
and the daemon runs live on snapshots and finished scans.

This module imports no torch itself (the pipeline object is passed in), so the offline
command and the tests can use it with a stand-in pipeline.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from livestereo.config import ConfigError


@dataclasses.dataclass
class ViewSet:
    """The views of one scan, ready for inference.

    Attributes:
        views: (K, ny, nx) float64 images.
        valid: (ny, nx) bool scanned positions.
        thetas_mrad: (K, 2) incident angles (theta_x, theta_y), mrad.
        names: K view names.
        scan_step_nm: p (nm).
        thickness_nm: foil thickness t (nm) or None.
        scan: scan number.
        material, orientation: crystal (or None).
        metadata: free-form description (JSON-serialisable).
    """

    views: np.ndarray
    valid: np.ndarray
    thetas_mrad: np.ndarray
    names: list[str]
    scan_step_nm: float
    thickness_nm: float | None
    scan: int = 0
    material: Any = None
    orientation: Any = None
    metadata: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class OrientationSpec:
    """Zone axis along the beam and one indexed g at a known direction in the image."""

    zone_axis: tuple[int, int, int]
    g: tuple[int, int, int]
    g_angle_deg: float = 0.0


def meta_get(meta: dict, key: str):
    """``meta[key]``, else ``meta["sample"][key]``, else None (start-message metadata)."""
    if key in meta:
        return meta[key]
    sample = meta.get("sample")
    if isinstance(sample, dict):
        return sample.get(key)
    return None


def crystal_from(material: str | None, orient, meta: dict):
    """(Material, Orientation) from explicit values, else the metadata keys ``material``,
    ``zone_axis``, ``g``, ``g_angle_deg``; (None, None) without a material.

    ``orient`` is anything with ``zone_axis``, ``g``, ``g_angle_deg`` (or None).
    Raises ConfigError for an unknown material or an impossible orientation.
    """
    from livestereo.compute.crystal import MaterialError, Orientation, load_material

    name = material or meta_get(meta, "material")
    if orient is None and meta_get(meta, "zone_axis") is not None and meta_get(meta, "g") is not None:
        orient = OrientationSpec(zone_axis=tuple(meta_get(meta, "zone_axis")), g=tuple(meta_get(meta, "g")),
                                 g_angle_deg=float(meta_get(meta, "g_angle_deg") or 0.0))
    if name is None:
        if orient is not None:
            raise ConfigError("an orientation (--zone-axis/--g) needs --material")
        return None, None
    try:
        mat = load_material(name)
    except MaterialError as exc:
        raise ConfigError(str(exc)) from None
    if orient is None:
        return mat, None
    try:
        return mat, Orientation.from_zone_axis(mat.lattice, orient.zone_axis, orient.g, orient.g_angle_deg)
    except ValueError as exc:
        raise ConfigError(f"orientation: {exc}") from None


def check_maps(out: dict, k: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Any]:
    """(prob, disparity, sigma or None, pairs) of a pipeline's output, checked."""
    for key in ("prob", "disparity"):
        if key not in out:
            raise RuntimeError(f"the inference pipeline returned no {key!r} map (keys: {sorted(out)})")
    prob = np.asarray(out["prob"], dtype=np.float32)
    disp = np.asarray(out["disparity"], dtype=np.float32)
    if prob.shape[-2:] != shape or disp.shape[-2:] != shape:
        raise RuntimeError(f"the inference pipeline returned maps {prob.shape}, {disp.shape} for views {shape}")
    sig = out.get("sigma_disparity")
    sig = None if sig is None else np.asarray(sig, dtype=np.float32)
    return prob, disp, sig, out.get("pairs")


class Cancelled(Exception):
    """An analysis given up half-way (``process_viewset``'s ``cancelled`` said so)."""


def process_viewset(pipeline, vs: ViewSet, line_params=None, cancelled=None):
    """Inference + lines + crystal analysis of one view set.

    ``cancelled``: optional callable, asked between the stages (and passed on to pipelines
    that take it); when it returns True, :class:`Cancelled` is raised (the live daemon gives
    up a snapshot's preview when a finished scan needs the CPU).

    Returns (DislocationResult, maps dict, seconds dict); the same path the daemon runs on
    snapshots (only the rows holding valid positions are processed)."""
    from livestereo.compute.dislocations import reconstruct_from_maps
    from livestereo.compute.lines import depth_map

    t0 = time.perf_counter()
    kw = {"cancelled": cancelled} if cancelled is not None and getattr(pipeline, "cancellable", False) else {}
    out = pipeline.process(vs.views.astype(np.float32), vs.valid, vs.thetas_mrad, vs.scan_step_nm, vs.thickness_nm,
                           **kw)
    t1 = time.perf_counter()
    if out is None or (cancelled is not None and cancelled()):
        raise Cancelled()
    prob, disp, sig, pairs = check_maps(out, len(vs.views), vs.valid.shape)
    res = reconstruct_from_maps(prob, disp, vs.thetas_mrad, vs.scan_step_nm, sigma_disparity=sig, valid=vs.valid,
                                pairs=pairs, thickness_nm=vs.thickness_nm, material=vs.material,
                                orientation=vs.orientation, scan=vs.scan, params=line_params, metadata=vs.metadata)
    dz, _ = depth_map(disp, vs.thetas_mrad, vs.scan_step_nm, pairs=pairs)
    t2 = time.perf_counter()
    maps = {"prob": prob, "disparity": disp, "sigma_disparity": sig, "dz_nm": dz.astype(np.float32)}
    return res, maps, {"inference": round(t1 - t0, 4), "lines": round(t2 - t1, 4)}
