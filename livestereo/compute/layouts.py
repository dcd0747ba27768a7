"""Virtual detector layouts: which detector pixels (or segments) make each virtual image.

A layout is a list of virtual detectors, each a non-negative weight map over one frame
(``item_shape``: (det_y, det_x) for pixelated detectors, (n_segments,) for segmented ones)
together with its role and its effective incident angle (the weighted centroid, theta_x,
theta_y in mrad, scan axes).  Regions are specified in angle space (mrad, relative to the
bright-field disc centre) and rasterised with the run's calibration; edge pixels get their
fractional coverage (4 x 4 supersampling), so centroids move smoothly with the parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from livestereo.protocol.messages import Calibration, StartMessage

__all__ = ["Layout", "LayoutSpec", "VirtualDetector", "build_layout", "default_radius_fraction"]

_SUPERSAMPLE = 4
_CHUNK_ROWS = 64


class LayoutSpec(BaseModel):
    """What virtual detectors to build; angles in mrad relative to the BF disc centre."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["stereo", "multiview", "bf_adf", "segments"] = "stereo"
    """stereo: two circular regions at opposite sides of the disc; multiview: k circular
    regions evenly around the disc; bf_adf: only a BF disc and an annular DF detector;
    segments: k sectors of the BF disc on a pixelated detector (k = 2: two half discs), or
    the detector's own segments on a segmented detector (the default there, whatever kind)."""

    radius_mrad: float | None = Field(default=None, gt=0)
    """Radius of each circular region (mrad); None: proposed from alpha (0.35 alpha for
    stereo; for k views at most 0.9 x the largest radius at which neighbours do not overlap)."""

    offset_mrad: float | None = Field(default=None, ge=0)
    """Distance of each region centre from the disc centre (mrad); None: alpha - radius
    (as far out as fits inside the disc).  Parts of a region outside the disc are dropped."""

    k: int = Field(default=2, ge=1, le=64)
    """Number of views for multiview (regions evenly around the disc) or of sectors for
    segments; stereo always has 2 regions (view0 at angle_deg, view1 opposite)."""

    angle_deg: float = 0.0
    """Direction (deg, scan axes, from +x towards +y) of the first view's centre; for stereo
    the direction of the baseline."""

    with_bf_adf: bool = False
    """Append a BF disc detector ("bf") and an annular DF detector ("adf") after the views."""

    adf_inner_factor: float = Field(default=1.1, gt=0)
    """ADF inner radius as a multiple of alpha."""

    adf_outer_factor: float = Field(default=2.0, gt=0)
    """ADF outer radius as a multiple of alpha (the detector edge clips it)."""

    @model_validator(mode="after")
    def _check(self) -> "LayoutSpec":
        if self.adf_outer_factor <= self.adf_inner_factor:
            raise ValueError(
                f"adf_outer_factor ({self.adf_outer_factor}) must exceed adf_inner_factor ({self.adf_inner_factor})"
            )
        if self.kind == "multiview" and self.k < 2:
            raise ValueError("multiview needs k >= 2 views")
        return self


@dataclasses.dataclass(frozen=True, eq=False)
class VirtualDetector:
    """One virtual detector: a weight per frame pixel (or segment)."""

    name: str
    """e.g. "view0", "view1", "bf", "adf", "seg0"."""
    weights: np.ndarray
    """float32 of shape item_shape ((det_y, det_x) or (n_segments,)), all >= 0."""
    centroid_mrad: tuple[float, float]
    """Weighted mean incident angle (theta_x, theta_y) in mrad, scan axes; (0, 0) for bf/adf."""
    role: Literal["view", "bf", "adf", "segment"]
    """view: a stereo/multiview region; bf/adf: conventional images; segment: a segment (view)."""

    @property
    def n_pixels(self) -> float:
        """Sum of the weights (effective pixel count)."""
        return float(self.weights.sum(dtype=np.float64))


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """The virtual detectors of a run and the disc they were built on."""

    detectors: tuple[VirtualDetector, ...]
    item_shape: tuple[int, ...]
    """Shape of one frame: (det_y, det_x) or (n_segments,)."""
    disc_center_px: tuple[float, float] | None
    """BF disc centre (row, col) px; None for segmented detectors."""
    disc_radius_px: float | None
    """BF disc radius (px); None for segmented detectors."""

    def weights_matrix(self) -> np.ndarray:
        """(n_det, npix) float32 C-contiguous weights, npix = prod(item_shape) in C order."""
        npix = int(np.prod(self.item_shape))
        return np.ascontiguousarray(
            np.stack([d.weights.reshape(npix) for d in self.detectors]), dtype=np.float32
        )

    @property
    def names(self) -> list[str]:
        """Detector names in order."""
        return [d.name for d in self.detectors]

    @property
    def centroids_mrad(self) -> np.ndarray:
        """(n_det, 2) float64 centroids (theta_x, theta_y) in mrad."""
        return np.array([d.centroid_mrad for d in self.detectors], dtype=np.float64).reshape(-1, 2)

    @property
    def view_indices(self) -> list[int]:
        """Indices of the detectors with role view or segment (the stereo views)."""
        return [i for i, d in enumerate(self.detectors) if d.role in ("view", "segment")]

    def describe(self) -> str:
        """One line per detector: name, role, centroid (mrad) and pixel count."""
        lines = []
        for d in self.detectors:
            cx, cy = d.centroid_mrad
            r = math.hypot(cx, cy)
            lines.append(
                f"{d.name:>6s}  {d.role:<7s}  centroid ({cx:+7.2f}, {cy:+7.2f}) mrad  |{r:6.2f}| mrad"
                f"  {d.n_pixels:9.1f} px"
            )
        return "\n".join(lines)


