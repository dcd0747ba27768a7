"""Find the bright-field disc on a pixelated detector, to sub-pixel accuracy.

Pipeline (``find_disc``):

1. sum the frames (float64) and replace isolated outliers (dead, hot, saturated pixels):
   pixels that differ from their 3 x 3 median by more than 8 local noise sigmas (Poisson-like
   scaling, gain estimated robustly) take the median's value;
2. detect: Otsu threshold of a Gaussian-smoothed copy, largest connected bright component,
   holes filled; reject when the two levels do not separate well from the noise (flat
   frames, no disc, disc off the detector) or when no background is visible;
3. refine: levels b (background ring just outside) and f (disc interior); every pixel of a
   band around the edge gets its coverage (I - b) / (f - b) (unclipped, so noise does not
   bias it), pixels inside the band count 1, outside 0; area -> radius = sqrt(A / pi) and
   first moments -> centre; iterated.  This is exact for an anti-aliased or blurred edge
   and averages the noise of ~2 pi r x band pixels.  A disc cut by the detector edge is
   refined instead by a circle fit to the edge (gradient-magnitude weighted, algebraic).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

__all__ = ["DiscFit", "DiscNotFound", "find_disc"]

#: outliers: |I - median3x3| above this many local noise sigmas.
_OUTLIER_SIGMAS = 8.0
#: detection: (disc level - background level) must exceed this many noise sigmas.
_MIN_SEPARATION = 5.0
_MIN_RADIUS_PX = 3.0


class DiscNotFound(ValueError):
    """No bright-field disc could be located; the message says why."""


@dataclasses.dataclass(frozen=True)
class DiscFit:
    """The bright-field disc on the detector."""

    center_px: tuple[float, float]
    """Disc centre (row, col) in detector pixels (pixel centres at integer coordinates)."""
    radius_px: float
    """Disc radius (px)."""
    n_frames: int
    """Number of frames summed."""
    contrast: float
    """(disc level - background level) / disc level, 0..1, of the summed frame."""


def _clean(img: np.ndarray) -> np.ndarray:
    """Replace isolated outliers (dead/hot pixels) by their 3 x 3 median."""
    med = ndimage.median_filter(img, size=3, mode="nearest")
    resid = img - med
    scale = np.sqrt(np.abs(med) + 1.0)
    z = resid / scale
    gain = 1.4826 * float(np.median(np.abs(z - np.median(z))))
    if gain <= 0:  # noiseless or quantised data: fall back to the spread of all residuals
        gain = float(np.std(z)) or 1.0
    bad = np.abs(z) > _OUTLIER_SIGMAS * gain
    bad &= np.abs(resid) > 1e-9 * (np.abs(med).max() + 1.0)
    out = img.copy()
    out[bad] = med[bad]
    return out


def _detect(img: np.ndarray) -> tuple[float, float, float, float, float]:
    """Coarse (row, col, radius, f, b) from the largest bright blob; raises DiscNotFound."""
    from skimage.filters import threshold_otsu

    h, w = img.shape
    if h < 8 or w < 8:
        raise DiscNotFound(f"frames of shape {img.shape} are too small to hold a disc")
    smooth = ndimage.gaussian_filter(img, 1.5, mode="nearest")
    if float(smooth.max() - smooth.min()) <= 1e-12 * (abs(float(smooth.max())) + 1.0):
        raise DiscNotFound("the summed frame is flat: no disc")
    thr = threshold_otsu(smooth)
    mask = smooth > thr
    lab, n = ndimage.label(mask)
    if n == 0:
        raise DiscNotFound("no pixel above the Otsu threshold: no disc")
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    blob = ndimage.binary_fill_holes(lab == (1 + int(np.argmax(sizes))))
    area = float(blob.sum())
    if area > 0.9 * h * w:
        raise DiscNotFound("the bright region fills the detector: no background visible around a disc")
    inner = ndimage.binary_erosion(blob, iterations=3)
    outer = ~ndimage.binary_dilation(blob, iterations=3)
    if inner.sum() < 9 or outer.sum() < 9:
        raise DiscNotFound(f"the bright region ({area:.0f} px) is too small to be a disc")
    f, b = float(smooth[inner].mean()), float(smooth[outer].mean())
    noise = max(float(smooth[inner].std()), float(smooth[outer].std()), 1e-300)
    if (f - b) < _MIN_SEPARATION * noise:
        raise DiscNotFound(
            f"disc and background levels do not separate (difference {f - b:.3g} vs noise {noise:.3g}):"
            " flat frames (no disc, or the disc off the detector or filling it) or too few counts"
        )
    rr, cc = np.nonzero(blob)
    row, col = float(rr.mean()), float(cc.mean())
    radius = math.sqrt(area / math.pi)
    if radius < _MIN_RADIUS_PX:
        raise DiscNotFound(f"the bright region is too small (radius {radius:.1f} px) to be a disc")
    # a disc is compact: most of the blob lies within the equivalent circle
    inside = np.hypot(rr - row, cc - col) <= radius + 1.5
    if inside.mean() < 0.85:
        touches = blob[0].any() or blob[-1].any() or blob[:, 0].any() or blob[:, -1].any()
        if touches:
            raise DiscNotFound("the bright region is cut by the detector edge: the disc is mostly off the detector")
        raise DiscNotFound("the bright region is not disc-shaped")
    return row, col, radius, f, b


def _levels(img, dist, radius, band) -> tuple[float, float]:
    inner = dist < radius - band
    ring = (dist > radius + band) & (dist < radius + band + max(6.0, 0.1 * radius))
    if inner.sum() < 5 or ring.sum() < 5:
        raise DiscNotFound("the disc is too small or too close to the detector edge to measure its levels")
    return float(img[inner].mean()), float(img[ring].mean())


def _refine_moments(img, row, col, radius, band, n_iter=4):
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    f = b = 0.0
    for _ in range(n_iter):
        dist = np.hypot(yy - row, xx - col)
        f, b = _levels(img, dist, radius, band)
        if f <= b:
            raise DiscNotFound("the disc is not brighter than its surroundings")
        wgt = np.where(dist < radius - band, 1.0, (img - b) / (f - b))
        wgt[dist > radius + band] = 0.0
        area = float(wgt.sum())
        if area <= 0:
            raise DiscNotFound("the refined disc area is not positive")
        row = float((wgt * yy).sum() / area)
        col = float((wgt * xx).sum() / area)
        radius = math.sqrt(area / math.pi)
    return row, col, radius, f, b


def _refine_edge_fit(img, row, col, radius, band):
    """Circle fit to the edge for a disc cut by the detector border."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    sm = ndimage.gaussian_filter(img, 1.0, mode="nearest")
    gy = ndimage.sobel(sm, axis=0, mode="nearest")
    gx = ndimage.sobel(sm, axis=1, mode="nearest")
    g = np.hypot(gx, gy)
    for bw in (max(2.0 * band, 0.4 * radius), 2.0 * band, band):
        dist = np.hypot(yy - row, xx - col)
        sel = (np.abs(dist - radius) <= bw) & (yy >= 3) & (yy < h - 3) & (xx >= 3) & (xx < w - 3)
        if sel.sum() < 20:
            raise DiscNotFound("too little of the disc edge is on the detector")
        ang = np.arctan2(yy[sel] - row, xx[sel] - col)
        hist = np.histogram(ang, bins=36, range=(-math.pi, math.pi))[0]
        if np.count_nonzero(hist) < 18:
            raise DiscNotFound("less than half of the disc edge is on the detector")
        wt = g[sel] ** 2
        x, y = xx[sel].astype(np.float64), yy[sel].astype(np.float64)
        a = np.stack([x, y, np.ones_like(x)], axis=1) * np.sqrt(wt)[:, None]
        rhs = -(x * x + y * y) * np.sqrt(wt)
        (dd, ee, ff), *_ = np.linalg.lstsq(a, rhs, rcond=None)
        col, row = -dd / 2.0, -ee / 2.0
        r2 = col * col + row * row - ff
        if not r2 > 0:
            raise DiscNotFound("the edge does not fit a circle")
        radius = math.sqrt(r2)
    dist = np.hypot(yy - row, xx - col)
    f, b = _levels(img, dist, radius, band)
    return float(row), float(col), float(radius), f, b


