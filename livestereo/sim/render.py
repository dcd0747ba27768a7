"""Rendering virtual views of a :class:`~livestereo.sim.scene.Scene` (design.md section 1).

A view is what one incident angle theta (or a region of the disc) sees as the probe scans:
by E1/E2 a point at height dz = z - z_f appears at r = (x, y) - theta dz (theta in rad =
1e-3 x mrad). Each dislocation is a tube with a Gaussian profile (FWHM ``line_width_nm``);
its projection is splatted point by point (no voxels), giving the attenuation A(r) of the
view and the transmission T = exp(-A) x background (bend contours, thickness fringes).

Array conventions: images are (ny, nx) = (row, col); the scan position (row, col) sits at
(x, y) = (col p, row p) nm; angles are (theta_x, theta_y) in mrad; stacks of views are
(K, ny, nx); disparities are (ny, nx, 2) with the last axis (d_x, d_y) in px.

Everything here is deterministic and noise-free; the simulator adds the detector.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from livestereo.sim.scene import Scene

#: a line segment inclined to the beam gains contrast as 1/cos(inclination), capped here
INCLINATION_CAP = 2.5
_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


# ----------------------------------------------------------------------------- scene -> arrays

def _flatten(scene: Scene, max_spacing_nm: float):
    """Concatenated points (n, 3), unit tangents (n, 3), arc weights (n,), line index (n,)."""
    pts, tans, dss, idx = [], [], [], []
    for j, d in enumerate(scene.dislocations):
        P = np.asarray(d.points_nm, dtype=np.float64).reshape(-1, 3)
        if len(P) == 0:
            continue
        if len(P) == 1:
            pts.append(P)
            tans.append(np.array([[1.0, 0.0, 0.0]]))
            dss.append(np.array([1.0]))
            idx.append(np.array([j], dtype=np.int32))
            continue
        seg = np.linalg.norm(np.diff(P, axis=0), axis=1)
        if seg.max() > max_spacing_nm:
            s = np.concatenate([[0.0], np.cumsum(seg)])
            n = int(np.ceil(s[-1] / max_spacing_nm)) + 1
            t = np.linspace(0.0, s[-1], n)
            P = np.stack([np.interp(t, s, P[:, k]) for k in range(3)], axis=1)
            seg = np.linalg.norm(np.diff(P, axis=0), axis=1)
        ds = np.zeros(len(P))
        ds[:-1] += 0.5 * seg
        ds[1:] += 0.5 * seg
        T = np.empty_like(P)
        T[1:-1] = P[2:] - P[:-2]
        T[0] = P[1] - P[0]
        T[-1] = P[-1] - P[-2]
        if d.closed and len(P) > 2:
            T[0] = T[-1] = P[1] - P[-2]
        T /= np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
        pts.append(P)
        tans.append(T)
        dss.append(ds)
        idx.append(np.full(len(P), j, dtype=np.int32))
    if not pts:
        return np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, dtype=np.int32)
    return np.concatenate(pts), np.concatenate(tans), np.concatenate(dss), np.concatenate(idx)


def _region_samples(radius_mrad: float, n: int, rotation: float) -> np.ndarray:
    """(n, 2) quasi-uniform offsets (mrad) filling a disc of ``radius_mrad`` (sunflower)."""
    if n <= 1 or radius_mrad <= 0:
        return np.zeros((1, 2))
    k = np.arange(n)
    r = radius_mrad * np.sqrt((k + 0.5) / n)
    a = k * math.pi * (3.0 - math.sqrt(5.0)) + rotation
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def contrast_factors(scene: Scene, thetas_mrad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-line contrast multipliers at incident angles ``thetas_mrad`` (..., 2) (mrad).

    Returns ``strength`` and ``asymmetry``, each (..., n_lines): the line's attenuation is
    scaled by strength (negative: a bright line) and its profile skewed by asymmetry (the
    part of the profile proportional to the signed distance across the line, in sigma units).
    The excitation error changes along g, so both vary with g . theta.
    """
    th = np.asarray(thetas_mrad, dtype=np.float64)
    n = len(scene.dislocations)
    base = np.array([d.contrast_strength for d in scene.dislocations], dtype=np.float64)
    phase = np.array([d.contrast_phase for d in scene.dislocations], dtype=np.float64)
    gt = th @ np.asarray(scene.g_direction, dtype=np.float64)
    arg = 2 * math.pi * gt[..., None] / scene.contrast_period_mrad + phase
    v = scene.contrast_variation
    strength = base * (1.0 + v * np.cos(arg))
    asym = np.clip(0.3 * v * np.sin(arg), -0.3, 0.3)
    if n == 0:
        strength = np.zeros(th.shape[:-1] + (0,))
        asym = strength
    return strength, asym


