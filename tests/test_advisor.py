"""Layout advisor (livestereo.compute.advisor): the E3/E4 trade-off is physically sensible."""

from __future__ import annotations

import math

import pytest

from livestereo.compute.advisor import (
    ROSE_SNR,
    LayoutProposal,
    evaluate_candidate,
    format_proposal,
    propose_layout,
)
from livestereo.compute.layouts import LayoutSpec


def test_sigma_z_matches_hand_computation():
    # alpha 30 mrad, two regions r = 10 mrad at o = 20 mrad; t = 100 nm, p = 0.5 nm, 400 e/A^2
    d = evaluate_candidate(30.0, 100.0, 0.5, 400.0, 2, 10.0, 20.0, line_width_nm=2.0, contrast=0.2)
    n0 = 400.0 * 5.0**2  # electrons per position: (10 p)^2 A^2
    counts = n0 * (10.0 / 30.0) ** 2
    blur = 2 * 10.0e-3 * 50.0  # diameter 2 r |dz|, |dz| = t / 2
    w_eff = math.hypot(2.0, blur)
    sigma_xy = w_eff / (0.2 * math.sqrt(counts * w_eff / 0.5))
    beta = 40.0e-3  # rad
    sigma_d_px = math.sqrt(2.0) * sigma_xy / 0.5  # difference of two localisations
    sigma_z = sigma_d_px * 0.5 / beta  # E4: sigma_z = sigma_d p / beta
    assert d["counts_per_region"] == pytest.approx(counts)
    assert d["blur_nm"] == pytest.approx(blur)
    assert d["stereo_angle_mrad"] == pytest.approx(40.0)
    assert d["stereo_angle_deg"] == pytest.approx(math.degrees(0.04))
    assert d["sigma_xy_nm"] == pytest.approx(sigma_xy)
    assert d["sigma_z_nm"] == pytest.approx(sigma_z)
    assert d["feasible"] == (0.2 * math.sqrt(counts * w_eff / 0.5) >= ROSE_SNR)


def test_more_views_least_squares():
    # K views: sigma_z = sigma_xy / sqrt(sum |theta_k - theta_mean|^2) = sigma_xy / (sqrt(K) o)
    d = evaluate_candidate(30.0, 100.0, 0.5, 400.0, 6, 7.0, 20.0)
    assert d["sigma_z_nm"] == pytest.approx(d["sigma_xy_nm"] / (1e-3 * math.sqrt(6) * 20.0))
    assert d["stereo_angle_mrad"] == pytest.approx(40.0)


@pytest.mark.parametrize("k_values", [(2,), (2, 3, 4, 6, 8)])
def test_regions_fit_inside_the_disc_and_do_not_overlap(k_values):
    p = propose_layout(25.0, 150.0, 0.5, 200.0, k_values=k_values)
    assert isinstance(p, LayoutProposal) and 1 <= len(p.table) <= 10
    for d in [*p.table, dict(radius_mrad=p.radius_mrad, offset_mrad=p.offset_mrad, k=p.k)]:
        assert d["offset_mrad"] + d["radius_mrad"] <= 25.0 + 1e-9
        assert d["radius_mrad"] <= d["offset_mrad"] * math.sin(math.pi / d["k"]) + 1e-9
    sig = [d["sigma_z_nm"] for d in p.table]
    assert sig == sorted(sig) and p.sigma_z_nm == sig[0]
    assert p.stereo_angle_deg == pytest.approx(math.degrees(p.stereo_angle_mrad * 1e-3))
    assert p.k in k_values


def test_thicker_foil_smaller_regions():
    radii = [propose_layout(30.0, t, 0.5, 500.0).radius_mrad for t in (10.0, 50.0, 100.0, 200.0, 400.0)]
    assert all(b <= a for a, b in zip(radii, radii[1:]))
    assert radii[-1] < radii[0]
    blur = [propose_layout(30.0, t, 0.5, 500.0).blur_nm_at_surface for t in (50.0, 400.0)]
    assert blur[1] > blur[0]


def test_higher_dose_smaller_regions_and_better_sigma_z():
    props = [propose_layout(30.0, 100.0, 0.5, dose) for dose in (2.0, 10.0, 50.0, 500.0, 5000.0)]
    radii = [p.radius_mrad for p in props]
    sig = [p.sigma_z_nm for p in props]
    assert all(b <= a for a, b in zip(radii, radii[1:])) and radii[-1] < radii[0]
    assert all(b < a for a, b in zip(sig, sig[1:]))
    assert not props[0].feasible and props[-1].feasible


def test_format_and_spec():
    p = propose_layout(60.0, 200.0, 1.0, 1000.0)
    text = format_proposal(p)
    for word in ("stereo angle", "mrad", "deg", "blur", "depth precision", "nm", "radius"):
        assert word in text
    spec = p.to_spec()
    assert isinstance(spec, LayoutSpec) and spec.kind == "stereo"
    assert spec.radius_mrad == p.radius_mrad and spec.offset_mrad == p.offset_mrad
    assert propose_layout(25.0, 100.0, 0.5, 300.0, k_values=(4,)).to_spec().kind == "multiview"
    assert "WARNING" in format_proposal(propose_layout(30.0, 100.0, 0.5, 0.5))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        propose_layout(0.0, 100.0, 0.5, 100.0)
    with pytest.raises(ValueError):
        propose_layout(25.0, 100.0, 0.5, 100.0, k_values=(1,))