def find_disc(frames: np.ndarray) -> DiscFit:
    """Locate the bright-field disc in ``frames``.

    Args:
        frames: (n, det_y, det_x) of any real dtype (a single (det_y, det_x) frame is
            accepted too); summed before fitting, so many sparse frames work as well as a
            few bright ones.

    Returns:
        DiscFit with centre (row, col) px, radius px, the number of frames and the contrast.

    Raises:
        DiscNotFound (a ValueError) with the reason: flat frames, no background, no
        disc-shaped bright region, the disc (centre) off the detector, too little edge.
    """
    a = np.asarray(frames)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] < 1:
        raise ValueError(f"frames must be (n, det_y, det_x), got shape {np.shape(frames)}")
    img = _clean(a.sum(axis=0, dtype=np.float64))
    row, col, radius, _, _ = _detect(img)
    h, w = img.shape
    for _ in range(2):
        band = 4.0 + 0.05 * radius
        clipped = row - radius - band - 12 < 0 or col - radius - band - 12 < 0 or \
            row + radius + band + 12 > h - 1 or col + radius + band + 12 > w - 1
        if clipped:
            row, col, radius, f, b = _refine_edge_fit(img, row, col, radius, band)
        else:
            row, col, radius, f, b = _refine_moments(img, row, col, radius, band)
    if not (0 <= row <= h - 1 and 0 <= col <= w - 1):
        raise DiscNotFound(f"the fitted disc centre ({row:.1f}, {col:.1f}) is off the detector {img.shape}")
    contrast = (f - b) / f if f > 0 else 0.0
    return DiscFit(center_px=(row, col), radius_px=radius, n_frames=int(a.shape[0]), contrast=float(contrast))
