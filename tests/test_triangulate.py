"""Depth from disparity, K-view least squares and 3D points (livestereo.compute.triangulate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from livestereo.compute.stereo_geometry import baseline_unit, disparity_px
from livestereo.compute.triangulate import (
    dz_from_disparity,
    dz_from_pairs,
    dz_from_positions,
    points_3d,
    reference_position_nm,
)


def _project(points_nm, theta_mrad, p):
    """E1/E2: a point (x, y, z) nm appears in the view of angle theta at (x, y) - theta*z, in px."""
    pts = np.asarray(points_nm, float)
    return (pts[..., :2] - np.asarray(theta_mrad) * 1e-3 * pts[..., 2:3]) / p


def _views(k, radius=52.5, phase=0.3):
    a = phase + 2 * math.pi * np.arange(k) / k
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def test_disparity_to_depth_e4():
    # beta = 105 mrad, p = 1 nm: 1 px of disparity is 9.52 nm of depth
    th_a, th_b = (-52.5, 0.0), (52.5, 0.0)
    dz, sig = dz_from_disparity(10.5, th_a, th_b, 1.0, sigma_disparity_px=0.1)
    assert float(dz) == pytest.approx(100.0)
    assert float(sig) == pytest.approx(0.1 / 0.105)
    # sign: position in A minus position in B, along theta_B - theta_A, positive above focus
    d_vec = disparity_px(th_a, th_b, 37.0, 0.5)
    d = d_vec @ baseline_unit(th_a, th_b)
    assert float(dz_from_disparity(d, th_a, th_b, 0.5)[0]) == pytest.approx(37.0)
    assert float(dz_from_disparity(-d, th_a, th_b, 0.5)[0]) == pytest.approx(-37.0)
    # swapping A and B swaps the baseline direction: same depth from the swapped disparity
    d_ba = disparity_px(th_b, th_a, 37.0, 0.5) @ baseline_unit(th_b, th_a)
    assert float(dz_from_disparity(d_ba, th_b, th_a, 0.5)[0]) == pytest.approx(37.0)
    assert np.isnan(dz_from_disparity(np.array([1.0, np.nan]), th_a, th_b, 1.0)[0][1])
    with pytest.raises(ValueError, match="same incident angle"):
        dz_from_disparity(1.0, th_a, th_a, 1.0)


def test_points_from_the_reference_view():
    pts = np.array([[10.0, 20.0, 50.0], [33.0, -4.0, -80.0]])
    th = np.array([30.0, -45.0])
    xy_a = _project(pts, th, 0.5)
    assert np.allclose(reference_position_nm(xy_a, pts[:, 2], th, 0.5), pts[:, :2])
    assert np.allclose(points_3d(xy_a, pts[:, 2], th, 0.5), pts)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_least_squares_over_views_is_exact_without_noise(k):
    rng = np.random.default_rng(k)
    pts = np.column_stack([rng.uniform(0, 100, 50), rng.uniform(0, 100, 50), rng.uniform(-100, 100, 50)])
    th = _views(k)
    p = 0.8
    pos = np.stack([_project(pts, t, p) for t in th], axis=1)  # (50, K, 2)
    dz, sig, r0 = dz_from_positions(pos, th, p)
    assert np.allclose(dz, pts[:, 2], atol=1e-9)
    assert np.allclose(r0 * p, pts[:, :2], atol=1e-9)
    # even 2 views are redundant (4 coordinates, 3 unknowns: the offset across the baseline)
    assert np.all(sig < 1e-6)
    # pairs (0, j) measured in view-0 coordinates give the same depth
    pairs = [(0, j) for j in range(1, k)]
    d = np.stack([(pos[:, 0] - pos[:, j]) @ baseline_unit(th[0], th[j]) for _, j in pairs])
    dz2, _ = dz_from_pairs(d, pairs, th, p)
    assert np.allclose(dz2, pts[:, 2], atol=1e-9)


def test_least_squares_precision_matches_the_design_formula():
    """sigma_z = sigma_xy * p / sqrt(sum |theta_k - theta_mean|^2) (design.md section 1)."""
    rng = np.random.default_rng(7)
    th = _views(6)
    p, sxy, n = 1.0, 0.2, 20000
    z = rng.uniform(-100, 100, n)
    pts = np.column_stack([np.full(n, 50.0), np.full(n, 50.0), z])
    pos = np.stack([_project(pts, t, p) for t in th], axis=1) + rng.normal(0, sxy, (n, 6, 2))
    dz, sig, _ = dz_from_positions(pos, th, p)
    pred = sxy * p / math.sqrt(((th * 1e-3 - (th * 1e-3).mean(0)) ** 2).sum())
    assert np.std(dz - z) == pytest.approx(pred, rel=0.05)
    assert np.median(sig) == pytest.approx(pred, rel=0.1)  # residual-based estimate
    dz_k, sig_k, _ = dz_from_positions(pos, th, p, sigma_px=sxy)
    assert np.allclose(sig_k, pred)
    # more views, better depth: K = 6 beats the best pair of the same disc
    pair_sigma = sxy * math.sqrt(2) * p / (105e-3)
    assert pred < pair_sigma


def test_missing_measurements_and_weights():
    th = _views(4)
    z = np.array([10.0, -20.0, 30.0])
    pts = np.column_stack([np.zeros(3), np.zeros(3), z])
    pos = np.stack([_project(pts, t, 1.0) for t in th], axis=1)
    pos[0, 2] = np.nan  # point 0 not seen in view 2
    pos[1, 1:] = np.nan  # point 1 seen in one view only
    dz, sig, r0 = dz_from_positions(pos, th, 1.0)
    assert dz[0] == pytest.approx(10.0) and dz[2] == pytest.approx(30.0)
    assert np.isnan(dz[1]) and np.isnan(r0[1]).all()
    # pairs: a NaN disparity is skipped; weights follow 1/sigma^2
    pairs = [(0, 1), (0, 2), (0, 3)]
    d = np.stack([(_project(pts, th[0], 1.0) - _project(pts, th[j], 1.0)) @ baseline_unit(th[0], th[j]) for _, j in pairs])
    d[1, 0] = np.nan
    d_bad = d.copy()
    d_bad[2] += 5.0  # a wrong pair with a huge sigma barely matters
    s = np.ones_like(d)
    s[2] = 1e4
    dz_p, sig_p = dz_from_pairs(d_bad, pairs, th, 1.0, s)
    assert np.allclose(dz_p, z, atol=1e-3)
    assert np.all(np.isfinite(sig_p))
    dz_all_nan, _ = dz_from_pairs(np.full((3, 2), np.nan), pairs, th, 1.0)
    assert np.isnan(dz_all_nan).all()
    with pytest.raises(ValueError, match="pairs"):
        dz_from_pairs(d[:2], pairs, th, 1.0)


def test_curve_round_trip_through_projected_views():
    """3D curve -> K projected views (E1-E4) -> least squares -> the same curve."""
    s = np.linspace(0, 1, 300)
    curve = np.column_stack([40 + 60 * s, 30 + 20 * np.sin(3 * s), -90 + 180 * s**2])
    for k in (2, 3, 5):
        th = _views(k, radius=50.0, phase=1.0)
        pos = np.stack([_project(curve, t, 0.5) for t in th], axis=1)
        dz, _, r0 = dz_from_positions(pos, th, 0.5)
        rec = np.column_stack([r0 * 0.5, dz])
        assert np.abs(rec - curve).max() < 1e-9
        # the same from the reference view's positions
        assert np.abs(points_3d(pos[:, 0], dz, th[0], 0.5) - curve).max() < 1e-9