def _background_arrays(scene: Scene):
    bg = scene.background
    return (np.ascontiguousarray(bg.bend_k, dtype=np.float64), np.ascontiguousarray(bg.bend_amp, dtype=np.float64),
            np.ascontiguousarray(bg.bend_phase, dtype=np.float64),
            np.array([bg.bend_level, bg.bend_width, bg.bend_shift, bg.fringe_shift, bg.alpha_ref_mrad,
                      scene.bend_contours, scene.thickness_fringes], dtype=np.float64),
            np.ascontiguousarray(bg.fringe_k, dtype=np.float64), np.ascontiguousarray(bg.fringe_amp, dtype=np.float64),
            np.ascontiguousarray(bg.fringe_phase, dtype=np.float64))


# ------------------------------------------------------------------------------------ kernels

@numba.njit(cache=True, nogil=True, fastmath=True)
def _splat(A, P, T, ds, didx, tx, ty, strength, asym, focus, p, sigma, cap, kappa, row_off, max_oy, weight0):
    """Add the attenuation of every point, seen at angle (tx, ty) (rad), to A (ny, nx)."""
    ny, nx = A.shape
    R = 3.5 * sigma
    inv2s2 = 0.5 / (sigma * sigma)
    for i in range(P.shape[0]):
        j = didx[i]
        st = strength[j]
        if st == 0.0:
            continue
        dz = P[i, 2] - focus
        u = P[i, 0] - tx * dz
        v = P[i, 1] - ty * dz
        ptx = T[i, 0] - tx * T[i, 2]
        pty = T[i, 1] - ty * T[i, 2]
        L = math.sqrt(ptx * ptx + pty * pty)
        f = cap * math.sqrt(L * L + kappa * kappa)
        if f > 1.0:
            f = 1.0
        w = weight0 * st * ds[i] * f
        a = asym[j] / sigma
        if L > 1e-9:
            nxx = -pty / L
            nyy = ptx / L
        else:
            nxx = 0.0
            nyy = 0.0
            a = 0.0
        r0 = int(math.floor((v - R - max_oy) / p))
        r1 = int(math.ceil((v + R + max_oy) / p))
        if r0 < 0:
            r0 = 0
        if r1 > ny - 1:
            r1 = ny - 1
        for r in range(r0, r1 + 1):
            dy = r * p + row_off[r, 1] - v
            if dy > R or dy < -R:
                continue
            ox = row_off[r, 0]
            c0 = int(math.ceil((u - R - ox) / p))
            c1 = int(math.floor((u + R - ox) / p))
            if c0 < 0:
                c0 = 0
            if c1 > nx - 1:
                c1 = nx - 1
            for c in range(c0, c1 + 1):
                dx = c * p + ox - u
                g = math.exp(-(dx * dx + dy * dy) * inv2s2)
                A[r, c] += w * g * (1.0 + a * (dx * nxx + dy * nyy))


