"""Disparity refinement along detected lines (livestereo.compute.line_disparity).

Synthetic maps stand in for the networks: a curve is rasterised as a Gaussian
line-probability tube, its true disparity is a smooth function of arc length, and the
"network" disparity is the truth plus noise that is large where the curve runs along the
baseline (matching is ill-posed there) and small where it runs across it (independent
from one px of arc length to the next, constant across the line).  References are
computed independently with plain numpy (np.polyfit, brute-force nearest points).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from livestereo.compute.line_disparity import (
    LineDisparityParams,
    line_chains,
    refine_line_disparity,
    smooth_chain_values,
)

THETAS_X = np.array([[-52.0, 0.0], [52.0, 0.0]])  # baseline along +x (mrad)


def tube(points_xy: np.ndarray, shape, sigma_px: float = 1.0):
    """(prob, index of the nearest curve point, distance px) for a densely sampled curve."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    q = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(float)
    dist, i = cKDTree(points_xy).query(q)
    dist = dist.reshape(shape)
    return np.exp(-dist**2 / (2 * sigma_px**2)), i.reshape(shape), dist


def quarter_arc(n: int = 2000):
    """Quarter circle (radius 60 px, centre (10, 10)): its tangent turns from across the
    x baseline (at the start, along y) to along it (at the end, along x)."""
    phi = np.linspace(0.0, math.pi / 2, n)
    xy = np.stack([10 + 60 * np.cos(phi), 10 + 60 * np.sin(phi)], axis=1)
    seg = np.hypot(*np.diff(xy, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    tangent = np.stack([-np.sin(phi), np.cos(phi)], axis=1)
    return xy, s, tangent


def noisy_arc_maps(seed: int = 0):
    shape = (80, 80)
    xy, s, tangent = quarter_arc()
    prob, near, dist = tube(xy, shape)
    truth = (-3.0 + 0.08 * s)[near]  # smooth disparity along the line, px
    cos2 = (tangent[:, 0] ** 2)[near]  # cos^2 of the angle between tangent and the x baseline
    sigma = 0.05 + 1.5 * cos2
    # matching noise: independent from one px of arc length to the next, the same across
    # the line (the network's disparity is smooth across a line's width)
    rng = np.random.default_rng(seed)
    knots = np.arange(0.0, s[-1] + 2.0)
    noise = np.interp(s, knots, rng.standard_normal(len(knots)))[near]
    disp = truth + sigma * noise
    line = dist <= 1.0
    return prob, disp.astype(np.float32), sigma.astype(np.float32), truth, line, dist


# ------------------------------------------------------------------------------ chains


def test_chains_of_a_cross_split_at_the_junction():
    m = np.zeros((41, 41), bool)
    m[20, 4:37] = True
    m[4:37, 20] = True
    rc, arc, start, junc = line_chains(m)
    assert len(start) - 1 == 4
    assert junc.tolist() == [[20, 20]]
    assert len(rc) == 33 + 33 - 1 - 1  # every skeleton pixel but the junction
    for a, b in zip(start[:-1], start[1:]):
        c = rc[a:b]
        step = np.abs(np.diff(c, axis=0)).max(1)
        assert np.all(step == 1)  # consecutive pixels are neighbours: ordered along the line
        np.testing.assert_allclose(arc[a:b], np.arange(b - a))


def test_chain_of_a_loop_is_cut_once_and_ordered():
    yy, xx = np.mgrid[:64, :64]
    ring = np.abs(np.hypot(yy - 32, xx - 32) - 20) < 0.8
    rc, arc, start, junc = line_chains(ring)
    assert len(start) - 1 == 1 and len(junc) == 0
    assert np.all(np.diff(arc) > 0)
    assert np.all(np.abs(np.diff(rc, axis=0)).max(1) == 1)
    assert arc[-1] == pytest.approx(2 * math.pi * 20, rel=0.1)


def test_empty_mask_gives_no_chains():
    rc, arc, start, junc = line_chains(np.zeros((10, 10), bool))
    assert rc.shape == (0, 2) and arc.size == 0 and start.tolist() == [0] and junc.shape == (0, 2)


# ------------------------------------------------------------------------------ fit


def test_fit_matches_windowed_polyfit_reference():
    rng = np.random.default_rng(1)
    n1, n2 = 40, 25
    arc = np.concatenate([np.arange(n1) * 1.2, np.arange(n2) * 1.0])
    y = np.concatenate([np.sin(arc[:n1] / 6), 0.3 * arc[n1:]]) + 0.1 * rng.standard_normal(n1 + n2)
    w = rng.uniform(0.5, 2.0, n1 + n2)
    start = np.array([0, n1, n1 + n2])
    h = 5
    prm = LineDisparityParams(min_halfwidth_px=h, max_halfwidth_px=h, robust_iters=0)
    fit, var = smooth_chain_values(arc, y, w, start, prm)
    for a, b in zip(start[:-1], start[1:]):
        for i in range(a, b):
            lo, hi = max(a, i - h), min(b, i + h + 1)
            coef = np.polyfit(arc[lo:hi], y[lo:hi], 1, w=np.sqrt(w[lo:hi]))
            assert fit[i] == pytest.approx(np.polyval(coef, arc[i]), abs=1e-9)
            # variance of the weighted least-squares prediction: x (X^T W X)^-1 x^T
            X = np.stack([np.ones(hi - lo), arc[lo:hi]], axis=1)
            cov = np.linalg.inv(X.T @ (w[lo:hi, None] * X))
            xr = np.array([1.0, arc[i]])
            assert var[i] == pytest.approx(xr @ cov @ xr, rel=1e-6)


def test_fit_reproduces_a_linear_function_and_rejects_an_outlier():
    arc = np.arange(50.0)
    y = 2.0 - 0.1 * arc
    y_bad = y.copy()
    y_bad[20] += 8.0  # a gross mismatch
    fit, _ = smooth_chain_values(arc, y_bad, np.ones(50), np.array([0, 50]))
    np.testing.assert_allclose(fit, y, atol=1e-6)


# ------------------------------------------------------------------------------ refine


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("use_sigma", [True, False])
def test_refinement_brings_a_noisy_curved_line_close_to_the_truth(use_sigma, seed):
    prob, disp, sigma, truth, line, _ = noisy_arc_maps(seed)
    out = refine_line_disparity(disp, prob, THETAS_X, sigma_disparity=sigma if use_sigma else None)
    e_in = np.abs(disp - truth)
    e_out = np.abs(out - truth)
    assert e_in[line].mean() > 0.4
    assert e_out[line].mean() < 0.6 * e_in[line].mean()
    along = line & (sigma > 0.05 + 1.5 * 0.5)  # line within 45 deg of the baseline
    assert e_out[along].mean() < 0.6 * e_in[along].mean()
    across = line & (sigma < 0.05 + 1.5 * 0.2)  # within 27 deg of the normal: not made worse
    assert e_out[across].mean() < e_in[across].mean() + 0.02
    assert out.dtype == np.float32


def test_pixels_away_from_lines_are_unchanged():
    prob, disp, sigma, truth, line, dist = noisy_arc_maps(seed=3)
    rng = np.random.default_rng(4)
    disp = np.where(dist > 2, rng.normal(0, 5, disp.shape), disp).astype(np.float32)
    disp[0, :5] = np.nan
    out = refine_line_disparity(disp, prob, THETAS_X, sigma_disparity=sigma)
    far = dist > 5.0  # beyond radius_px of any skeleton pixel (the skeleton lies within ~1 px)
    np.testing.assert_array_equal(out[far], disp[far])
    assert np.isnan(out[0, :5]).all()


def test_map_without_lines_is_returned_unchanged():
    rng = np.random.default_rng(5)
    disp = rng.normal(0, 3, (64, 64)).astype(np.float32)
    disp[10:20, 10:20] = np.nan
    prob = rng.uniform(0, 0.49, (64, 64))  # nothing above the threshold
    out = refine_line_disparity(disp, prob, THETAS_X)
    np.testing.assert_array_equal(out, disp)
    assert out is not disp
    np.testing.assert_array_equal(refine_line_disparity(disp, np.ones((64, 64)), [[0.0, 0.0], [0.0, 0.0]]), disp)


def test_a_disparity_already_linear_along_the_lines_is_kept():
    # a straight line across the baseline and one along it (nothing to gain there): a map
    # that is already a linear function of arc length must come back unchanged (up to the
    # skeleton's kinks at the line ends, where arc length and x differ slightly)
    yy, xx = np.mgrid[:64, :64].astype(float)
    prob = np.maximum(np.exp(-((xx - 20) ** 2) / 2), np.exp(-((yy - 45) ** 2) / 2))
    prob[40:51, 15:26] = 0.0  # no crossing
    disp = np.where(np.abs(xx - 20) < 3, 1.0 + 0.05 * yy, -2.0 + 0.03 * xx).astype(np.float32)
    out = refine_line_disparity(disp, prob, THETAS_X, sigma_disparity=np.full((64, 64), 0.5))
    np.testing.assert_allclose(out, disp, atol=0.02)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        refine_line_disparity(np.zeros((8, 8)), np.zeros((8, 9)), THETAS_X)
    with pytest.raises(ValueError):
        refine_line_disparity(np.zeros((8, 8)), np.zeros((8, 8)), [[0.0, 1.0]])
