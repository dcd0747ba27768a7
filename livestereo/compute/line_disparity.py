"""Refine a disparity map along detected dislocation lines (pure numpy/scipy/scikit-image).

Physics: a dislocation is a smooth 3D curve, so its disparity (beta * dz / p, E4) is a
smooth function of arc length along its projection.  Stereo matching determines the
disparity of a line only across the epipolar direction: where the line runs at an angle
alpha to the baseline u, a perpendicular matching error e becomes a disparity error
~ e / sin(alpha) (a line along u maps onto itself in the other view: disparity is
undetermined there).  The inverse variance of a local measurement is therefore ~ sin^2 alpha.

:func:`refine_line_disparity`:

1. skeletonise ``prob >= threshold`` (view 0), build the m-adjacency pixel graph (a
   diagonal step counts only where no 4-neighbour path exists), remove junction pixels
   (degree >= 3: crossings, branch points: the crossing lines' disparities mix there) and
   order every remaining chain by arc length (a closed loop is cut at one pixel);
2. per skeleton pixel: tangent (chord over +-``tangent_px`` along the chain) and the
   inverse variance w = cond * prob / sigma^2 with cond = ((sin^2 alpha + cond_floor) /
   (1 + cond_floor)) ** weight_power and sigma the network's sigma_disparity (px; the
   network's sigma already grows along the baseline, so the floor keeps the geometric
   factor from counting the ambiguity twice);
3. fit the disparity along each chain by robust (Tukey biweight) local-linear regression
   in arc length with an information-adaptive window: at every pixel the smallest
   half-width from ``min_halfwidth_px`` to ``max_halfwidth_px`` whose fit has a standard
   error below ``target_sigma_px`` (else the one with the smallest); poorly determined
   stretches borrow from the well-determined parts of the same line (linear
   interpolation in arc length), and gross mismatches (high sigma, large residual) are
   replaced;
4. average fit and pixel by inverse variance (the fit's variance inflated by
   ``fit_var_inflation``: network errors are correlated along a line) and add the
   correction (new - old value of the skeleton pixel) to the skeleton pixel and to every
   pixel within ``radius_px`` whose nearest refined skeleton pixel it is; the rest of the
   map is returned unchanged.

Units and axes: maps are (ny, nx) = (row, col) on view 0's scan grid; disparity and all
lengths are in scan px; angles (theta_x, theta_y) in mrad, the baseline direction
u = (theta_1 - theta_0) / |theta_1 - theta_0| as (x, y) = (col, row) components.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra
from skimage.morphology import skeletonize

__all__ = ["LineDisparityParams", "line_chains", "refine_line_disparity", "smooth_chain_values"]

_OFFS4 = ((-1, 0), (1, 0), (0, -1), (0, 1))
_OFFSD = ((-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclasses.dataclass(frozen=True)
class LineDisparityParams:
    """Parameters of :func:`refine_line_disparity` (lengths in scan px)."""

    threshold: float = 0.5
    """Probability above which a pixel belongs to a line."""
    tangent_px: int = 3
    """Tangent = chord between the chain points this many pixels before and after."""
    target_sigma_px: float = 0.1
    """A fit window grows until the fit's standard error at the pixel is below this (px)."""
    min_halfwidth_px: int = 4
    """Smallest half-width (chain pixels) of the local-linear window."""
    max_halfwidth_px: int = 32
    """Largest half-width (chain pixels)."""
    junction_px: float = 0.0
    """Pixels within this distance of a junction pixel get zero weight (mixed disparities)."""
    min_chain_px: int = 6
    """Chains shorter than this are left alone."""
    robust_iters: int = 2
    """Tukey-biweight re-weighting passes after the first fit (0: plain least squares)."""
    robust_scale_px: float = 1.0
    """Residual scale (px) of the Tukey biweight: c = robust_c * robust_scale_px."""
    robust_c: float = 3.0
    """Tukey biweight constant in units of robust_scale_px (residuals beyond get weight 0)."""
    weight_power: float = 1.0
    """Conditioning weight = ((sin^2 alpha + cond_floor) / (1 + cond_floor)) ** weight_power."""
    cond_floor: float = 0.2
    """See weight_power."""
    use_sigma: bool = True
    """Use the network's sigma_disparity (when given) as the per-pixel error scale."""
    sigma_ref_px: float = 0.5
    """Per-pixel disparity sigma (px) of a pixel across the baseline when no sigma map is used."""
    fit_var_inflation: float = 4.0
    """The fit's variance from the weights assumes independent pixel errors; the network's
    errors are correlated along a line over several px, so it is multiplied by this
    before the fit and the pixel's own value are averaged by inverse variance."""
    write_delta: bool = True
    """Neighbours get their own value plus the skeleton pixel's correction (else its value)."""
    radius_px: float = 2.5
    """Write the refined values onto pixels within this distance of a refined skeleton pixel."""