@numba.njit(cache=True, nogil=True, fastmath=True)
def _background(out, tx, ty, dz0, p, row_off, offset, gdir, bk, bamp, bph, bpar, fk, famp, fph):
    """Multiply out (ny, nx) by the background transmission seen at angle (tx, ty) (rad)."""
    ny, nx = out.shape
    level, width, bshift, fshift, alpha = bpar[0], bpar[1], bpar[2], bpar[3], bpar[4]
    bend, fringe = bpar[5], bpar[6]
    gt = (gdir[0] * tx + gdir[1] * ty) * 1e3 / alpha
    M = bk.shape[0]
    Mf = fk.shape[0]
    # column phasors (independent of the row): exp(i k_x c p)
    bcr = np.empty((M, nx))
    bci = np.empty((M, nx))
    fcr = np.empty((Mf, nx))
    fci = np.empty((Mf, nx))
    for m in range(M):
        for c in range(nx):
            bcr[m, c] = math.cos(bk[m, 0] * c * p)
            bci[m, c] = math.sin(bk[m, 0] * c * p)
    for m in range(Mf):
        for c in range(nx):
            fcr[m, c] = math.cos(fk[m, 0] * c * p)
            fci[m, c] = math.sin(fk[m, 0] * c * p)
    brr = np.empty(M)
    bri = np.empty(M)
    frr = np.empty(Mf)
    fri = np.empty(Mf)
    inv2w2 = 0.5 / (width * width)
    for r in range(ny):
        x0 = row_off[r, 0] + tx * dz0 - offset[0]
        y = r * p + row_off[r, 1] + ty * dz0 - offset[1]
        for m in range(M):
            ph = bk[m, 0] * x0 + bk[m, 1] * y + bph[m]
            brr[m] = bamp[m] * math.cos(ph)
            bri[m] = bamp[m] * math.sin(ph)
        for m in range(Mf):
            ph = fk[m, 0] * x0 + fk[m, 1] * y + fph[m]
            frr[m] = famp[m] * math.cos(ph)
            fri[m] = famp[m] * math.sin(ph)
        for c in range(nx):
            val = 1.0
            if bend != 0.0:
                phi = 0.0
                for m in range(M):
                    phi += brr[m] * bcr[m, c] - bri[m] * bci[m, c]
                e = phi - level + bshift * gt
                val *= 1.0 - bend * math.exp(-e * e * inv2w2)
            if fringe != 0.0:
                psi = 0.0
                for m in range(Mf):
                    psi += frr[m] * fcr[m, c] - fri[m] * fci[m, c]
                val *= 1.0 + fringe * math.cos(psi + fshift * gt)
            out[r, c] *= val


#: above this many angle samples per view, the (smooth) background is averaged over this many
#: of them and multiplied onto the averaged line transmission
MAX_BACKGROUND_SAMPLES = 4


@numba.njit(cache=True, nogil=True, fastmath=True)
def _render_view(out, A, P, T, ds, didx, samples, strength, asym, focus, p, sigma, cap, kappa, row_off, max_oy,
                 weight0, do_bg, dz0, offset, gdir, bk, bamp, bph, bpar, fk, famp, fph):
    """out (ny, nx) = mean over the angle samples (S, 2) (mrad) of the view transmission."""
    S = samples.shape[0]
    ny, nx = out.shape
    exact_bg = do_bg and S <= MAX_BACKGROUND_SAMPLES
    out[:, :] = 0.0
    for s in range(S):
        A[:, :] = 0.0
        tx = samples[s, 0] * 1e-3
        ty = samples[s, 1] * 1e-3
        _splat(A, P, T, ds, didx, tx, ty, strength[s], asym[s], focus, p, sigma, cap, kappa,
               row_off, max_oy, weight0)
        for r in range(ny):
            for c in range(nx):
                a = A[r, c]
                A[r, c] = math.exp(-a) if a != 0.0 else 1.0
        if exact_bg:
            _background(A, tx, ty, dz0, p, row_off, offset, gdir, bk, bamp, bph, bpar, fk, famp, fph)
        for r in range(ny):
            for c in range(nx):
                out[r, c] += A[r, c] / S
    if do_bg and not exact_bg:
        nb = MAX_BACKGROUND_SAMPLES
        B = np.zeros((ny, nx))
        for j in range(nb):
            s = (j * S) // nb
            A[:, :] = 1.0
            _background(A, samples[s, 0] * 1e-3, samples[s, 1] * 1e-3, dz0, p, row_off, offset, gdir,
                        bk, bamp, bph, bpar, fk, famp, fph)
            for r in range(ny):
                for c in range(nx):
                    B[r, c] += A[r, c] / nb
        for r in range(ny):
            for c in range(nx):
                out[r, c] *= B[r, c]


