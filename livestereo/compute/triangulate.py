"""Depth from disparity and 3D points in the microscope frame (design.md section 1, E1-E4).

Conventions (as in :mod:`livestereo.compute.stereo_geometry`):

- incident angles theta = (theta_x, theta_y) in mrad, scan axes; scan step p in nm;
- image positions in scan px as (x, y) = (col, row); scan pixel (row i, col j) has its
  centre at (x, y) = (j * p, i * p) nm in the microscope frame;
- dz (nm) is the height above the probe crossover (focus), beam along +z;
- a feature at height dz appears in the view of angle theta at r - theta*dz (E2), so its
  position in A minus its position in B is d = (theta_B - theta_A) * dz (E4).  The scalar
  disparity "along the baseline" is that vector's component along
  u = (theta_B - theta_A)/beta: ``d = beta * dz / p`` (px, beta in rad), positive for
  dz > 0.  This is also the rectified disparity x'_A - x'_B of
  :mod:`livestereo.compute.rectify`.
- depth precision sigma_z = sigma_d * p / beta; with K > 2 views the least-squares depth
  has sigma_z = sigma_xy * p / sqrt(sum_k |theta_k - theta_mean|^2).
"""

from __future__ import annotations

import numpy as np

from livestereo.compute.stereo_geometry import stereo_angle_mrad

__all__ = [
    "dz_from_disparity",
    "dz_from_pairs",
    "dz_from_positions",
    "points_3d",
    "reference_position_nm",
]


def _thetas(thetas_mrad) -> np.ndarray:
    t = np.asarray(thetas_mrad, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"incident angles must be (K, 2) (theta_x, theta_y) mrad, got shape {t.shape}")
    return t


def dz_from_disparity(disparity_px, theta_a, theta_b, scan_step_nm: float, sigma_disparity_px=None):
    """Height dz (nm) and its uncertainty from a disparity along the baseline of views A, B.

    Args:
        disparity_px: (position in A minus position in B) . u in scan px (any shape);
            NaN stays NaN.
        theta_a, theta_b: (theta_x, theta_y) of views A and B (mrad).
        scan_step_nm: scan step p (nm/px).
        sigma_disparity_px: disparity uncertainty (px), scalar or same shape; None: no sigma.

    Returns:
        (dz_nm, sigma_dz_nm) as float64 arrays of the input shape; sigma is NaN when no
        sigma_disparity_px was given.  |dz| = |d| p / beta (beta in rad).
    """
    beta = stereo_angle_mrad(theta_a, theta_b) * 1e-3
    if beta == 0.0:
        raise ValueError("views A and B have the same incident angle: depth is undefined")
    d = np.asarray(disparity_px, dtype=np.float64)
    dz = d * float(scan_step_nm) / beta
    if sigma_disparity_px is None:
        sig = np.full_like(dz, np.nan)
    else:
        sig = np.broadcast_to(np.asarray(sigma_disparity_px, dtype=np.float64), dz.shape) * float(scan_step_nm) / beta
    return dz, np.array(sig)


