"""Segmented-detector values: N annular sectors around the disc, one count per segment.

Segment k is the annular sector inner <= |theta| < outer, centred at azimuth
``segment_rotation_deg + 360 k / N`` (detector axes, counter-clockwise from det_x). Its
value is the sum of the counts its area would collect; it is computed from the same angle
bins as the pixelated detector with analytic weights (a fine virtual pixel grid integrated
once), never by building frames: value = Poisson(sum_b W[k, b] T_b(r) + background_k).

Its effective angle is the BF-intensity-weighted mean incident angle over the segment: the
shift of a feature at dz in segment k's image is -theta_eff_k dz. Because the illumination
falls off towards the disc edge and the MTF spreads the edge, it is smaller than the
geometric centroid of the sector.
"""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np
from scipy.ndimage import gaussian_filter

from livestereo.sim.config import SimConfig
from livestereo.sim.pixelated import _frame_seed, bf_profile, bilinear_bins, bin_grid, counts_norm, dtype_max


def geometric_centroids(cfg: SimConfig) -> np.ndarray:
    """(N, 2) geometric centroids (theta_x, theta_y) (mrad, scan axes) of the annular sectors:
    r_c = 2/3 (r2^3 - r1^3) / (r2^2 - r1^2) sin(phi/2) / (phi/2) (design.md section 1)."""
    N = cfg.n_segments
    r1, r2 = cfg.segment_inner_mrad, cfg.outer_mrad
    phi = 2 * math.pi / N
    rc = 2.0 / 3.0 * (r2 ** 3 - r1 ** 3) / (r2 ** 2 - r1 ** 2) * math.sin(phi / 2) / (phi / 2)
    az = np.radians(cfg.segment_rotation_deg) + phi * np.arange(N)
    dx, dy = rc * np.cos(az), rc * np.sin(az)
    rot = math.radians(cfg.scan_rotation_deg)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([c * dx - s * dy, s * dx + c * dy], axis=1)


@dataclasses.dataclass
class SegmentedModel:
    """Weights of a segmented detector over the angle bins."""

    bin_thetas_mrad: np.ndarray
    """(n_bins, 2) angles (mrad) of the bins that are rendered."""
    weights: np.ndarray
    """(N, n_bins) expected counts per unit transmission of each bin."""
    background: np.ndarray
    """(N,) expected dark-field counts per frame."""
    effective_mrad: np.ndarray
    """(N, 2) intensity-weighted mean incident angle (mrad, scan axes)."""
    geometric_mrad: np.ndarray
    """(N, 2) geometric centroid of each sector (mrad, scan axes)."""
    bf_counts: np.ndarray
    """(N,) expected BF counts per frame at T = 1."""


def segmented_model(cfg: SimConfig, supersample: int = 4) -> SegmentedModel:
    """Integrate the segments on a virtual grid of pitch mrad_per_px / supersample."""
    alpha = cfg.convergence_semiangle_mrad
    N = cfg.n_segments
    r1, r2 = cfg.segment_inner_mrad, cfg.outer_mrad
    pitch = cfg.mrad_per_px / supersample
    sig = cfg.mtf_sigma_px * supersample  # virtual px
    half = max(r2, alpha) + 4 * sig * pitch + 2 * pitch
    n = 2 * int(math.ceil(half / pitch)) + 1
    ax = (np.arange(n) - (n - 1) / 2) * pitch
    dy, dx = np.meshgrid(ax, ax, indexing="ij")  # detector-plane offsets (mrad) from the disc centre
    r = np.hypot(dx, dy)
    disc = np.clip((alpha - r) / pitch + 0.5, 0.0, 1.0)
    if sig > 0:
        disc = gaussian_filter(disc, sig, mode="constant")
    rot = math.radians(cfg.scan_rotation_deg)
    c, s = math.cos(rot), math.sin(rot)
    theta = np.stack([c * dx - s * dy, s * dx + c * dy], axis=-1)
    lam = counts_norm(cfg) * disc * bf_profile(theta, alpha, cfg.disc_edge_falloff) / supersample ** 2
    az = np.arctan2(dy, dx)
    width = 2 * math.pi / N
    t = np.mod(az - math.radians(cfg.segment_rotation_deg) + width / 2, 2 * math.pi) / width
    seg = np.minimum(np.floor(t).astype(int), N - 1)
    # grid points exactly on a boundary between segments count half to each side
    frac = t - np.floor(t)
    on_edge = (frac < 1e-9) | (frac > 1 - 1e-9)
    seg_lo = np.where(frac > 0.5, seg, (seg - 1) % N)
    seg_hi = np.where(frac > 0.5, (seg + 1) % N, seg)
    ann = (r >= r1) & (r < r2)
    bins, bw = bilinear_bins(theta.reshape(-1, 2), alpha, cfg.angle_bins)
    grid = bin_grid(alpha, cfg.angle_bins)
    nb_all = len(grid)
    W = np.zeros((N, nb_all))
    bg = np.zeros(N)
    eff = np.zeros((N, 2))
    bf = np.zeros(N)
    geo = geometric_centroids(cfg)
    flat_lam, flat_disc, flat_theta = lam.ravel(), disc.ravel(), theta.reshape(-1, 2)
    share = np.where(~on_edge, 1.0, 0.0)
    for k in range(N):
        member = np.where(on_edge, 0.5 * ((seg_lo == k) + (seg_hi == k)), share * (seg == k)) * ann
        sel = np.flatnonzero(member.ravel() > 0)
        lk = flat_lam[sel] * member.ravel()[sel]
        np.add.at(W[k], bins[sel].ravel(), (lk[:, None] * bw[sel]).ravel())
        bg[k] = cfg.dark_field_background * np.sum((1.0 - flat_disc[sel]) * member.ravel()[sel]) / supersample ** 2
        bf[k] = lk.sum()
        eff[k] = (lk[:, None] * flat_theta[sel]).sum(axis=0) / bf[k] if bf[k] > 0 else geo[k]
    used = np.flatnonzero(W.any(axis=0))
    if len(used) == 0:
        used = np.array([0])
    return SegmentedModel(bin_thetas_mrad=grid[used], weights=np.ascontiguousarray(W[:, used]), background=bg,
                          effective_mrad=eff, geometric_mrad=geo, bf_counts=bf)


@numba.njit(cache=True, nogil=True)
def _segmented_frames(out, views, first, W, bg, seed_base, maxval):
    count, N = out.shape
    nb = W.shape[1]
    for f in range(count):
        pos = first + f
        np.random.seed(_frame_seed(seed_base, pos))
        v = views[pos]
        for k in range(N):
            lam = bg[k]
            for b in range(nb):
                lam += W[k, b] * v[b]
            c = np.random.poisson(lam) if lam > 0.0 else 0
            out[f, k] = c if c < maxval else maxval


def segmented_frames(model: SegmentedModel, views: np.ndarray, first: int, count: int, seed_base: int,
                     dtype: str) -> np.ndarray:
    """Segment values (count, N) ``dtype`` for flat scan positions first .. first+count-1."""
    out = np.empty((count, model.weights.shape[0]), dtype=np.dtype(dtype))
    _segmented_frames(out, views, int(first), model.weights, model.background, int(seed_base), dtype_max(dtype))
    return out