@numba.njit(cache=True, nogil=True)
def _render_serial(out, P, T, ds, didx, thetas, strength, asym, focus, p, sigma, cap, kappa, row_off,
                   weight0, do_bg, dz0, offset, gdir, bk, bamp, bph, bpar, fk, famp, fph):
    K = thetas.shape[0]
    ny, nx = out.shape[1], out.shape[2]
    max_oy = np.max(np.abs(row_off[:, 1]))
    A = np.empty((ny, nx))
    acc = np.empty((ny, nx))
    for k in range(K):
        _render_view(acc, A, P, T, ds, didx, thetas[k], strength[k], asym[k], focus, p, sigma, cap, kappa,
                     row_off, max_oy, weight0, do_bg, dz0, offset, gdir, bk, bamp, bph, bpar, fk, famp, fph)
        for r in range(ny):
            for c in range(nx):
                out[k, r, c] = acc[r, c]


@numba.njit(cache=True, nogil=True, parallel=True)
def _render_parallel(out, P, T, ds, didx, thetas, strength, asym, focus, p, sigma, cap, kappa, row_off,
                     weight0, do_bg, dz0, offset, gdir, bk, bamp, bph, bpar, fk, famp, fph):
    K = thetas.shape[0]
    ny, nx = out.shape[1], out.shape[2]
    max_oy = np.max(np.abs(row_off[:, 1]))
    for k in numba.prange(K):
        A = np.empty((ny, nx))
        acc = np.empty((ny, nx))
        _render_view(acc, A, P, T, ds, didx, thetas[k], strength[k], asym[k], focus, p, sigma, cap, kappa,
                     row_off, max_oy, weight0, do_bg, dz0, offset, gdir, bk, bamp, bph, bpar, fk, famp, fph)
        out[k] = acc


# --------------------------------------------------------------------------------- public API