def default_radius_fraction(kind: str, k: int) -> float:
    """Default region radius as a fraction of alpha (see LayoutSpec.radius_mrad)."""
    if kind == "stereo":
        return 0.35
    s = math.sin(math.pi / max(k, 2))
    return min(0.35, 0.9 * s / (1.0 + s))


# --------------------------------------------------------------------------- rasterising


@dataclasses.dataclass(frozen=True)
class _Geometry:
    cal: "Calibration"
    center: tuple[float, float]
    mrad_per_px: float
    shape: tuple[int, int]

    def theta(self, rows, cols):
        return self.cal.theta_of_pixel(rows, cols, self.center)

    def pixel_of_theta(self, tx: float, ty: float) -> tuple[float, float]:
        """Inverse of theta_of_pixel: (row, col) of the incident angle (tx, ty)."""
        phi = math.radians(self.cal.scan_rotation_deg)
        c, s = math.cos(phi), math.sin(phi)
        dx = (c * tx + s * ty) / self.mrad_per_px
        dy = (-s * tx + c * ty) / self.mrad_per_px
        return self.center[0] + dy, self.center[1] + dx

    def raster(self, inside: Callable[[np.ndarray, np.ndarray], np.ndarray], bbox=None) -> np.ndarray:
        """Fractional coverage (float32, frame shape) of the region ``inside(tx, ty)``."""
        h, w = self.shape
        r0, r1, c0, c1 = (0, h, 0, w) if bbox is None else bbox
        out = np.zeros((h, w), dtype=np.float32)
        if r1 <= r0 or c1 <= c0:
            return out
        n = _SUPERSAMPLE
        sub = (np.arange(n) + 0.5) / n - 0.5
        cols = (np.arange(c0, c1)[:, None] + sub[None, :]).reshape(-1)
        for a in range(r0, r1, _CHUNK_ROWS):
            b = min(a + _CHUNK_ROWS, r1)
            rows = (np.arange(a, b)[:, None] + sub[None, :]).reshape(-1)
            tx, ty = self.theta(rows[:, None], cols[None, :])
            m = inside(tx, ty).reshape(b - a, n, c1 - c0, n)
            out[a:b, c0:c1] = m.mean(axis=(1, 3), dtype=np.float64)
        return out

    def bbox(self, tx: float, ty: float, extent_mrad: float) -> tuple[int, int, int, int]:
        """Pixel bounding box (r0, r1, c0, c1) of a region of radius extent around (tx, ty)."""
        row, col = self.pixel_of_theta(tx, ty)
        e = extent_mrad / self.mrad_per_px + 2.0
        h, w = self.shape
        return (
            max(0, int(math.floor(row - e))),
            min(h, int(math.ceil(row + e)) + 1),
            max(0, int(math.floor(col - e))),
            min(w, int(math.ceil(col + e)) + 1),
        )

    def centroid(self, weights: np.ndarray) -> tuple[float, float]:
        total = float(weights.sum(dtype=np.float64))
        rows, cols = np.nonzero(weights)
        tx, ty = self.theta(rows, cols)
        wv = weights[rows, cols].astype(np.float64)
        return float((wv * tx).sum() / total), float((wv * ty).sum() / total)


def _resolve_geometry(start: "StartMessage", disc_center_px, disc_radius_px) -> tuple[_Geometry, float]:
    cal = start.calibration
    center = disc_center_px if disc_center_px is not None else cal.disc_center_px
    radius = disc_radius_px if disc_radius_px is not None else cal.disc_radius_px
    alpha = cal.convergence_semiangle_mrad
    mpp = cal.mrad_per_px
    missing = []
    if center is None:
        missing.append("the disc centre (calibration.disc_center_px or disc_center_px)")
    if mpp is None and radius is None:
        missing.append(
            "the angular pixel size (calibration.mrad_per_px, or a disc radius: calibration.disc_radius_px "
            "or disc_radius_px, giving mrad_per_px = alpha / radius)"
        )
    if missing:
        raise ValueError("cannot build a pixelated layout without " + " and ".join(missing))
    if mpp is None:
        if not radius > 0:
            raise ValueError(f"disc radius must be > 0 px, got {radius}")
        mpp = alpha / float(radius)
        cal = cal.model_copy(update={"mrad_per_px": mpp})
    if radius is None:
        radius = alpha / mpp
    center = (float(center[0]), float(center[1]))
    return _Geometry(cal=cal, center=center, mrad_per_px=float(mpp), shape=tuple(start.frame_shape)), float(radius)


