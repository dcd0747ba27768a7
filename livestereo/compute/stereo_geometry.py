"""Stereo geometry of a convergent STEM probe (design.md section 1, E1-E4).

Conventions: incident angles theta = (theta_x, theta_y) in mrad, in scan axes; scan step
p in nm; image positions and disparities in scan pixels as (x, y); heights dz in nm above
the probe crossover (beam along +z).

- E2: a feature at height dz appears shifted by -theta*dz in the view of angle theta.
- E4: its position in A minus its position in B is d = (theta_B - theta_A) * dz (here in px:
  multiplied by 1e-3 / p); the stereo angle is beta = |theta_A - theta_B|.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "annular_sector_centroid_radius",
    "baseline_unit",
    "circle_region_centroid_mrad",
    "depth_nm",
    "disparity_px",
    "half_disc_centroid_mrad",
    "stereo_angle_mrad",
]


def _theta(t) -> np.ndarray:
    a = np.asarray(t, dtype=np.float64)
    if a.shape != (2,):
        raise ValueError(f"an incident angle must be (theta_x, theta_y) in mrad, got shape {a.shape}")
    return a


def stereo_angle_mrad(theta_a, theta_b) -> float:
    """Stereo angle beta = |theta_A - theta_B| (mrad) between two views of angles (theta_x, theta_y) mrad."""
    return float(np.hypot(*(_theta(theta_a) - _theta(theta_b))))


def baseline_unit(theta_a, theta_b) -> np.ndarray:
    """Unit vector (x, y) along theta_B - theta_A: the direction in which disparity grows with dz.

    Epipolar lines run along it; raises ValueError for identical views (no baseline).
    """
    v = _theta(theta_b) - _theta(theta_a)
    n = float(np.hypot(*v))
    if n == 0.0:
        raise ValueError("views A and B have the same incident angle: no stereo baseline")
    return v / n


def disparity_px(theta_a, theta_b, dz_nm, scan_step_nm: float) -> np.ndarray:
    """Disparity (position in A minus position in B) of a feature at height dz, in scan px.

    Args:
        theta_a, theta_b: incident angles (theta_x, theta_y) of views A and B (mrad).
        dz_nm: height(s) above the probe crossover (nm); scalar or array of shape S.
        scan_step_nm: scan step p (nm per image pixel).

    Returns:
        (theta_B - theta_A) * 1e-3 * dz / p as (dx, dy) px: shape (2,) for scalar dz,
        else S + (2,).
    """
    v = _theta(theta_b) - _theta(theta_a)
    dz = np.asarray(dz_nm, dtype=np.float64)
    return dz[..., None] * (v * 1e-3 / float(scan_step_nm))


def depth_nm(disparity_along_baseline_px, theta_a, theta_b, scan_step_nm: float):
    """Height dz (nm) from the disparity component along the baseline (inverse of disparity_px).

    Args:
        disparity_along_baseline_px: (position in A minus position in B) projected on
            baseline_unit(theta_a, theta_b), in scan px; scalar or array.
        theta_a, theta_b: incident angles of views A and B (mrad).
        scan_step_nm: scan step p (nm).

    Returns:
        dz = d * p / (1e-3 * beta) in nm (float for scalar input, else an array); positive
        when the feature lies above the crossover (downstream along +z).
    """
    beta = stereo_angle_mrad(theta_a, theta_b)
    if beta == 0.0:
        raise ValueError("views A and B have the same incident angle: depth is undefined")
    d = np.asarray(disparity_along_baseline_px, dtype=np.float64)
    z = d * float(scan_step_nm) / (1e-3 * beta)
    return float(z) if z.ndim == 0 else z


def circle_region_centroid_mrad(offset, radius, alpha_mrad: float | None = None) -> float:
    """Distance (mrad) of the centroid of a circular region from the disc centre.

    A circle of radius ``radius`` whose centre lies ``offset`` from the disc centre (both mrad)
    has its centroid at ``offset``.  If ``alpha_mrad`` is given and the circle sticks out of
    the bright-field disc, the centroid of the part inside the disc (a lens) is returned,
    computed by quadrature; it lies closer to the disc centre.
    """
    offset, radius = float(offset), float(radius)
    if alpha_mrad is None or offset + radius <= alpha_mrad:
        return offset
    # lens = circle(offset, radius) ∩ disc(alpha): integrate on a fine polar-free grid.
    n = 801
    xs = np.linspace(offset - radius, offset + radius, n)
    ys = np.linspace(-radius, radius, n)
    x, y = np.meshgrid(xs, ys, indexing="xy")
    m = ((x - offset) ** 2 + y**2 <= radius**2) & (x**2 + y**2 <= alpha_mrad**2)
    if not m.any():
        raise ValueError("the region lies entirely outside the bright-field disc")
    return float(x[m].mean())


def annular_sector_centroid_radius(r1, r2, phi) -> float:
    """Centroid radius of an annular sector (design.md section 1).

    r_c = 2/3 * (r2^3 - r1^3)/(r2^2 - r1^2) * sin(phi/2)/(phi/2), with inner and outer radii
    r1 < r2 (any angle unit, e.g. mrad; r_c has the same unit) and full opening angle phi in
    radians (phi = pi: half annulus; phi = 2 pi: full annulus, r_c = 0).
    """
    r1, r2, phi = float(r1), float(r2), float(phi)
    if not r2 > r1 >= 0:
        raise ValueError(f"need 0 <= r1 < r2, got r1={r1}, r2={r2}")
    if not 0 < phi <= 2 * math.pi:
        raise ValueError(f"phi must be in (0, 2 pi] radians, got {phi}")
    return 2.0 / 3.0 * (r2**3 - r1**3) / (r2**2 - r1**2) * math.sin(phi / 2) / (phi / 2)


def half_disc_centroid_mrad(alpha) -> float:
    """Centroid distance (mrad) of half of a BF disc of radius alpha (mrad): 4 alpha / (3 pi)."""
    return 4.0 * float(alpha) / (3.0 * math.pi)