def render_views(scene: Scene, thetas_mrad: np.ndarray, scan_shape: tuple[int, int], scan_step_nm: float, *,
                 region_radius_mrad: float = 0.0, line_width_nm: float | None = None, contrast: float | None = None,
                 contrast_signs: np.ndarray | None = None, rng: np.random.Generator | None = None,
                 region_samples: int | None = None, row_offsets_nm: np.ndarray | None = None,
                 background: bool = True, parallel: bool = False,
                 sample_thetas_mrad: np.ndarray | None = None) -> np.ndarray:
    """Noise-free transmission images (K, ny, nx) float32 of the views at ``thetas_mrad``.

    Parameters
    ----------
    thetas_mrad : (K, 2) incident angles (theta_x, theta_y) (mrad) of the view centroids.
    scan_shape : (ny, nx) scan positions; position (row, col) is (x, y) = (col p, row p) nm.
    scan_step_nm : scan step p (nm).
    region_radius_mrad : > 0: each view averages the transmission over a disc of angles of this
        radius (mrad) around its centroid (E3: a shift by -theta_c dz plus a blur of radius
        ``region_radius_mrad`` x |dz|), sampled by ``region_samples`` angles (None: enough
        that neighbouring samples shift a feature by < 0.7 sigma of the line profile).
    line_width_nm, contrast : override the scene's line FWHM (nm) and contrast (unitless).
    contrast_signs : optional (K, n_lines) signed multipliers of each line's contrast per view
        (negative = bright line), replacing the scene's smooth contrast model (no asymmetry).
    rng : randomises the rotation of the angle-sample pattern (None: fixed pattern).
    row_offsets_nm : optional (ny, 2) offsets (x, y) (nm) of each scan row (scan jitter).
    background : include bend contours and thickness fringes.
    parallel : spread the views over numba's threads (else one thread; the GIL is released).
    sample_thetas_mrad : optional (K, S, 2) angles (mrad) averaged (equal weights) into each view,
        for regions of any shape (half discs, annular sectors); replaces ``thetas_mrad`` and
        ``region_radius_mrad``.

    Returns T (K, ny, nx) float32: 1 = no contrast; < 1 dark line; > 1 bright line.
    """
    if sample_thetas_mrad is not None:
        samples_given = np.asarray(sample_thetas_mrad, dtype=np.float64)
        if samples_given.ndim != 3 or samples_given.shape[2] != 2:
            raise ValueError(f"sample_thetas_mrad must be (K, S, 2), got {samples_given.shape}")
        thetas = samples_given.mean(axis=1)
    else:
        samples_given = None
        thetas = np.asarray(thetas_mrad, dtype=np.float64).reshape(-1, 2)
    K = thetas.shape[0]
    ny, nx = (int(v) for v in scan_shape)
    p = float(scan_step_nm)
    fwhm = float(scene.line_width_nm if line_width_nm is None else line_width_nm)
    c = float(scene.contrast if contrast is None else contrast)
    sigma = fwhm / _FWHM
    P, Tn, ds, didx = _flatten(scene, max_spacing_nm=min(0.5, 0.7 * sigma, 0.5 * p))
    R = float(region_radius_mrad)
    if R > 0 and samples_given is None:
        if region_samples is None:
            dzs = np.abs(P[:, 2] - scene.focus_nm) if len(P) else np.zeros(1)
            dzmax = max(float(dzs.max()) if len(dzs) else 0.0, abs(scene.focus_nm))
            blur = R * 1e-3 * dzmax
            region_samples = int(np.clip(np.ceil(math.pi * (blur / (0.7 * sigma)) ** 2), 1, 400))
        rot = float(rng.uniform(0, 2 * math.pi)) if rng is not None else 0.0
        offs = _region_samples(R, int(region_samples), rot)
    else:
        offs = np.zeros((1, 2))
    samples = thetas[:, None, :] + offs[None, :, :] if samples_given is None else samples_given  # (K, S, 2)
    S = samples.shape[1]
    n_lines = len(scene.dislocations)
    if contrast_signs is not None:
        cs = np.asarray(contrast_signs, dtype=np.float64).reshape(K, n_lines)
        strength = np.ascontiguousarray(np.broadcast_to(cs[:, None, :], (K, S, n_lines)))
        asym = np.zeros_like(strength)
    else:
        strength, asym = contrast_factors(scene, samples)
    strength = np.ascontiguousarray(strength, dtype=np.float64).reshape(K, S, max(n_lines, 0))
    asym = np.ascontiguousarray(asym, dtype=np.float64).reshape(K, S, max(n_lines, 0))
    if n_lines == 0:
        strength = np.zeros((K, S, 1))
        asym = np.zeros((K, S, 1))
    if row_offsets_nm is None:
        row_off = np.zeros((ny, 2))
    else:
        row_off = np.ascontiguousarray(np.asarray(row_offsets_nm, dtype=np.float64).reshape(ny, 2))
    weight0 = c / (math.sqrt(2 * math.pi) * sigma)
    kappa = math.sqrt(2 * math.pi) * sigma / max(scene.thickness_nm, 1e-6)
    do_bg = bool(background and (scene.bend_contours > 0 or scene.thickness_fringes > 0))
    out = np.empty((K, ny, nx), dtype=np.float32)
    if K == 0:
        return out
    bk, bamp, bph, bpar, fk, famp, fph = _background_arrays(scene)
    kernel = _render_parallel if (parallel and K > 1 and numba.get_num_threads() > 1) else _render_serial
    kernel(out, np.ascontiguousarray(P), np.ascontiguousarray(Tn), np.ascontiguousarray(ds), didx,
                   np.ascontiguousarray(samples), strength, asym, float(scene.focus_nm), p, sigma, INCLINATION_CAP,
                   kappa, row_off, weight0, do_bg, 0.0 - float(scene.focus_nm),
                   np.asarray(scene.offset_nm, dtype=np.float64), np.asarray(scene.g_direction, dtype=np.float64),
                   bk, bamp, bph, bpar, fk, famp, fph)
    return out


@numba.njit(cache=True, nogil=True)
def _raster(u, v, val, mask, best, vout, radius):
    """Mark pixels within ``radius`` px of each point (u, v) (px, col/row) and the nearest
    pixel of each point; keep the value of the nearest point per pixel."""
    ny, nx = mask.shape
    r2max = radius * radius
    ir = int(math.ceil(radius))
    for i in range(u.shape[0]):
        cu = int(math.floor(u[i] + 0.5))
        cv = int(math.floor(v[i] + 0.5))
        for r in range(cv - ir, cv + ir + 1):
            if r < 0 or r >= ny:
                continue
            for c in range(cu - ir, cu + ir + 1):
                if c < 0 or c >= nx:
                    continue
                d2 = (c - u[i]) ** 2 + (r - v[i]) ** 2
                if d2 <= r2max or (r == cv and c == cu):
                    mask[r, c] = True
                    if d2 < best[r, c]:
                        best[r, c] = d2
                        vout[r, c] = val[i]