def dz_from_pairs(disparities_px, pairs, thetas_mrad, scan_step_nm: float, sigma_disparity_px=None):
    """Least-squares height over several view pairs.

    Each pair (i, j) measures the disparity d_ij = (position in i - position in j) . u_ij
    = beta_ij * dz / p (px) at the same point (all maps sampled at the same positions, e.g.
    all measured in view-0 coordinates with pairs (0, j)).

    Args:
        disparities_px: (P, ...) disparities, one row per pair; NaN = no measurement.
        pairs: (P, 2) view indices (i, j) into ``thetas_mrad``.
        thetas_mrad: (K, 2) incident angles (mrad).
        scan_step_nm: p (nm/px).
        sigma_disparity_px: (P, ...) or scalar disparity uncertainty (px); None: unit weights
            and sigma from the residuals (needs >= 2 measurements at a point, else NaN).

    Returns:
        (dz_nm (...), sigma_dz_nm (...)), weighted least squares
        dz = p * sum(w beta d) / sum(w beta^2), sigma = p / sqrt(sum(w beta^2)) with
        w = 1/sigma_d^2.  Points without any measurement are NaN.
    """
    t = _thetas(thetas_mrad)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    d = np.asarray(disparities_px, dtype=np.float64)
    if d.shape[0] != len(pairs):
        raise ValueError(f"{d.shape[0]} disparity rows for {len(pairs)} pairs")
    beta = np.hypot(*(t[pairs[:, 1]] - t[pairs[:, 0]]).T) * 1e-3  # (P,) rad
    if np.any(beta == 0):
        raise ValueError("a view pair has identical incident angles: no baseline")
    bshape = (len(pairs),) + (1,) * (d.ndim - 1)
    beta = beta.reshape(bshape)
    ok = np.isfinite(d)
    if sigma_disparity_px is None:
        w = ok.astype(np.float64)
    else:
        s = np.broadcast_to(np.asarray(sigma_disparity_px, dtype=np.float64), d.shape)
        ok = ok & np.isfinite(s) & (s > 0)
        w = np.where(ok, 1.0 / np.where(ok, s, 1.0) ** 2, 0.0)
    dd = np.where(ok, d, 0.0)
    swb2 = (w * beta**2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = (w * beta * dd).sum(axis=0) / swb2  # dz / p
        dz = q * float(scan_step_nm)
        if sigma_disparity_px is None:
            n = ok.sum(axis=0)
            res = np.where(ok, dd - beta * q, 0.0)
            s2 = (res**2).sum(axis=0) / np.maximum(n - 1, 1)
            sig = np.where(n >= 2, np.sqrt(s2 / swb2) * float(scan_step_nm), np.nan)
        else:
            sig = float(scan_step_nm) / np.sqrt(swb2)
    none = swb2 == 0
    dz = np.where(none, np.nan, dz)
    sig = np.where(none, np.nan, sig)
    return dz, sig


def dz_from_positions(positions_px, thetas_mrad, scan_step_nm: float, sigma_px=None):
    """Least-squares height and reference position from the positions of one feature in K views.

    Model: r_k = r0 - theta_k * dz / p (px; theta in rad), with unknowns r0 (the position the
    feature would have in a theta = 0 view) and dz.

    Args:
        positions_px: (..., K, 2) positions (x, y) in scan px of the feature in each view;
            NaN rows = not seen in that view.
        thetas_mrad: (K, 2) incident angles (mrad).
        scan_step_nm: p (nm/px).
        sigma_px: position uncertainty (px, scalar); None: estimated from the residuals
            (2K - 3 degrees of freedom: two views already over-determine the fit through
            the offset across the baseline; NaN with fewer than 2 views).

    Returns:
        (dz_nm (...), sigma_dz_nm (...), r0_px (..., 2)); sigma_dz = sigma_xy * p /
        sqrt(sum |theta_k - theta_mean|^2).
    """
    t = _thetas(thetas_mrad) * 1e-3
    r = np.asarray(positions_px, dtype=np.float64)
    if r.shape[-2:] != (len(t), 2):
        raise ValueError(f"positions must be (..., {len(t)}, 2), got {r.shape}")
    ok = np.all(np.isfinite(r), axis=-1)  # (..., K)
    w = ok.astype(np.float64)
    n = w.sum(axis=-1)  # (...)
    rr = np.where(ok[..., None], r, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tbar = (w[..., None] * t).sum(axis=-2) / n[..., None]  # (..., 2)
        rbar = (w[..., None] * rr).sum(axis=-2) / n[..., None]
        dt = (t - tbar[..., None, :]) * w[..., None]
        drr = (rr - rbar[..., None, :]) * w[..., None]
        stt = (dt**2).sum(axis=(-1, -2))
        q = -(dt * drr).sum(axis=(-1, -2)) / stt  # dz / p
        dz = q * float(scan_step_nm)
        r0 = rbar + tbar * q[..., None]
        if sigma_px is None:
            res = (drr + dt * q[..., None, None]) * w[..., None]
            dof = 2 * n - 3
            s2 = (res**2).sum(axis=(-1, -2)) / np.maximum(dof, 1)
            sig = np.where(dof >= 1, np.sqrt(s2 / stt) * float(scan_step_nm), np.nan)
        else:
            sig = float(sigma_px) * float(scan_step_nm) / np.sqrt(stt)
    bad = (n < 2) | ~(stt > 0)
    dz = np.where(bad, np.nan, dz)
    sig = np.where(bad, np.nan, sig)
    r0 = np.where(bad[..., None], np.nan, r0)
    return dz, sig, r0


def reference_position_nm(xy_px, dz_nm, theta_mrad, scan_step_nm: float) -> np.ndarray:
    """Lateral position (x, y) in nm of a feature seen at ``xy_px`` (..., 2) (x, y scan px)
    in the view of angle ``theta_mrad`` at height dz: r = r_view * p + theta * dz (E1)."""
    xy = np.asarray(xy_px, dtype=np.float64)
    dz = np.asarray(dz_nm, dtype=np.float64)
    th = np.asarray(theta_mrad, dtype=np.float64) * 1e-3
    return xy * float(scan_step_nm) + th * dz[..., None]


def points_3d(xy_px, dz_nm, theta_a_mrad, scan_step_nm: float) -> np.ndarray:
    """3D points (..., 3) = (x, y, z) nm in the microscope frame, z = dz relative to focus,
    from positions ``xy_px`` (..., 2) in view A (scan px, (x, y)) and heights dz (...) nm."""
    dz = np.asarray(dz_nm, dtype=np.float64)
    r = reference_position_nm(xy_px, dz, theta_a_mrad, scan_step_nm)
    return np.concatenate([r, dz[..., None]], axis=-1)
