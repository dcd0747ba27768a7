"""Pixelated-detector frames: the BF disc of every scan position, with counting noise.

The physics per scan position r is I(r, theta) for every detector pixel inside the disc. It is
sampled on a grid of angle bins across the disc (``SimConfig.angle_bins`` per diameter): one
noise-free view per bin (:func:`livestereo.sim.render.render_views`), then each detector pixel
takes the bilinear mix of its four neighbouring bins' values at r, times its share of the
dose, plus dark-field background, with Poisson noise. The detector MTF is approximated by a
Gaussian blur of the disc edge (the disc interior is smooth on the scale of the MTF).

Arrays: frames (count, det_y, det_x) in ``cfg.dtype``; bin views (n_positions, n_bins) float32
with the flat scan index ``row * nx + col``; angles (theta_x, theta_y) mrad in scan axes.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
from scipy.ndimage import gaussian_filter

from livestereo.sim.config import SimConfig


def dtype_max(dtype: str) -> int:
    """Largest count a frame pixel of ``dtype`` holds."""
    return int(np.iinfo(np.dtype(dtype)).max)


def bin_grid(alpha_mrad: float, n_bins: int) -> np.ndarray:
    """(n_bins * n_bins, 2) centres (theta_x, theta_y) (mrad) of the angle bins; bin b = iy * n + ix."""
    c = -alpha_mrad + (np.arange(n_bins) + 0.5) * (2.0 * alpha_mrad / n_bins)
    tx, ty = np.meshgrid(c, c, indexing="xy")
    return np.stack([tx.ravel(), ty.ravel()], axis=1)


def bilinear_bins(theta: np.ndarray, alpha_mrad: float, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins (n, 4) int32 and weights (n, 4) of a bilinear interpolation at angles (n, 2) (mrad),
    clamped at the outermost bin centres."""
    step = 2.0 * alpha_mrad / n_bins
    f = (np.asarray(theta, dtype=np.float64) + alpha_mrad) / step - 0.5
    f = np.clip(f, 0.0, n_bins - 1.0)
    i0 = np.minimum(np.floor(f).astype(np.int64), n_bins - 2) if n_bins > 1 else np.zeros_like(f, dtype=np.int64)
    w1 = f - i0
    w0 = 1.0 - w1
    ix, iy = i0[:, 0], i0[:, 1]
    bins = np.stack([iy * n_bins + ix, iy * n_bins + ix + 1, (iy + 1) * n_bins + ix, (iy + 1) * n_bins + ix + 1], axis=1)
    w = np.stack([w0[:, 1] * w0[:, 0], w0[:, 1] * w1[:, 0], w1[:, 1] * w0[:, 0], w1[:, 1] * w1[:, 0]], axis=1)
    return bins.astype(np.int32), w


def detector_theta(rows: np.ndarray, cols: np.ndarray, center: tuple[float, float], mrad_per_px: float,
                   rotation_deg: float) -> np.ndarray:
    """(..., 2) incident angles (theta_x, theta_y) (mrad, scan axes) of detector pixels (row, col);
    the same mapping as ``Calibration.theta_of_pixel``."""
    dx = (np.asarray(cols, dtype=np.float64) - center[1]) * mrad_per_px
    dy = (np.asarray(rows, dtype=np.float64) - center[0]) * mrad_per_px
    phi = math.radians(rotation_deg)
    c, s = math.cos(phi), math.sin(phi)
    return np.stack([c * dx - s * dy, s * dx + c * dy], axis=-1)


def disc_weight(shape: tuple[int, int], center: tuple[float, float], radius_px: float, mtf_sigma_px: float,
                supersample: int = 4) -> np.ndarray:
    """(h, w) fraction of each pixel inside the disc, blurred by the MTF (Gaussian sigma, px)."""
    h, w = shape
    pad = int(math.ceil(4 * mtf_sigma_px)) + 1
    H, W = h + 2 * pad, w + 2 * pad
    o = (np.arange(supersample) + 0.5) / supersample - 0.5
    rows = (np.arange(H) - pad)[:, None] + o[None, :]  # (H, ss)
    cols = (np.arange(W) - pad)[:, None] + o[None, :]
    dy2 = (rows - center[0]) ** 2
    dx2 = (cols - center[1]) ** 2
    inside = (dy2[:, :, None, None] + dx2[None, None, :, :]) <= radius_px ** 2  # (H, ss, W, ss)
    frac = inside.mean(axis=(1, 3))
    if mtf_sigma_px > 0:
        frac = gaussian_filter(frac, mtf_sigma_px, mode="constant")
    return frac[pad:pad + h, pad:pad + w]


def bf_profile(theta: np.ndarray, alpha_mrad: float, falloff: float) -> np.ndarray:
    """Relative BF illumination 1 - f (|theta| / alpha)^2 (>= 0) at angles (..., 2) (mrad)."""
    r2 = np.sum(np.asarray(theta) ** 2, axis=-1) / alpha_mrad ** 2
    return np.clip(1.0 - falloff * r2, 0.0, None)