def _project_raster(scene: Scene, theta_mrad, scan_shape, scan_step_nm, width_px: float):
    """Mask (ny, nx) bool and dz (ny, nx) of the nearest projected line point, view theta."""
    ny, nx = (int(v) for v in scan_shape)
    p = float(scan_step_nm)
    tx, ty = (1e-3 * float(t) for t in np.asarray(theta_mrad, dtype=np.float64).reshape(2))
    P, _, _, _ = _flatten(scene, max_spacing_nm=0.25 * p)
    mask = np.zeros((ny, nx), dtype=np.bool_)
    best = np.full((ny, nx), np.inf)
    vout = np.full((ny, nx), np.nan)
    if len(P):
        dz = P[:, 2] - scene.focus_nm
        u = (P[:, 0] - tx * dz) / p
        v = (P[:, 1] - ty * dz) / p
        _raster(u, v, dz, mask, best, vout, 0.5 * float(width_px))
    return mask, vout


def line_masks(scene: Scene, thetas_mrad: np.ndarray, scan_shape: tuple[int, int], scan_step_nm: float,
               width_px: float = 1.0) -> np.ndarray:
    """(K, ny, nx) bool: pixels within ``width_px``/2 of a projected line centre in each view
    (theta (K, 2) mrad); the pixel nearest every line point is always set (connected lines)."""
    thetas = np.asarray(thetas_mrad, dtype=np.float64).reshape(-1, 2)
    return np.stack([_project_raster(scene, th, scan_shape, scan_step_nm, width_px)[0] for th in thetas]) \
        if len(thetas) else np.zeros((0,) + tuple(scan_shape), dtype=bool)


def height_map(scene: Scene, scan_shape: tuple[int, int], scan_step_nm: float, width_px: float = 1.0) -> np.ndarray:
    """(ny, nx) float32: dz = z - focus (nm) of the line at each line pixel of the theta = 0
    projection (the nearest line point where lines cross), NaN elsewhere."""
    mask, dz = _project_raster(scene, (0.0, 0.0), scan_shape, scan_step_nm, width_px)
    out = np.where(mask, dz, np.nan)
    return out.astype(np.float32)


def disparity_map(scene: Scene, theta_a, theta_b, scan_shape: tuple[int, int], scan_step_nm: float,
                  width_px: float = 1.0) -> np.ndarray:
    """(ny, nx, 2) float32 disparity (d_x, d_y) (px) at the line pixels of view A: a line point's
    position in A minus its position in B, d = (theta_B - theta_A) x 1e-3 x dz / p (E4); NaN elsewhere.

    theta_a, theta_b: (theta_x, theta_y) (mrad) of the two views.
    """
    ta = np.asarray(theta_a, dtype=np.float64).reshape(2)
    tb = np.asarray(theta_b, dtype=np.float64).reshape(2)
    mask, dz = _project_raster(scene, ta, scan_shape, scan_step_nm, width_px)
    d = (tb - ta)[None, None, :] * 1e-3 * dz[:, :, None] / float(scan_step_nm)
    d[~mask] = np.nan
    return d.astype(np.float32)


def project_points(points_nm: np.ndarray, theta_mrad, focus_nm: float, scan_step_nm: float) -> np.ndarray:
    """(n, 2) image positions (col, row) (px) of 3D points (n, 3) (nm) in the view at theta (mrad)."""
    P = np.asarray(points_nm, dtype=np.float64).reshape(-1, 3)
    t = 1e-3 * np.asarray(theta_mrad, dtype=np.float64).reshape(2)
    dz = P[:, 2] - focus_nm
    return np.stack([P[:, 0] - t[0] * dz, P[:, 1] - t[1] * dz], axis=1) / float(scan_step_nm)
