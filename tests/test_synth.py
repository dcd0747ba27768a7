"""Synthetic training data (livestereo.synth): shapes, determinism and the E4 geometry."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from livestereo.compute.stereo_geometry import disparity_px
from livestereo.synth import SynthParams, line_snr_of_points, make_batch, make_pair, make_views, normalise_view, render_curves


def test_make_pair_shapes_and_determinism():
    sp = SynthParams(height=64, width=96)
    a = make_pair(np.random.default_rng(3), sp)
    b = make_pair(np.random.default_rng(3), sp)
    assert a["views"].shape == (2, 64, 96) and a["views"].dtype == np.float32
    assert a["masks"].shape == (2, 64, 96) and a["masks"].dtype == bool
    assert a["disparity"].shape == (64, 96) and a["disparity"].dtype == np.float32
    np.testing.assert_array_equal(a["views"], b["views"])
    np.testing.assert_array_equal(a["masks"], b["masks"])
    np.testing.assert_array_equal(a["disparity"], b["disparity"])
    # rectified: the baseline theta_B - theta_A lies along +x
    dth = a["thetas_mrad"][1] - a["thetas_mrad"][0]
    assert dth[1] == 0 and dth[0] > 0
    # disparity only on view-A line pixels, within the trained range
    fin = np.isfinite(a["disparity"])
    assert not (fin & ~a["masks"][0]).any()
    assert np.all(np.abs(a["disparity"][fin]) <= sp.max_disparity_px + 1e-3)


def test_make_batch_fast_and_stacked():
    rng = np.random.default_rng(0)
    make_batch(rng, 1)  # warm-up
    t0 = time.perf_counter()
    b = make_batch(rng, 8)
    dt = time.perf_counter() - t0
    assert b["views"].shape == (8, 2, 256, 256)
    assert np.isfinite(b["views"]).all()
    assert dt < 5.0  # ~0.25 s on an idle core; generous for a shared machine


def test_ranges_are_respected():
    sp = SynthParams(height=32, width=32)
    for seed in range(20):
        q = make_pair(np.random.default_rng(seed), sp)
        assert 50 <= q["thickness_nm"] <= 400
        assert 0.25 <= q["scan_step_nm"] <= 4.0
        assert np.degrees(1e-3 * q["beta_mrad"]) == pytest.approx(np.clip(np.degrees(1e-3 * q["beta_mrad"]), 1, 7))
        dzmax = max(q["z_focus_nm"], q["thickness_nm"] - q["z_focus_nm"])
        assert 1e-3 * q["beta_mrad"] * dzmax / q["scan_step_nm"] <= sp.max_disparity_px + 1e-6
        for c in q["curves"]:
            assert np.all((c[:, 2] >= 0) & (c[:, 2] <= q["thickness_nm"]))  # lines end at the surfaces


def _inclined_line(p):
    x = np.linspace(20 * p, 230 * p, 2000)
    return np.stack([x, np.full_like(x, 100.3 * p), 20 + (x - 20 * p) / (210 * p) * 160], 1)


@pytest.mark.parametrize("thetas", [[[-50.0, 0.0], [50.0, 0.0]], [[-30.0, 10.0], [40.0, -25.0]]])
def test_disparity_equals_E4(thetas):
    """At every view-A line pixel the disparity is (theta_B - theta_A) * dz / p along the
    baseline, dz being the height of the curve point that lands on that pixel."""
    p, zf = 0.8, 100.0
    th = np.array(thetas)
    c = _inclined_line(p)
    r = render_curves(np.random.default_rng(0), [c], th, scan_step_nm=p, z_focus_nm=zf)
    d = r["disparity"]
    yy, xx = np.nonzero(np.isfinite(d))
    assert len(xx) > 100
    # project the curve into view A (E1) and find the point at each pixel
    dz = c[:, 2] - zf
    xa = (c[:, 0] - 1e-3 * th[0, 0] * dz) / p
    ya = (c[:, 1] - 1e-3 * th[0, 1] * dz) / p
    u = (th[1] - th[0]) / np.hypot(*(th[1] - th[0]))
    for y, x in list(zip(yy, xx))[::7]:
        sel = (np.round(xa) == x) & (np.round(ya) == y)
        assert sel.any()
        expect = disparity_px(th[0], th[1], dz[sel], p) @ u  # E4 via stereo_geometry
        assert d[y, x] == pytest.approx(float(expect.mean()), abs=0.01)
    # and view B really shows the line where A's pixel minus d says (rectified case)
    if th[0, 1] == th[1, 1]:
        mb = r["masks"][1]
        hits = [mb[y, int(round(x - d[y, x]))] or mb[y, int(round(x - d[y, x])) - 1] or mb[y, int(round(x - d[y, x])) + 1]
                for y, x in zip(yy, xx)]
        assert np.mean(hits) > 0.95


def test_make_views_arbitrary_directions():
    q = make_views(np.random.default_rng(1), K=4, params=SynthParams(height=48, width=64))
    assert q["views"].shape == (4, 48, 64) and q["masks"].shape == (4, 48, 64)
    assert q["thetas_mrad"].shape == (4, 2)
    assert q["disparity"].shape == (48, 64)


def test_line_snr_maps_the_centre_lines_and_leaves_the_views_unchanged():
    sp = SynthParams(height=64, width=64)
    plain = make_views(np.random.default_rng(5), K=2, params=sp, dose=50.0)
    q = make_views(np.random.default_rng(5), K=2, params=sp, dose=50.0, line_snr=True)
    assert "line_snr" not in plain
    np.testing.assert_array_equal(q["raw"], plain["raw"])  # no draws from the generator
    snr = q["line_snr"]
    assert snr.shape == (2, 64, 64) and snr.dtype == np.float32
    assert np.all(snr[~q["masks"]] == 0) and np.all(snr[q["masks"]] > 0)
    pos = q["line_pos_sigma"]
    assert pos.shape == (2, 64, 64) and np.all(np.isinf(pos[~q["masks"]]))
    assert np.all(np.isfinite(pos[q["masks"]]) & (pos[q["masks"]] > 0))


def test_line_position_bound_matches_a_maximum_likelihood_fit():
    """sqrt(2) * sigma / (SNR * sqrt(L)) against the scatter of fitted line positions."""
    rng = np.random.default_rng(3)
    amp, sigma, dose, length = 0.2, 2.0, 100.0, 200
    x = np.arange(-20, 21, dtype=np.float64)
    snr = line_snr_of_points(np.array([amp]), np.array([sigma]), dose)[0]
    bound = np.sqrt(2.0) * sigma / (snr * np.sqrt(length))

    def model(x0):
        return dose * np.exp(-amp * np.exp(-((x - x0) ** 2) / (2 * sigma**2)))

    fits = []
    for _ in range(300):
        counts = rng.poisson(model(0.3), size=(length, x.size)).mean(axis=0)  # L rows of the same line
        x0 = 0.0
        for _ in range(6):  # Gauss-Newton on the mean profile (Poisson weights ~ 1/dose here)
            m = model(x0)
            d = (model(x0 + 1e-4) - model(x0 - 1e-4)) / 2e-4
            x0 += float(np.sum(d * (counts - m) / m) / np.sum(d * d / m))
        fits.append(x0)
    assert np.mean(fits) == pytest.approx(0.3, abs=3 * bound / np.sqrt(300) + 0.01)
    assert np.std(fits) == pytest.approx(bound, rel=0.15)


def test_line_snr_of_points_by_hand():
    # amplitude 0.1 (contrast 1 - e^-0.1 = 0.0952), sigma 2 px, 100 counts per px:
    # 0.0952 * sqrt(100 * 2 * sqrt(pi)) = 0.0952 * 18.83 = 1.792
    assert line_snr_of_points(np.array([0.1]), np.array([2.0]), 100.0)[0] == pytest.approx(1.792, rel=1e-3)
    # dark and bright lines of the same |contrast| alike; 4x the dose doubles it
    a = line_snr_of_points(np.array([-np.log(1.2), np.log(1 / 0.8)]), np.array([1.0, 1.0]), 400.0)
    assert a[0] == pytest.approx(a[1]) == pytest.approx(2 * line_snr_of_points(np.array([np.log(1.25)]), np.array([1.0]), 100.0)[0])


def test_normalise_view_robust():
    rng = np.random.default_rng(0)
    img = rng.normal(5.0, 2.0, (64, 64)).astype(np.float32)
    img[0, 0] = 1e6  # a hot pixel does not set the scale
    n = normalise_view(img)
    assert n.dtype == np.float32
    assert abs(float(np.median(n))) < 1e-3
    assert 0.1 < float(np.percentile(n, 99) - np.percentile(n, 1)) < 1.1
    valid = np.zeros((64, 64), bool)
    valid[:32] = True
    n2 = normalise_view(img, valid)
    assert np.all(n2[32:] == 0)
    assert np.all(normalise_view(np.ones((8, 8))) == 0)


def test_synth_imports_no_torch():
    code = "import sys, livestereo.synth; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