def _circle_views(spec: LayoutSpec, geo: _Geometry, alpha: float, n: int) -> list[VirtualDetector]:
    kind = "stereo" if spec.kind == "stereo" else "multiview"
    radius = spec.radius_mrad if spec.radius_mrad is not None else default_radius_fraction(kind, n) * alpha
    offset = spec.offset_mrad if spec.offset_mrad is not None else max(alpha - radius, 0.0)
    dets = []
    a2 = alpha * alpha
    r2 = radius * radius
    for i in range(n):
        ang = math.radians(spec.angle_deg) + 2.0 * math.pi * i / n
        cx, cy = offset * math.cos(ang), offset * math.sin(ang)

        def inside(tx, ty, cx=cx, cy=cy):
            return ((tx - cx) ** 2 + (ty - cy) ** 2 <= r2) & (tx * tx + ty * ty <= a2)

        w = geo.raster(inside, geo.bbox(cx, cy, radius))
        name = f"view{i}"
        if not w.any():
            raise ValueError(
                f"{name} (centre ({cx:.1f}, {cy:.1f}) mrad, radius {radius:.1f} mrad) covers no detector pixel"
            )
        dets.append(VirtualDetector(name, w, geo.centroid(w), "view"))
    return dets


def _sector_views(spec: LayoutSpec, geo: _Geometry, alpha: float) -> list[VirtualDetector]:
    n = spec.k
    width = 2.0 * math.pi / n
    a2 = alpha * alpha
    dets = []
    for i in range(n):
        start_ang = math.radians(spec.angle_deg) + width * i - width / 2.0

        def inside(tx, ty, start_ang=start_ang):
            if n == 1:
                return tx * tx + ty * ty <= a2
            rel = np.mod(np.arctan2(ty, tx) - start_ang, 2.0 * math.pi)
            return (tx * tx + ty * ty <= a2) & (rel < width)

        w = geo.raster(inside, geo.bbox(0.0, 0.0, alpha))
        if not w.any():
            raise ValueError(f"segment seg{i} covers no detector pixel")
        dets.append(VirtualDetector(f"seg{i}", w, geo.centroid(w), "segment"))
    return dets


def _bf_adf(spec: LayoutSpec, geo: _Geometry, alpha: float) -> list[VirtualDetector]:
    a2 = alpha * alpha
    bf = geo.raster(lambda tx, ty: tx * tx + ty * ty <= a2, geo.bbox(0.0, 0.0, alpha))
    r_in, r_out = spec.adf_inner_factor * alpha, spec.adf_outer_factor * alpha

    def ring(tx, ty):
        q = tx * tx + ty * ty
        return (q >= r_in * r_in) & (q <= r_out * r_out)

    adf = geo.raster(ring, geo.bbox(0.0, 0.0, r_out))
    out = []
    for name, w in (("bf", bf), ("adf", adf)):
        if not w.any():
            raise ValueError(f"the {name} detector covers no detector pixel")
        out.append(VirtualDetector(name, w, (0.0, 0.0), name))  # type: ignore[arg-type]
    return out


def build_layout(
    spec: LayoutSpec,
    start: "StartMessage",
    disc_center_px: tuple[float, float] | None = None,
    disc_radius_px: float | None = None,
) -> Layout:
    """Rasterise ``spec`` for the run opened by ``start``.

    Pixelated detectors: the disc centre (row, col) px and radius px given here override
    ``start.calibration``; mrad_per_px comes from the calibration, else alpha / disc radius.
    Raises ValueError naming what is missing when neither gives enough.  Weights are 1
    inside a region and the fractional coverage (4 x 4 supersampling) at its edge; each
    region is clipped to the BF disc (radius alpha) and its centroid is the weighted mean
    of theta_of_pixel over its pixels.

    Segmented detectors: one pass-through detector per segment ("seg<i>", identity
    weights) whatever ``spec.kind``; centroid = calibration.segment_angles_mrad[i], or (0, 0)
    when not calibrated.
    """
    cal = start.calibration
    if start.detector == "segmented":
        n = int(start.n_segments)  # type: ignore[arg-type]
        angles = cal.segment_angles_mrad
        dets = []
        for i in range(n):
            w = np.zeros(n, dtype=np.float32)
            w[i] = 1.0
            c = (float(angles[i][0]), float(angles[i][1])) if angles is not None else (0.0, 0.0)
            dets.append(VirtualDetector(f"seg{i}", w, c, "segment"))
        return Layout(tuple(dets), (n,), None, None)

    geo, radius_px = _resolve_geometry(start, disc_center_px, disc_radius_px)
    alpha = cal.convergence_semiangle_mrad
    dets: list[VirtualDetector] = []
    if spec.kind == "stereo":
        dets += _circle_views(spec, geo, alpha, 2)
    elif spec.kind == "multiview":
        dets += _circle_views(spec, geo, alpha, spec.k)
    elif spec.kind == "segments":
        dets += _sector_views(spec, geo, alpha)
    if spec.kind == "bf_adf" or spec.with_bf_adf:
        dets += _bf_adf(spec, geo, alpha)
    return Layout(tuple(dets), tuple(start.item_shape), geo.center, radius_px)