# --------------------------------------------------------------------------------------
# skeleton chains


def line_chains(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Skeleton of a binary line mask split at junctions into ordered chains.

    Args:
        mask: (ny, nx) bool line mask.

    Returns:
        (rc, arc, start, junctions): rc (n, 2) int64 (row, col) of the chain pixels, chain
        after chain, each ordered along the line; arc (n,) float64 arc length (px) from the
        chain's first pixel; start (m + 1,) int64 offsets (chain c is rc[start[c]:start[c+1]]);
        junctions (j, 2) int64 (row, col) of the removed junction pixels (degree >= 3).
    """
    sk = skeletonize(np.asarray(mask, dtype=bool))
    empty = (np.zeros((0, 2), np.int64), np.zeros(0), np.zeros(1, np.int64), np.zeros((0, 2), np.int64))
    if not sk.any():
        return empty
    ny, nx = sk.shape
    S = np.zeros((ny + 2, nx + 2), dtype=bool)
    S[1:-1, 1:-1] = sk
    coords = np.argwhere(sk)
    n = len(coords)
    idx = -np.ones((ny + 2, nx + 2), dtype=np.int64)
    r, c = coords[:, 0] + 1, coords[:, 1] + 1
    idx[r, c] = np.arange(n)
    src, dst, wt = [], [], []
    for dr, dc in _OFFS4:
        j = idx[r + dr, c + dc]
        m = j >= 0
        src.append(np.nonzero(m)[0]); dst.append(j[m]); wt.append(np.ones(int(m.sum())))
    for dr, dc in _OFFSD:
        j = idx[r + dr, c + dc]
        m = (j >= 0) & ~S[r + dr, c] & ~S[r, c + dc]
        src.append(np.nonzero(m)[0]); dst.append(j[m]); wt.append(np.full(int(m.sum()), math.sqrt(2.0)))
    src, dst, wt = np.concatenate(src), np.concatenate(dst), np.concatenate(wt)
    deg = np.bincount(src, minlength=n)
    junc = deg >= 3
    keep = ~junc[src] & ~junc[dst]
    src, dst, wt = src[keep], dst[keep], wt[keep]
    # closed loops (components without an end point): drop their lowest-index pixel
    ncomp, lab = connected_components(coo_matrix((wt, (src, dst)), shape=(n, n)), directed=False)
    deg2 = np.bincount(src, minlength=n)
    has_end = np.zeros(ncomp, bool)
    has_end[lab[~junc & (deg2 == 1)]] = True
    loop = ~junc & (deg2 > 0) & ~has_end[lab]
    if loop.any():
        first = np.full(ncomp, n, np.int64)
        np.minimum.at(first, lab[loop], np.nonzero(loop)[0])
        cut = np.zeros(n, bool)
        cut[first[first < n]] = True
        keep = ~cut[src] & ~cut[dst]
        src, dst, wt = src[keep], dst[keep], wt[keep]
        deg2 = np.bincount(src, minlength=n)
        ncomp, lab = connected_components(coo_matrix((wt, (src, dst)), shape=(n, n)), directed=False)
    ends = np.nonzero(~junc & (deg2 == 1))[0]
    if ends.size == 0:
        return empty[0], empty[1], empty[2], coords[junc]
    # one source per chain: its lowest-index end point; arc length = graph distance from it
    src_of = np.full(ncomp, n, np.int64)
    np.minimum.at(src_of, lab[ends], ends)
    sources = src_of[src_of < n]
    G = coo_matrix((wt, (src, dst)), shape=(n, n)).tocsr()
    dist = dijkstra(G, directed=False, indices=sources, min_only=True)
    nodes = np.nonzero(np.isfinite(dist) & (deg2 > 0))[0]
    nodes = nodes[np.lexsort((dist[nodes], lab[nodes]))]
    lab_s = lab[nodes]
    brk = np.nonzero(np.diff(lab_s))[0] + 1
    start = np.concatenate([[0], brk, [len(nodes)]]).astype(np.int64)
    return coords[nodes], dist[nodes], start, coords[junc]


# --------------------------------------------------------------------------------------
# fit along chains


def _halfwidths(lo: int, hi: int) -> np.ndarray:
    """Candidate half-widths lo .. hi, growing by ~1.4x."""
    h = [max(1, int(lo))]
    while h[-1] < hi:
        h.append(min(int(hi), max(h[-1] + 1, int(round(h[-1] * 1.4)))))
    return np.array(h, np.int64)


def smooth_chain_values(arc: np.ndarray, y: np.ndarray, w: np.ndarray, start: np.ndarray,
                        params: LineDisparityParams = LineDisparityParams()) -> tuple[np.ndarray, np.ndarray]:
    """Robust, information-adaptive local-linear fit of y(arc) along every chain.

    Args:
        arc: (n,) arc length (px) of each sample from its chain's start, increasing within a chain.
        y: (n,) values (px of disparity); NaN = unknown (weight 0).
        w: (n,) inverse variances (px^-2) of the samples (0: no information).
        start: (m + 1,) chain offsets (chain c is samples start[c]:start[c+1]).
        params: :class:`LineDisparityParams` (target_sigma_px, min/max_halfwidth_px,
            robust_iters, robust_c, robust_scale_px).

    Returns:
        (fit (n,), var (n,)) float64: the fitted values and their variance (px^2) from the
        weights, 1/S0 + (s - s_mean)^2 / Sss over the chosen window: the smallest half-width
        with a standard error below target_sigma_px, else the one with the least variance;
        fit NaN and var inf where no window has two distinct weighted samples.
    """
    arc = np.asarray(arc, np.float64)
    y = np.asarray(y, np.float64)
    n = len(arc)
    fit = np.full(n, np.nan)
    var = np.full(n, np.inf)
    if n == 0:
        return fit, var
    start = np.asarray(start, np.int64)
    cid = np.repeat(np.arange(len(start) - 1), np.diff(start))
    a, b = start[:-1][cid], start[1:][cid] - 1  # chain bounds (inclusive) per sample
    good = np.isfinite(y) & np.isfinite(w) & (w > 0)
    w0 = np.where(good, w, 0.0)
    y0 = np.where(good, y, 0.0)
    i = np.arange(n)
    hs = _halfwidths(params.min_halfwidth_px, params.max_halfwidth_px)
    L = np.clip(i[None, :] - hs[:, None], a[None, :], None)  # (H, n) window bounds
    R = np.clip(i[None, :] + hs[:, None], None, b[None, :]) + 1
    vmax = params.target_sigma_px ** 2

    def csum(v):
        return np.concatenate([[0.0], np.cumsum(v)])

    rw = np.ones(n)
    for it in range(params.robust_iters + 1):
        ww = w0 * rw
        P0, P1, P2 = csum(ww), csum(ww * arc), csum(ww * arc * arc)
        Q0, Q1 = csum(ww * y0), csum(ww * arc * y0)
        S0 = P0[R] - P0[L]
        with np.errstate(invalid="ignore", divide="ignore"):
            sm = (P1[R] - P1[L]) / S0  # weighted mean arc in the window
            Sss = (P2[R] - P2[L]) - S0 * sm * sm
            V = 1.0 / S0 + (arc[None, :] - sm) ** 2 / Sss
        V = np.where((S0 > 0) & (Sss > 1e-6 * np.maximum(S0, 1e-300)), V, np.inf)
        sat = V <= vmax
        k = np.where(sat.any(0), sat.argmax(0), np.argmin(V, axis=0))
        var = np.take_along_axis(V, k[None], 0)[0]
        l, r = L[k, i], R[k, i]
        s0 = P0[r] - P0[l]
        s1 = P1[r] - P1[l]
        s2 = P2[r] - P2[l]
        t0 = Q0[r] - Q0[l]
        t1 = Q1[r] - Q1[l]
        with np.errstate(invalid="ignore", divide="ignore"):
            m = s1 / s0
            sss = s2 - s0 * m * m
            ym = t0 / s0
            slope = (t1 - m * t0) / sss  # sum w (s - m)(y - ym)
            f = ym + slope * (arc - m)
        fit = np.where(np.isfinite(var), f, np.nan)
        if it < params.robust_iters:
            c = params.robust_c * params.robust_scale_px
            res = np.where(np.isfinite(fit) & good, (y0 - fit) / c, 0.0)
            rw = np.where(np.abs(res) < 1.0, (1.0 - res * res) ** 2, 0.0)
    return fit, var


def _tangent_sin2(rc: np.ndarray, start: np.ndarray, u_xy: np.ndarray, k: int) -> np.ndarray:
    """sin^2 of the angle between each chain pixel's tangent (chord +-k pixels) and u."""
    n = len(rc)
    cid = np.repeat(np.arange(len(start) - 1), np.diff(start))
    i = np.arange(n)
    lo = np.maximum(i - k, start[:-1][cid])
    hi = np.minimum(i + k, start[1:][cid] - 1)
    t = (rc[hi] - rc[lo]).astype(np.float64)  # (drow, dcol)
    tx, ty = t[:, 1], t[:, 0]
    nn = tx * tx + ty * ty
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (tx * u_xy[0] + ty * u_xy[1]) ** 2 / nn
    return np.where(nn > 0, 1.0 - c, 0.0)


# --------------------------------------------------------------------------------------
# main entry


def refine_line_disparity(disparity, prob, thetas_mrad, *, sigma_disparity=None, valid=None,
                          params: LineDisparityParams | None = None) -> np.ndarray:
    """Disparity map with the values on and near detected lines refined along each line.

    Args:
        disparity: (ny, nx) disparity of views (0, 1) in px along the baseline, on view 0's
            scan grid (position in view 0 minus view 1); NaN = unknown.
        prob: (ny, nx) line probability of view 0, or (K, ny, nx) (view 0 is used).
        thetas_mrad: (K >= 2, 2) incident angles (theta_x, theta_y) mrad; the baseline
            direction is u = (theta_1 - theta_0) / |theta_1 - theta_0| (x = col, y = row).
        sigma_disparity: optional (ny, nx) disparity sigma (px), used when params.use_sigma.
        valid: optional (ny, nx) bool scanned positions (lines outside are not detected).
        params: :class:`LineDisparityParams`.

    Returns:
        (ny, nx) array of disparity's dtype (float32 for float32 input; float64 for integer
        input): a copy in which the skeleton pixels of the lines and the pixels within
        params.radius_px of them are corrected (px); every other pixel, and every NaN of
        the input, is unchanged.  Without lines (or with a zero baseline) an unchanged copy.

    Raises:
        ValueError: prob and disparity of different shapes, or thetas_mrad not (K >= 2, 2).
    """
    params = params or LineDisparityParams()
    d = np.asarray(disparity)
    out = np.array(d, dtype=d.dtype if np.issubdtype(d.dtype, np.floating) else np.float64, copy=True)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 3:
        p = p[0]
    if p.shape != d.shape or d.ndim != 2:
        raise ValueError(f"prob {np.shape(prob)} and disparity {d.shape} must be (ny, nx) maps of one shape")
    th = np.asarray(thetas_mrad, dtype=np.float64)
    if th.ndim != 2 or th.shape[0] < 2 or th.shape[1] != 2:
        raise ValueError(f"thetas_mrad must be (K >= 2, 2), got {th.shape}")
    base = th[1] - th[0]
    nb = math.hypot(base[0], base[1])
    if not (nb > 0 and math.isfinite(nb)):
        return out
    u = base / nb
    p = np.where(np.isfinite(p), p, 0.0)
    mask = p >= params.threshold
    if valid is not None:
        mask &= np.asarray(valid, dtype=bool)
    if not mask.any():
        return out
    rc, arc, start, junc = line_chains(mask)
    if len(rc) == 0:
        return out
    # drop short chains
    lens = np.diff(start)
    keepc = lens >= max(params.min_chain_px, 2)
    if not keepc.all():
        sel = np.repeat(keepc, lens)
        rc, arc = rc[sel], arc[sel]
        start = np.concatenate([[0], np.cumsum(lens[keepc])]).astype(np.int64)
        if len(rc) == 0:
            return out
    y = d[rc[:, 0], rc[:, 1]].astype(np.float64)
    w = _tangent_sin2(rc, start, u, params.tangent_px)
    w = ((w + params.cond_floor) / (1.0 + params.cond_floor)) ** params.weight_power
    w = w * p[rc[:, 0], rc[:, 1]]
    if params.use_sigma and sigma_disparity is not None:
        s = np.asarray(sigma_disparity, dtype=np.float64)[rc[:, 0], rc[:, 1]]
        oks = np.isfinite(s) & (s > 0)
        w = w * np.where(oks, 1.0 / np.where(oks, s, 1.0) ** 2, 0.0)
    else:
        w = w / params.sigma_ref_px ** 2
    if len(junc) and params.junction_px > 0:
        jm = np.zeros(d.shape, bool)
        jm[junc[:, 0], junc[:, 1]] = True
        near = ndimage.distance_transform_edt(~jm)[rc[:, 0], rc[:, 1]] <= params.junction_px
        w = np.where(near, 0.0, w)
    fit, var = smooth_chain_values(arc, y, w, start, params)
    # inverse-variance average of the fit and the pixel's own value
    ok = np.isfinite(y) & np.isfinite(fit) & np.isfinite(var)
    if not ok.any():
        return out
    wf = 1.0 / (params.fit_var_inflation * np.maximum(var[ok], 1e-12))
    wy = np.where(np.isfinite(w[ok]), w[ok], 0.0)
    new = (wf * fit[ok] + wy * y[ok]) / (wf + wy)
    rc = rc[ok]
    val = new - y[ok] if params.write_delta else new
    # every pixel within radius_px of a refined skeleton pixel gets the correction (or the
    # value) of the nearest one
    # (offsets written farthest first, so the nearest skeleton pixel's write is the last)
    ny, nx = d.shape
    ri = int(math.floor(params.radius_px))
    oy, ox = np.mgrid[-ri:ri + 1, -ri:ri + 1]
    od = np.hypot(oy, ox).ravel()
    sel = od <= params.radius_px
    order = np.argsort(-od[sel], kind="stable")
    best = np.full(d.shape, -1, np.int64)
    for dy, dx in zip(oy.ravel()[sel][order], ox.ravel()[sel][order]):
        yy, xx = rc[:, 0] + dy, rc[:, 1] + dx
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        best[yy[inside], xx[inside]] = np.nonzero(inside)[0]
    put = (best >= 0) & np.isfinite(out)
    src = best[put]
    if params.write_delta:
        out[put] = out[put] + val[src]
    else:
        out[put] = val[src]
    return out