def counts_norm(cfg: SimConfig) -> float:
    """Expected counts per detector pixel at the disc centre for T = 1 (electrons / px)."""
    R = cfg.disc_radius_px
    return cfg.electrons_per_position / (math.pi * R * R * (1.0 - cfg.disc_edge_falloff / 2.0))


@dataclasses.dataclass
class PixelatedModel:
    """Precomputed detector geometry of a pixelated run (see module docstring)."""

    frame_shape: tuple[int, int]
    bin_thetas_mrad: np.ndarray
    """(n_bins, 2) angles (mrad) of the bins that are rendered (only those some pixel uses)."""
    in_idx: np.ndarray
    """(m,) flat detector indices of the pixels that get BF signal."""
    in_bins: np.ndarray
    """(m, 4) int32 indices into ``bin_thetas_mrad``."""
    in_w: np.ndarray
    """(m, 4) float32 expected counts per unit transmission from each bin."""
    in_bg: np.ndarray
    """(m,) float32 expected background counts on those pixels."""
    out_idx: np.ndarray
    """(q,) flat detector indices of the pixels with background only."""
    bg_out_mean: float
    """Expected background counts per frame summed over ``out_idx``."""
    disc_weight: np.ndarray
    """(h, w) disc fraction per pixel (MTF blurred)."""
    pixel_theta_mrad: np.ndarray
    """(h, w, 2) incident angle of each pixel (mrad, scan axes)."""


def pixelated_model(cfg: SimConfig) -> PixelatedModel:
    """Geometry and weights of the pixelated detector described by ``cfg``."""
    h, w = cfg.frame_shape
    alpha = cfg.convergence_semiangle_mrad
    center = cfg.center_px
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    theta = detector_theta(rows, cols, center, cfg.mrad_per_px, cfg.scan_rotation_deg)
    dw = disc_weight((h, w), center, cfg.disc_radius_px, cfg.mtf_sigma_px)
    prof = bf_profile(theta, alpha, cfg.disc_edge_falloff)
    flat_w = dw.ravel()
    in_idx = np.flatnonzero(flat_w > 1e-3)
    out_idx = np.flatnonzero(flat_w <= 1e-3)
    bins, bw = bilinear_bins(theta.reshape(-1, 2)[in_idx], alpha, cfg.angle_bins)
    used, inverse = np.unique(bins.ravel(), return_inverse=True)
    grid = bin_grid(alpha, cfg.angle_bins)
    lam = counts_norm(cfg) * flat_w[in_idx] * prof.ravel()[in_idx]
    return PixelatedModel(
        frame_shape=(h, w), bin_thetas_mrad=grid[used],
        in_idx=in_idx.astype(np.int64), in_bins=inverse.reshape(bins.shape).astype(np.int32),
        in_w=(lam[:, None] * bw).astype(np.float32),
        in_bg=(cfg.dark_field_background * (1.0 - flat_w[in_idx])).astype(np.float32),
        out_idx=out_idx.astype(np.int64), bg_out_mean=float(cfg.dark_field_background * len(out_idx)),
        disc_weight=dw, pixel_theta_mrad=theta,
    )


@numba.njit(cache=True, nogil=True)
def _frame_seed(base, pos):
    return (base + pos * 2654435761) % 4294967296


@numba.njit(cache=True, nogil=True)
def _pixelated_frames(out, views, first, in_idx, in_bins, in_w, in_bg, out_idx, bg_out_mean, seed_base, maxval):
    """out (count, h*w): Poisson frames of scan positions first .. first+count-1."""
    count = out.shape[0]
    m = in_idx.shape[0]
    q = out_idx.shape[0]
    for f in range(count):
        pos = first + f
        np.random.seed(_frame_seed(seed_base, pos))
        fr = out[f]
        fr[:] = 0
        v = views[pos]
        for j in range(m):
            lam = (in_w[j, 0] * v[in_bins[j, 0]] + in_w[j, 1] * v[in_bins[j, 1]]
                   + in_w[j, 2] * v[in_bins[j, 2]] + in_w[j, 3] * v[in_bins[j, 3]] + in_bg[j])
            if lam > 0.0:
                c = np.random.poisson(lam)
                fr[in_idx[j]] = c if c < maxval else maxval
        if bg_out_mean > 0.0 and q > 0:
            nb = np.random.poisson(bg_out_mean)
            for _ in range(nb):
                k = out_idx[np.random.randint(0, q)]
                if fr[k] < maxval:
                    fr[k] += 1


def pixelated_frames(model: PixelatedModel, views: np.ndarray, first: int, count: int, seed_base: int,
                     dtype: str) -> np.ndarray:
    """Frames (count, h, w) ``dtype`` for flat scan positions first .. first+count-1.

    ``views`` (n_positions, n_bins) float32: transmission of every bin at every position.
    Each frame's noise depends only on (seed_base, position): chunks are reproducible.
    """
    h, w = model.frame_shape
    out = np.empty((count, h * w), dtype=np.dtype(dtype))
    _pixelated_frames(out, views, int(first), model.in_idx, model.in_bins, model.in_w, model.in_bg,
                      model.out_idx, float(model.bg_out_mean), int(seed_base), dtype_max(dtype))
    return out.reshape(count, h, w)
