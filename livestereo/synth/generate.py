"""Random dislocation scenes and their virtual-image views (see the package docstring).

Coordinates: a 3D point is (x, y, z) in nm; x, y are scan coordinates at the probe crossover
(image pixel (row i, column j) has its centre at x = j*p, y = i*p for scan step p) and z is
the depth in the foil, 0 <= z <= t.  The crossover (focus) lies at z_focus, so a point's
height is dz = z - z_focus, and the view of incident angle theta (mrad) sees it at pixel
((x - 1e-3*theta_x*dz)/p, (y - 1e-3*theta_y*dz)/p)  (E1/E2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

from livestereo.synth.normalise import normalise_view

Range = float | tuple[float, float]

# Glide-plane normals (crystal frame) and the crystal's line directions of the presets.
_FCC_PLANES = np.array([[1, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]], dtype=float)
_BCC_PLANES = np.array([[1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1]], dtype=float)
MATERIALS: dict[str, dict[str, Any]] = {
    # c/a stretches the crystal's z axis (gamma-TiAl L1_0 is slightly tetragonal)
    "gamma-TiAl": {"planes": _FCC_PLANES, "c_over_a": 0.407 / 0.400},
    "Al": {"planes": _FCC_PLANES, "c_over_a": 1.0},
    "Ni": {"planes": _FCC_PLANES, "c_over_a": 1.0},
    "Cu": {"planes": _FCC_PLANES, "c_over_a": 1.0},
    "Fe": {"planes": _BCC_PLANES, "c_over_a": 1.0},
}


@dataclass(frozen=True)
class SynthParams:
    """Ranges the generator draws from; a (lo, hi) tuple is a range, a number is fixed.

    Ranges marked log are drawn log-uniformly.
    """

    height: int = 256
    width: int = 256
    thickness_nm: Range = (50.0, 400.0)
    scan_step_nm: Range = (0.25, 4.0)  # log; raised where needed to keep |d| <= max_disparity_px
    beta_deg: Range = (1.0, 7.0)
    focus_frac: Range = (0.15, 0.85)  # crossover depth / thickness
    dose: Range = (3.0, 3000.0)  # electrons per pixel per view, log
    n_objects: Range = (1.0, 40.0)  # log
    line_sigma_px: Range = (0.6, 3.5)  # log; Gaussian sigma of the line profile
    region_radius_mrad: Range = (0.0, 25.0)  # virtual-detector region radius (blur ~ r*|dz|)
    mtf_sigma_px: Range = (0.0, 0.8)
    contrast: Range = (0.12, 0.9)  # line contrast |a| in T = exp(-a * profile)
    p_sign_flip: float = 0.25  # probability that a line's contrast sign differs between views
    p_double: float = 0.15  # probability of a double image per line
    p_oscillation: float = 0.4  # probability of depth oscillation of a line's contrast
    p_background: float = 0.85  # probability of bend contours / thickness fringes
    jitter_px: Range = (0.0, 0.4)  # row-wise scan jitter (same in all views)
    drift_px: Range = (0.0, 3.0)  # smooth scan drift over the frame (same in all views)
    common_offset_mrad: float = 25.0  # random common incident-angle offset of a pair
    max_disparity_px: float = 22.0
    materials: tuple[str, ...] = ("gamma-TiAl", "Al", "Ni", "Cu", "Fe")

    def with_(self, **kw) -> "SynthParams":
        return replace(self, **kw)


def _draw(rng: np.random.Generator, v: Range, log: bool = False) -> float:
    if isinstance(v, (int, float)):
        return float(v)
    lo, hi = float(v[0]), float(v[1])
    if lo == hi:
        return lo
    if log:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _resample(pts: np.ndarray, step: float) -> np.ndarray:
    """Resample a polyline at uniform arc length ``step``."""
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= step:
        return pts
    n = int(s[-1] / step) + 1
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, pts[:, k]) for k in range(3)], axis=1)


def _clip(pts: np.ndarray, box: tuple[float, float, float, float], t: float, min_pts: int = 4) -> list[np.ndarray]:
    """Split a curve into the runs that lie inside the foil slab and the lateral box."""
    x0, x1, y0, y1 = box
    ok = (pts[:, 2] >= 0) & (pts[:, 2] <= t) & (pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1)
    if not ok.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    return [pts[a:b] for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_pts]


def sample_scene(rng: np.random.Generator, params: SynthParams, scan_step_nm: float, thickness_nm: float,
                 n_objects: int | None = None) -> list[np.ndarray]:
    """Random dislocation curves (list of (n, 3) arrays, nm) for a field of view of params' size.

    Lines lie in glide planes of a randomly oriented crystal of a random preset material:
    straight or wavy lines through the foil (ending at the surfaces), pinned bowed segments,
    loops (cut where they leave the foil) and dipoles; from a few lines to dense tangles.
    """
    p, t = scan_step_nm, thickness_nm
    fov_x, fov_y = params.width * p, params.height * p
    fov = max(fov_x, fov_y)
    margin = 0.15 * fov
    box = (-margin, fov_x + margin, -margin, fov_y + margin)
    mat = MATERIALS[params.materials[int(rng.integers(len(params.materials)))]]
    rot = _random_rotation(rng)
    stretch = np.diag([1.0, 1.0, 1.0 / mat["c_over_a"]])  # plane normals of a tetragonal cell
    normals = (rot @ (stretch @ mat["planes"].T)).T
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    if n_objects is None:
        n_objects = int(round(_draw(rng, params.n_objects, log=True)))
    step = 0.25 * p
    L = math.hypot(fov + 2 * margin, t) * 1.2
    curves: list[np.ndarray] = []
    for _ in range(max(1, n_objects)):
        n = normals[int(rng.integers(len(normals)))]
        a = np.cross(n, rng.normal(size=3))
        u = a / np.linalg.norm(a)
        v = np.cross(n, u)
        if rng.random() < 0.5:  # prefer shallow lines: they are long and carry most depth range
            u, v = (v, u) if abs(u[2]) > abs(v[2]) else (u, v)
        centre = np.array([rng.uniform(0, fov_x), rng.uniform(0, fov_y), rng.uniform(0.1 * t, 0.9 * t)])
        kind = rng.choice(["line", "wavy", "bowed", "loop", "dipole"], p=[0.3, 0.2, 0.2, 0.15, 0.15])
        if kind == "loop":
            r1 = rng.uniform(0.03, 0.35) * min(fov, 2.5 * t + 20 * p) + 3 * p
            r2 = r1 * rng.uniform(0.5, 1.0)
            phi = np.linspace(0, 2 * np.pi, max(16, int(2 * np.pi * r1 / step)))
            pts = centre + np.cos(phi)[:, None] * r1 * u + np.sin(phi)[:, None] * r2 * v
            pieces = [pts]
        else:
            if kind == "bowed":
                half = rng.uniform(0.1, 0.5) * fov
            else:
                half = L
            s = np.linspace(-half, half, max(16, int(2 * half / (4 * step))))
            off = np.zeros_like(s)
            if kind == "wavy":
                for _k in range(int(rng.integers(1, 4))):
                    lam = rng.uniform(0.2, 1.5) * fov
                    off += rng.uniform(0.0, 0.08) * lam * np.sin(2 * np.pi * s / lam + rng.uniform(0, 2 * np.pi))
            elif kind == "bowed":
                off = rng.uniform(-0.6, 0.6) * half * (1 - (s / half) ** 2)
            pts = centre + s[:, None] * u + off[:, None] * v
            pieces = [pts]
            if kind == "dipole":
                sep = rng.uniform(3.0, 15.0) * p
                pieces.append(pts + sep * (v if rng.random() < 0.5 else n))
        for pc in pieces:
            curves.extend(_clip(_resample(pc, step), box, t))
    return curves


def _bands(rng, yy, xx, H, W):
    """Smooth background: low-frequency field, bend contours and thickness fringes (shared geometry)."""
    comps = []
    for _ in range(int(rng.integers(0, 4))):  # bend contours: dark curved bands
        phi = rng.uniform(0, 2 * np.pi)
        c = rng.uniform(-0.2, 1.2) * max(H, W)
        kappa = rng.uniform(-3, 3) / max(H, W)
        width = rng.uniform(3, 30)
        amp = rng.uniform(0.1, 0.7)
        comps.append(("bend", phi, c, kappa, width, amp))
    if rng.random() < 0.5:  # thickness fringes
        phi = rng.uniform(0, 2 * np.pi)
        lam = rng.uniform(8, 60)
        amp = rng.uniform(0.03, 0.25)
        comps.append(("fringe", phi, lam, rng.uniform(0, 2 * np.pi), rng.uniform(-2, 2) / max(H, W), amp))
    return comps


def _background(rng, comps, H, W, shift) -> np.ndarray:
    yy = np.arange(H, dtype=np.float32)[:, None]
    xx = np.arange(W, dtype=np.float32)[None, :]
    b = np.ones((H, W), np.float32)
    for kx, ky, ph, amp in [(rng.uniform(-1, 1) * 0.03, rng.uniform(-1, 1) * 0.03, rng.uniform(0, 6.3), rng.uniform(0, 0.1)) for _ in range(2)]:
        b += amp * (np.cos(kx * xx + ph) * np.cos(ky * yy) - np.sin(kx * xx + ph) * np.sin(ky * yy))
    for comp in comps:
        if comp[0] == "bend":
            _, phi, c, kappa, width, amp = comp
            along = xx * math.cos(phi) + yy * math.sin(phi)
            across = -xx * math.sin(phi) + yy * math.cos(phi)
            g = along + kappa * (across - 0.5 * max(H, W)) ** 2 - (c + shift * width)
            b -= amp * rng.uniform(0.6, 1.0) * np.exp(-0.5 * (g / width) ** 2)
        else:
            _, phi, lam, ph, kappa, amp = comp
            along = xx * math.cos(phi) + yy * math.sin(phi)
            across = -xx * math.sin(phi) + yy * math.cos(phi)
            b += amp * np.cos(2 * np.pi * (along + kappa * (across - 0.5 * max(H, W)) ** 2) / lam + ph + shift)
    return np.maximum(b, 0.05)


def _splat(img_flat: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray, H: int, W: int) -> None:
    """Bilinear splat of weights w at (x, y) px (pixel centres at integers) into img_flat."""
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx = x - x0
    fy = y - y0
    idx = []
    wts = []
    for dy, dx, ww in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        idx.append(yi[ok] * W + xi[ok])
        wts.append((w * ww)[ok])
    if idx:
        img_flat += np.bincount(np.concatenate(idx), weights=np.concatenate(wts), minlength=H * W)


def _render(rng, curves, thetas, s: dict, params: SynthParams, want_disp: bool, want_snr: bool = False):
    """Render K views of ``curves``; returns raw images, centre-line masks, view-0 disparity
    and (``want_snr``, else None) the (K, H, W) maps of line SNR and position bound along the
    centre lines (make_views' line_snr)."""
    H, W = params.height, params.width
    p, zf = s["scan_step_nm"], s["z_focus_nm"]
    K = len(thetas)
    if curves:
        pts = np.concatenate(curves)
        obj = np.concatenate([np.full(len(c), i) for i, c in enumerate(curves)])
    else:
        pts = np.zeros((0, 3))
        obj = np.zeros(0, int)
    n_obj = len(curves)
    dz = pts[:, 2] - zf
    # per-object, per-view contrast (sign and strength vary across the disc)
    a0 = np.array([_draw(rng, params.contrast) for _ in range(n_obj)]) * rng.choice([-1.0, 1.0], n_obj, p=[0.3, 0.7])
    amps = np.empty((K, n_obj))
    for k in range(K):
        flip = np.where(rng.random(n_obj) < params.p_sign_flip, -1.0, 1.0) if k > 0 else np.ones(n_obj)
        amps[k] = a0 * flip * rng.uniform(0.5, 1.0, n_obj)
    osc = rng.random(n_obj) < params.p_oscillation
    xi_nm = rng.uniform(15, 80, n_obj)
    ph = rng.uniform(0, 2 * np.pi, n_obj)
    m_osc = np.where(osc, rng.uniform(0.2, 0.8, n_obj), 0.0)
    double = rng.random(n_obj) < params.p_double
    dbl_off = rng.normal(size=(n_obj, 2))
    dbl_off *= (rng.uniform(1.5, 4.0, n_obj) / np.linalg.norm(dbl_off, axis=1))[:, None]
    dbl_amp = rng.uniform(-0.6, 0.6, n_obj)
    # scan distortions, identical in every view (all views come from the same scan)
    jitter = rng.normal(0.0, s["jitter_px"], H + 2)
    dr = s["drift_px"] * rng.normal(size=3) / math.sqrt(3)
    comps = _bands(rng, None, None, H, W) if rng.random() < params.p_background else []
    sig_line, r_reg, mtf = s["line_sigma_px"], s["region_radius_mrad"], s["mtf_sigma_px"]
    views = np.empty((K, H, W), np.float32)
    masks = np.zeros((K, H, W), bool)
    disp = None
    snr = np.zeros((K, H, W), np.float32) if want_snr else None
    pos_sigma = np.full((K, H, W), np.inf, np.float32) if want_snr else None
    osc_fac = 1.0 + m_osc[obj] * np.cos(2 * np.pi * pts[:, 2] / xi_nm[obj] + ph[obj])
    blur = np.sqrt(sig_line**2 + mtf**2 + (0.5 * r_reg * 1e-3 * np.abs(dz) / p) ** 2)
    qlog = math.log(1.25)
    bucket = np.round(np.log(blur) / qlog).astype(np.int64)
    sig_b = {b: math.exp(b * qlog) for b in np.unique(bucket)}
    same = obj[1:] == obj[:-1] if len(pts) > 1 else np.zeros(0, bool)
    for k, th in enumerate(thetas):
        x = (pts[:, 0] - 1e-3 * th[0] * dz) / p
        y = (pts[:, 1] - 1e-3 * th[1] * dz) / p
        yn = np.clip(y / max(H, 1), -0.5, 1.5)
        x = x + jitter[np.clip(np.round(y).astype(np.int64) + 1, 0, H + 1)] + dr[0] * yn + dr[1] * yn**2
        y = y + dr[2] * yn
        amp = amps[k][obj] * osc_fac if n_obj else np.zeros(0)
        # projected arc length per point (px): the line profile is the same at any inclination
        seg = np.where(same, np.hypot(np.diff(x), np.diff(y)), 0.0) if len(pts) > 1 else np.zeros(0)
        step_px = np.minimum(0.5 * (np.concatenate([[0.0], seg]) + np.concatenate([seg, [0.0]])), 1.0) if len(pts) else np.zeros(0)
        dens = np.zeros((H, W), np.float64)
        for b, sb in sig_b.items():
            sel = bucket == b
            acc = np.zeros(H * W)
            _splat(acc, x[sel], y[sel], amp[sel] * step_px[sel], H, W)
            d2 = np.zeros(H * W)
            dsel = sel & double[obj]
            if dsel.any():
                o = obj[dsel]
                _splat(d2, x[dsel] + dbl_off[o, 0], y[dsel] + dbl_off[o, 1], amp[dsel] * dbl_amp[o] * step_px[dsel], H, W)
                acc += d2
            if acc.any():
                dens += ndimage.gaussian_filter(acc.reshape(H, W), sb, truncate=3.0) * (math.sqrt(2 * math.pi) * sb)
        bg = _background(rng, comps, H, W, shift=rng.uniform(-1, 1) * (1 if k else 0)) if comps else np.ones((H, W), np.float32)
        img = bg * np.exp(-dens).astype(np.float32)
        lam = np.maximum(img * s["dose"], 0.0)
        views[k] = rng.poisson(lam).astype(np.float32) / np.float32(s["dose"])
        xi = np.round(x).astype(np.int64)
        yi = np.round(y).astype(np.int64)
        ok = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        masks[k].ravel()[yi[ok] * W + xi[ok]] = True
        if want_snr and ok.any():
            snr_pts = line_snr_of_points(amp[ok], blur[ok], s["dose"])
            np.maximum.at(snr[k].ravel(), yi[ok] * W + xi[ok], snr_pts)
            with np.errstate(divide="ignore"):
                np.minimum.at(pos_sigma[k].ravel(), yi[ok] * W + xi[ok], (math.sqrt(2.0) * blur[ok] / snr_pts).astype(np.float32))
        if k == 0 and want_disp:
            d_pts = s["disp_per_nm"] * dz  # px of disparity along the baseline per point
            idx = yi[ok] * W + xi[ok]
            cnt = np.bincount(idx, minlength=H * W)
            sm = np.bincount(idx, weights=d_pts[ok], minlength=H * W)
            s2 = np.bincount(idx, weights=d_pts[ok] ** 2, minlength=H * W)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = sm / cnt
                var = s2 / cnt - mean**2
            disp = np.where((cnt > 0) & (var < 0.25), mean, np.nan).astype(np.float32).reshape(H, W)
    return views, masks, disp, (snr, pos_sigma) if want_snr else None


def line_snr_of_points(amp: np.ndarray, blur_px: np.ndarray, dose: float) -> np.ndarray:
    """Matched-filter signal-to-noise ratio per pixel of line length (dimensionless).

    A line of amplitude ``amp`` (T = exp(-amp * profile), peak contrast |1 - exp(-amp)|) with
    a Gaussian profile of sigma ``blur_px`` (px: line width, MTF and region blur together) on
    a background of ``dose`` counts per pixel (Poisson): c * sqrt(dose * sigma * sqrt(pi)).
    A straight stretch of L px is then seen at about this times sqrt(L): with the Rose
    criterion (5), a 6 px stretch needs about 2. Background bands and double images are
    ignored, so this is a guide to visibility, not a bound.

    The same line's position across it can be measured no better than (Cramer-Rao, Fisher
    information of the Poisson counts at small contrast) sqrt(2) * sigma / SNR px from one
    pixel of its length, sqrt(2) * sigma / (SNR * sqrt(L)) from a stretch of L px.
    """
    c = np.abs(1.0 - np.exp(-np.asarray(amp, dtype=np.float64)))
    return (c * np.sqrt(dose * np.asarray(blur_px, dtype=np.float64) * math.sqrt(math.pi))).astype(np.float32)


def _settings(rng: np.random.Generator, params: SynthParams) -> dict:
    t = _draw(rng, params.thickness_nm)
    beta = math.radians(_draw(rng, params.beta_deg)) * 1e3  # mrad
    zf = _draw(rng, params.focus_frac) * t
    p = _draw(rng, params.scan_step_nm, log=True)
    dzmax = max(zf, t - zf)
    p = max(p, 1e-3 * beta * dzmax / params.max_disparity_px)
    return {
        "thickness_nm": t,
        "beta_mrad": beta,
        "z_focus_nm": zf,
        "scan_step_nm": p,
        "dose": _draw(rng, params.dose, log=True),
        "line_sigma_px": _draw(rng, params.line_sigma_px, log=True),
        "region_radius_mrad": _draw(rng, params.region_radius_mrad),
        "mtf_sigma_px": _draw(rng, params.mtf_sigma_px),
        "jitter_px": _draw(rng, params.jitter_px),
        "drift_px": _draw(rng, params.drift_px),
    }


def make_pair(rng: np.random.Generator, params: SynthParams | None = None, **fixed) -> dict:
    """A random stereo pair in the rectified frame (baseline theta_B - theta_A along +x).

    Args:
        rng: numpy Generator (the only source of randomness: same seed, same pair).
        params: ranges to draw from (default SynthParams()).
        **fixed: overrides of drawn settings (thickness_nm, beta_mrad, z_focus_nm,
            scan_step_nm, dose, line_sigma_px, region_radius_mrad, mtf_sigma_px,
            jitter_px, drift_px).

    Returns:
        dict with views (2, H, W) float32 normalised noisy images, raw (2, H, W) float32
        (counts / dose), masks (2, H, W) bool centre lines, disparity (H, W) float32 (x_A - x_B
        in px at view-A line pixels, NaN elsewhere and where crossing lines disagree),
        thetas_mrad (2, 2), curves (list of (n, 3) nm arrays, z = depth in the foil) and the
        drawn settings (thickness_nm, beta_mrad, z_focus_nm, scan_step_nm, dose, ...).
    """
    params = params or SynthParams()
    s = _settings(rng, params)
    s.update(fixed)
    off = rng.uniform(-1, 1, 2) * params.common_offset_mrad
    thetas = np.array([off + [-s["beta_mrad"] / 2, 0.0], off + [s["beta_mrad"] / 2, 0.0]])
    s["disp_per_nm"] = 1e-3 * s["beta_mrad"] / s["scan_step_nm"]
    curves = sample_scene(rng, params, s["scan_step_nm"], s["thickness_nm"])
    raw, masks, disp, _ = _render(rng, curves, thetas, s, params, want_disp=True)
    views = np.stack([normalise_view(v) for v in raw])
    return {"views": views, "raw": raw, "masks": masks, "disparity": disp, "thetas_mrad": thetas, "curves": curves, **s}


def make_views(rng: np.random.Generator, K: int = 2, params: SynthParams | None = None, thetas_mrad=None, *,
               line_snr: bool = False, **fixed) -> dict:
    """K views at arbitrary incident angles (not rectified) with the ground-truth 3D curves.

    Args:
        rng: numpy Generator.
        K: number of views (ignored when thetas_mrad is given).
        params: ranges (default SynthParams()).
        thetas_mrad: optional (K, 2) incident angles; default: K angles evenly around a circle
            whose diameter gives the drawn stereo angle between views 0 and K//2, rotated at
            random, so the epipolar direction of views 0, 1 is arbitrary.
        line_snr: also return "line_snr", (K, H, W) float32: at each centre-line pixel the
            largest matched-filter SNR per pixel of line length of the lines crossing it
            (line_snr_of_points), 0 elsewhere; and "line_pos_sigma", (K, H, W) float32: the
            smallest Cramer-Rao bound on the line's position across it from one pixel of
            its length (sqrt(2) * sigma / SNR, px), inf elsewhere. Draws nothing from
            ``rng``: the same seed gives the same views with or without them.
        **fixed: overrides of drawn settings (as make_pair).

    Returns:
        dict as make_pair (disparity: view 0 minus view 1 along theta_1 - theta_0, px, at view-0
        line pixels), with views (K, H, W), masks (K, H, W), thetas_mrad (K, 2).
    """
    params = params or SynthParams()
    s = _settings(rng, params)
    s.update(fixed)
    if thetas_mrad is None:
        r = s["beta_mrad"] / 2
        phi0 = rng.uniform(0, 2 * np.pi)
        if K == 2:
            ang = phi0 + np.array([0.0, np.pi])
        else:
            ang = phi0 + 2 * np.pi * np.arange(K) / K
        thetas = np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    else:
        thetas = np.asarray(thetas_mrad, dtype=float)
        K = len(thetas)
    base = float(np.hypot(*(thetas[1] - thetas[0])))
    s["disp_per_nm"] = 1e-3 * base / s["scan_step_nm"]
    curves = sample_scene(rng, params, s["scan_step_nm"], s["thickness_nm"])
    raw, masks, disp, snr = _render(rng, curves, thetas, s, params, want_disp=True, want_snr=line_snr)
    views = np.stack([normalise_view(v) for v in raw])
    out = {"views": views, "raw": raw, "masks": masks, "disparity": disp, "thetas_mrad": thetas, "curves": curves, **s}
    if line_snr:
        out["line_snr"], out["line_pos_sigma"] = snr
    return out


_CLEAN = {"dose": 1e9, "line_sigma_px": 1.0, "region_radius_mrad": 0.0, "mtf_sigma_px": 0.0, "jitter_px": 0.0,
          "drift_px": 0.0}


def render_curves(rng: np.random.Generator, curves: list[np.ndarray], thetas_mrad, *, scan_step_nm: float,
                  z_focus_nm: float, params: SynthParams | None = None, **settings) -> dict:
    """Render given 3D curves ((n, 3) nm arrays, z = depth in the foil) in views of incident
    angles thetas_mrad (K, 2); settings default to a clean render (no noise, blur, jitter).

    Returns dict(views, raw, masks, disparity (view 0 minus view 1 along theta_1 - theta_0, px)).
    """
    params = params or SynthParams(p_background=0.0, p_double=0.0, p_oscillation=0.0, p_sign_flip=0.0)
    thetas = np.asarray(thetas_mrad, dtype=float)
    s = dict(_CLEAN, **settings, scan_step_nm=float(scan_step_nm), z_focus_nm=float(z_focus_nm))
    s["disp_per_nm"] = 1e-3 * float(np.hypot(*(thetas[1] - thetas[0]))) / s["scan_step_nm"] if len(thetas) > 1 else 0.0
    raw, masks, disp, _ = _render(rng, [np.asarray(c, float) for c in curves], thetas, s, params, want_disp=len(thetas) > 1)
    return {"views": np.stack([normalise_view(v) for v in raw]), "raw": raw, "masks": masks, "disparity": disp}


def make_batch(rng: np.random.Generator, n: int, params: SynthParams | None = None) -> dict[str, np.ndarray]:
    """n rectified pairs stacked for training: views (n, 2, H, W), masks, disparity (n, H, W)."""
    pairs = [make_pair(rng, params) for _ in range(n)]
    return {
        "views": np.stack([q["views"] for q in pairs]),
        "masks": np.stack([q["masks"] for q in pairs]),
        "disparity": np.stack([q["disparity"] for q in pairs]),
        "scan_step_nm": np.array([q["scan_step_nm"] for q in pairs]),
        "beta_mrad": np.array([q["beta_mrad"] for q in pairs]),
    }
