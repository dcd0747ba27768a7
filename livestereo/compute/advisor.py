"""Propose a virtual-detector layout: the SNR / angular-resolution trade-off (design.md E3, E4).

Model (per candidate: K circular regions of radius r at distance o from the disc centre,
evenly around the disc, o + r <= alpha, neighbours not overlapping):

- electrons per scan position N0 = dose [e/A^2] * (10 p [nm])^2; counts per region per
  position N = N0 * r^2 / alpha^2 (uniform disc illumination);
- centroids theta_k = o (cos phi_k, sin phi_k) mrad; stereo angle beta = the largest
  |theta_i - theta_j| (2 o for K = 2); spread S = sum_k |theta_k - theta_mean|^2 = K o^2;
- blur: focus mid-foil, so features at the surfaces sit at |dz| = t / 2; a region of
  angular radius r blurs them over a diameter b = 2 r 1e-3 |dz| = r 1e-3 t (nm);
- a line of width w (nm) appears with width w_eff = sqrt(w^2 + b^2) and contrast C; over
  one scan pixel of its length it collects N_eff = N w_eff / p counts, so its SNR there is
  C sqrt(N_eff) and its centre is located to sigma_xy = w_eff / (C sqrt(N_eff)) (nm);
- depth by least squares over the K views: sigma_z = sigma_xy / (1e-3 sqrt(S)); for K = 2
  this is sigma_d p / beta with sigma_d = sqrt(2) sigma_xy / p, as in E4;
- a candidate is feasible when the line is detectable at all: SNR >= 5 (Rose criterion).

The proposal is the feasible candidate with the smallest sigma_z at the foil surfaces (the
worst depth in the slab); sigma_z is per scan pixel of line length (a fit along L pixels
of line improves it by about sqrt(L)).  Thicker foils favour smaller regions (less blur);
higher doses allow smaller regions and give a better sigma_z.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from livestereo.compute.layouts import LayoutSpec

__all__ = ["LayoutProposal", "ROSE_SNR", "format_proposal", "propose_layout"]

#: smallest line SNR (per scan pixel of line length) at which a candidate counts as feasible.
ROSE_SNR = 5.0


@dataclasses.dataclass(frozen=True)
class LayoutProposal:
    """The proposed layout and its expected performance (see the module docstring)."""

    radius_mrad: float
    """Radius of each region (mrad)."""
    offset_mrad: float
    """Distance of each region centre from the disc centre (mrad)."""
    k: int
    """Number of views (regions evenly around the disc)."""
    stereo_angle_deg: float
    """Largest angle between two views (deg)."""
    blur_nm_at_surface: float
    """Blur diameter of a feature at a foil surface (|dz| = t/2), nm."""
    sigma_z_nm: float
    """Expected depth precision at the foil surfaces, per scan pixel of line length (nm)."""
    counts_per_region: float
    """Electrons per region per scan position."""
    table: list[dict]
    """The best scanned candidates (up to 10), best first; keys: k, radius_mrad, offset_mrad,
    stereo_angle_mrad, stereo_angle_deg, blur_nm, w_eff_nm, counts_per_region, snr,
    sigma_xy_nm, sigma_z_nm, feasible."""
    stereo_angle_mrad: float = 0.0
    """Largest angle between two views (mrad)."""
    snr: float = 0.0
    """Line SNR per scan pixel of line length at the foil surfaces."""
    feasible: bool = True
    """False when no candidate reaches ROSE_SNR (the dose is too low for this line contrast)."""
    alpha_mrad: float = 0.0
    """Convergence semi-angle the proposal was made for (mrad)."""

    def to_spec(self) -> LayoutSpec:
        """The LayoutSpec that builds this layout (stereo for k = 2, else multiview)."""
        return LayoutSpec(
            kind="stereo" if self.k == 2 else "multiview",
            radius_mrad=self.radius_mrad,
            offset_mrad=self.offset_mrad,
            k=self.k,
        )


def evaluate_candidate(
    alpha_mrad: float,
    thickness_nm: float,
    scan_step_nm: float,
    dose_e_per_A2: float,
    k: int,
    radius_mrad: float,
    offset_mrad: float,
    line_width_nm: float = 2.0,
    contrast: float = 0.2,
) -> dict:
    """The model quantities of one candidate (a table row; see the module docstring)."""
    n0 = dose_e_per_A2 * (10.0 * scan_step_nm) ** 2
    counts = n0 * (radius_mrad / alpha_mrad) ** 2
    phi = 2.0 * math.pi * np.arange(k) / k
    th = offset_mrad * np.stack([np.cos(phi), np.sin(phi)], axis=1)
    beta = float(np.max(np.hypot(*(th[:, None, :] - th[None, :, :]).transpose(2, 0, 1)))) if k > 1 else 0.0
    spread = float(((th - th.mean(axis=0)) ** 2).sum())
    blur = radius_mrad * 1e-3 * thickness_nm
    w_eff = math.hypot(line_width_nm, blur)
    n_eff = counts * w_eff / scan_step_nm
    snr = contrast * math.sqrt(n_eff) if n_eff > 0 else 0.0
    sigma_xy = w_eff / snr if snr > 0 else math.inf
    sigma_z = sigma_xy / (1e-3 * math.sqrt(spread)) if spread > 0 else math.inf
    return dict(
        k=int(k),
        radius_mrad=float(radius_mrad),
        offset_mrad=float(offset_mrad),
        stereo_angle_mrad=beta,
        stereo_angle_deg=math.degrees(beta * 1e-3),
        blur_nm=blur,
        w_eff_nm=w_eff,
        counts_per_region=counts,
        snr=snr,
        sigma_xy_nm=sigma_xy,
        sigma_z_nm=sigma_z,
        feasible=bool(snr >= ROSE_SNR),
    )


def propose_layout(
    alpha_mrad: float,
    thickness_nm: float,
    scan_step_nm: float,
    dose_e_per_A2: float,
    k_values=(2,),
    line_width_nm: float = 2.0,
    contrast: float = 0.2,
) -> LayoutProposal:
    """Scan region radius, offset and K; return the candidate with the best depth precision.

    Args:
        alpha_mrad: convergence semi-angle (mrad).
        thickness_nm: foil thickness t (nm); the focus is assumed mid-foil.
        scan_step_nm: scan step p (nm).
        dose_e_per_A2: electron dose (e / A^2) of one scan.
        k_values: numbers of views to consider (each >= 2).
        line_width_nm: intrinsic width of the dislocation's contrast line (nm).
        contrast: relative line contrast C (0..1).

    Radii are scanned from 0.03 alpha to the largest non-overlapping radius in steps of
    0.01 alpha; offsets from the smallest non-overlapping one to alpha - r.
    """
    for name, v in (("alpha_mrad", alpha_mrad), ("thickness_nm", thickness_nm), ("scan_step_nm", scan_step_nm),
                    ("dose_e_per_A2", dose_e_per_A2), ("line_width_nm", line_width_nm), ("contrast", contrast)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v}")
    ks = sorted({int(k) for k in k_values})
    if not ks or ks[0] < 2:
        raise ValueError(f"k_values: each must be >= 2, got {tuple(k_values)}")
    rows = []
    for k in ks:
        s = math.sin(math.pi / k)
        # non-overlap: 2 o sin(pi/k) >= 2 r with o <= alpha - r  ->  r <= alpha s / (1 + s)
        r_max = alpha_mrad * s / (1.0 + s)
        for i in range(3, 51):
            r = i / 100.0 * alpha_mrad
            if r > r_max * (1 + 1e-9):
                break
            o_min, o_max = r / s, alpha_mrad - r
            offsets = {o_max - j * 0.05 * alpha_mrad for j in range(int((o_max - o_min) / (0.05 * alpha_mrad) + 1e-9) + 1)}
            for o in sorted(offsets):
                rows.append(evaluate_candidate(alpha_mrad, thickness_nm, scan_step_nm, dose_e_per_A2, k, r, float(o),
                                               line_width_nm, contrast))
    rows.sort(key=lambda d: (not d["feasible"], d["sigma_z_nm"] if d["feasible"] else -d["snr"]))
    best = rows[0]
    return LayoutProposal(
        radius_mrad=best["radius_mrad"],
        offset_mrad=best["offset_mrad"],
        k=best["k"],
        stereo_angle_deg=best["stereo_angle_deg"],
        blur_nm_at_surface=best["blur_nm"],
        sigma_z_nm=best["sigma_z_nm"],
        counts_per_region=best["counts_per_region"],
        table=rows[:10],
        stereo_angle_mrad=best["stereo_angle_mrad"],
        snr=best["snr"],
        feasible=best["feasible"],
        alpha_mrad=float(alpha_mrad),
    )


def format_proposal(p: LayoutProposal) -> str:
    """Human-readable summary of a proposal and its candidate table."""
    lines = [
        f"proposed layout: {p.k} views, regions of radius {p.radius_mrad:.1f} mrad at {p.offset_mrad:.1f} mrad"
        + (f" from the disc centre (alpha {p.alpha_mrad:.1f} mrad)" if p.alpha_mrad else " from the disc centre"),
        f"  stereo angle        {p.stereo_angle_mrad:.1f} mrad = {p.stereo_angle_deg:.2f} deg",
        f"  blur at the foil surfaces  {p.blur_nm_at_surface:.2f} nm (diameter, focus mid-foil)",
        f"  counts per region   {p.counts_per_region:.1f} e per scan position",
        f"  line SNR            {p.snr:.1f} per scan pixel of line length",
        f"  depth precision     {p.sigma_z_nm:.2f} nm (1 sigma at the surfaces, per pixel of line length)",
    ]
    if not p.feasible:
        lines.append(f"  WARNING: no candidate reaches SNR {ROSE_SNR:g}: the dose is too low to see the line reliably")
    lines.append("  candidates (best first):")
    lines.append("     K  r/mrad  o/mrad  beta/deg  blur/nm  counts     SNR  sigma_z/nm")
    for d in p.table:
        lines.append(
            f"    {d['k']:2d}  {d['radius_mrad']:6.2f}  {d['offset_mrad']:6.2f}  {d['stereo_angle_deg']:8.2f}"
            f"  {d['blur_nm']:7.2f}  {d['counts_per_region']:6.1f}  {d['snr']:6.1f}  {d['sigma_z_nm']:10.2f}"
            + ("" if d["feasible"] else "  (SNR too low)")
        )
    return "\n".join(lines)
