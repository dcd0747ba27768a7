"""Nanoparticle pipeline (livestereo.compute.particles): detection, line search, depth, table."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from scipy import ndimage

from livestereo.compute.particles import (
    FLAGS,
    ParticleParams,
    read_particle_table,
    reconstruct_particles,
    theory_sigma_z_nm,
    write_particle_table,
)
from livestereo.compute.particles.circles import HALF_RES_SIGMA, log_stack, log_stack_fast
from livestereo.compute.particles.linesearch import _fit, fit_depth
from livestereo.sim.particles import ParticleSimConfig, ParticleSimulator

QUAD = np.array([[25.0, 25.0], [-25.0, 25.0], [-25.0, -25.0], [25.0, -25.0]])


def make_views(parts, angles, shape=(96, 128), p=1.0, bg=400.0, contrast=0.5, skip=(), rng=None):
    """Independent numpy forward model: Gaussian dark blobs (sigma = r / 2) at (x - theta dz) / p.

    parts: rows (x_nm, y_nm, dz_nm, r_nm); skip: (particle, view) pairs left out."""
    angles = np.asarray(angles, float)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    imgs = np.full((len(angles), ny, nx), bg)
    for i, (x, y, z, r) in enumerate(parts):
        for v, th in enumerate(angles):
            if (i, v) in skip:
                continue
            cx = (x - th[0] * 1e-3 * z) / p
            cy = (y - th[1] * 1e-3 * z) / p
            s = r / p / 2
            imgs[v] *= 1 - contrast * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    if rng is not None:
        imgs = rng.poisson(imgs).astype(np.float64)
    return imgs


def match(table, xy):
    """Index of the table row nearest each (x, y) nm."""
    d = np.hypot(table.x_nm[:, None] - xy[None, :, 0], table.y_nm[:, None] - xy[None, :, 1])
    return d.argmin(0), d.min(0)


GRID = np.array([[20, 20, -80, 4], [60, 20, -40, 4], [100, 24, 0, 5], [24, 60, 40, 4], [64, 64, 80, 6],
                 [104, 70, 120, -1]], dtype=float)
GRID[5, 3] = 3.0


def test_known_geometry_exact_depths():
    imgs = make_views(GRID, QUAD)
    t = reconstruct_particles(imgs, None, QUAD, 1.0)
    assert len(t) == len(GRID)
    i, d = match(t, GRID[:, :2])
    assert d.max() < 0.1  # lateral position (theta = 0 view), nm
    np.testing.assert_allclose(t.z_nm[i], GRID[:, 2], atol=1.0)
    assert np.all(t.n_views == 4) and np.all(t.views == 0b1111) and np.all(t.flags == 0)
    assert np.all(np.isfinite(t.sigma_z_nm)) and np.all(t.sigma_z_nm < 2)
    # the detections used are the projections r0 - theta * dz
    want = (GRID[:, None, :2] - QUAD[None] * 1e-3 * GRID[:, None, 2:3])
    np.testing.assert_allclose(t.view_xy_px[i], want, atol=0.06)


def test_scale_space_peaks_option_same_geometry():
    t = reconstruct_particles(make_views(GRID, QUAD), None, QUAD, 1.0,
                              ParticleParams(scale_nms="3d", overlap_prune=1.0))
    assert len(t) == len(GRID)
    i, _ = match(t, GRID[:, :2])
    np.testing.assert_allclose(t.z_nm[i], GRID[:, 2], atol=1.0)


def test_scan_step_and_sign_conventions():
    # p = 0.5 nm: pixels are half a nm; a particle above the crossover (dz > 0) seen with
    # theta_x > 0 moves to -x
    parts = np.array([[30.0, 20.0, 60.0, 2.5], [12.0, 30.0, -60.0, 2.5]])
    angles = np.array([[40.0, 0.0], [-40.0, 0.0], [0.0, 40.0]])
    imgs = make_views(parts, angles, shape=(96, 96), p=0.5)
    t = reconstruct_particles(imgs, None, angles, 0.5)
    i, d = match(t, parts[:, :2])
    np.testing.assert_allclose(t.z_nm[i], parts[:, 2], atol=1.0)
    assert t.view_xy_px[i[0], 0, 0] == pytest.approx((30.0 - 0.040 * 60) / 0.5, abs=0.05)


def test_missing_view_is_flagged_and_depth_kept():
    imgs = make_views(GRID, QUAD, skip={(2, 1)})  # particle 2 is not in segment 1
    t = reconstruct_particles(imgs, None, QUAD, 1.0)
    assert len(t) == len(GRID)
    i, _ = match(t, GRID[:, :2])
    np.testing.assert_allclose(t.z_nm[i], GRID[:, 2], atol=1.5)
    k = i[2]
    assert t.n_views[k] == 3 and t.views[k] == 0b1101
    assert t.flags[k] & FLAGS["missing_view"]
    assert np.isnan(t.view_xy_px[k, 1]).all()
    assert "missing_view" in t.flag_strings()[k]
    others = np.delete(i, 2)
    assert np.all(t.n_views[others] == 4)
    # with min_views = 4 the particle is dropped
    t4 = reconstruct_particles(imgs, None, QUAD, 1.0, ParticleParams(min_views=4))
    assert len(t4) == len(GRID) - 1


def test_ambiguous_pair_resolved_one_detection_per_particle():
    # P2's image in segment 1 lies on P1's search segment (at dz = +60): two candidates for
    # P1 in segment 1; segments 2 and 3 decide
    ang = np.array([[40.0, 40.0], [-40.0, 40.0], [-40.0, -40.0], [40.0, -40.0]])
    q0 = np.array([60.0, 50.0])
    p1 = [*(q0 + ang[0] * 1e-3 * -60.0), -60.0, 2.5]  # seen at q0 in segment 0
    # P2 appears in segment 1 where P1 would appear if it were at dz = +60
    target = q0 + (-(ang[1] - ang[0]) * 1e-3) * 60.0
    p2 = [*(target + ang[1] * 1e-3 * -60.0), -60.0, 2.5]  # 9.6 px from P1 in every view
    parts = np.array([p1, p2])
    imgs = make_views(parts, ang, shape=(100, 120))
    t = reconstruct_particles(imgs, None, ang, 1.0)
    assert len(t) == 2
    i, d = match(t, parts[:, :2])
    assert len(set(i)) == 2 and np.all(t.n_views == 4)
    np.testing.assert_allclose(t.z_nm[i], parts[:, 2], atol=1.0)
    for v in range(4):  # one detection per particle in every view
        xy = t.view_xy_px[:, v]
        assert np.linalg.norm(xy[0] - xy[1]) > 8


def test_crowded_field_one_to_one_and_few_wrong_matches():
    cfg = ParticleSimConfig(scan_shape=(192, 192), n_particles=150, seed=21, materials=("Au", "Pt"),
                            radius_range_nm=(2.0, 6.0), dose_e_per_a2=10.0)
    sim = ParticleSimulator(cfg)
    truth = sim.truth()
    t = reconstruct_particles(sim.segment_images(), None, sim.effective_angles_mrad, 1.0)
    # one detection per particle: no detection position repeats within a view
    for v in range(4):
        xy = t.view_xy_px[:, v]
        xy = xy[np.isfinite(xy).all(1)]
        assert len(np.unique(np.round(xy, 6), axis=0)) == len(xy)
    from scipy.optimize import linear_sum_assignment

    d = np.hypot(t.x_nm[:, None] - truth["x_nm"][None], t.y_nm[:, None] - truth["y_nm"][None])
    ok = d <= truth["radius_nm"][None]
    ri, ci = linear_sum_assignment(np.where(ok, d, 1e6))
    good = ok[ri, ci]
    ri, ci = ri[good], ci[good]
    precision = len(ri) / len(t)
    assert precision >= 0.97
    assert len(ri) / len(truth["x_nm"]) >= 0.6  # projections overlap a lot at this density
    # wrong match: a used view whose detection is not this particle's projection
    dv = np.linalg.norm(t.view_xy_px[ri] - truth["view_xy_px"][ci], axis=-1)
    wrong = np.nan_to_num(dv, nan=0.0) > truth["radius_nm"][ci][:, None]
    assert wrong.any(1).mean() <= 0.05


def test_noisy_scene_detection_and_depth_precision():
    cfg = ParticleSimConfig(scan_shape=(256, 256), n_particles=60, seed=31, materials=("Au", "Pt"))
    sim = ParticleSimulator(cfg)
    truth = sim.truth()
    t = reconstruct_particles(sim.segment_images(), None, sim.effective_angles_mrad, 1.0)
    d = np.hypot(t.x_nm[:, None] - truth["x_nm"][None], t.y_nm[:, None] - truth["y_nm"][None])
    ok = d <= truth["radius_nm"][None]
    from scipy.optimize import linear_sum_assignment

    ri, ci = linear_sum_assignment(np.where(ok, d, 1e6))
    keep = ok[ri, ci]
    ri, ci = ri[keep], ci[keep]
    assert len(ri) / len(t) >= 0.97
    assert len(ri) / len(truth["x_nm"]) >= 0.85
    err = t.z_nm[ri] - truth["dz_nm"][ci]
    vx = t.view_xy_px[ri] - truth["view_xy_px"][ci]
    sxy = 1.4826 * np.nanmedian(np.abs(vx))  # robust per-axis position error (px = nm here)
    theory = theory_sigma_z_nm(sxy, sim.effective_angles_mrad)
    rmse = np.sqrt(np.mean(err**2))
    assert rmse <= 2.0 * theory, (rmse, theory)
    chi = np.sqrt(np.mean((err / t.sigma_z_nm[ri]) ** 2))
    assert 0.5 < chi < 2.5
    np.testing.assert_allclose(np.median(t.radius_nm[ri] / truth["radius_nm"][ci]), 1.0, atol=0.2)


def test_partial_scan_valid_mask():
    imgs = make_views(GRID, QUAD)
    valid = np.zeros(imgs.shape[1:], bool)
    valid[:45] = True  # rows 0..44 scanned so far
    imgs[:, 45:] = 0  # unfilled positions hold nothing
    t = reconstruct_particles(imgs, valid, QUAD, 1.0)
    assert len(t) >= 2
    assert np.all(t.y_nm < 45)
    i, d = match(t, GRID[:2, :2])
    np.testing.assert_allclose(t.z_nm[i], GRID[:2, 2], atol=1.0)


def test_more_segments_and_two_segments():
    ang8 = np.array([[30 * np.cos(a), 30 * np.sin(a)] for a in np.arange(8) * np.pi / 4 + np.pi / 8])
    t = reconstruct_particles(make_views(GRID, ang8), None, ang8, 1.0)
    i, _ = match(t, GRID[:, :2])
    np.testing.assert_allclose(t.z_nm[i], GRID[:, 2], atol=1.0)
    assert np.all(t.n_views == 8)
    ang2 = np.array([[-40.0, 0.0], [40.0, 0.0]])
    t = reconstruct_particles(make_views(GRID, ang2), None, ang2, 1.0)
    i, _ = match(t, GRID[:, :2])
    np.testing.assert_allclose(t.z_nm[i], GRID[:, 2], atol=1.0)


def test_bad_inputs_raise_clear_errors():
    imgs = make_views(GRID[:2], QUAD, shape=(32, 32))
    with pytest.raises(ValueError, match="4 segments but segment_angles_mrad has 3"):
        reconstruct_particles(imgs, None, QUAD[:3], 1.0)
    with pytest.raises(ValueError, match="empty"):
        reconstruct_particles(imgs, np.zeros((32, 32), bool), QUAD, 1.0)
    with pytest.raises(ValueError, match="empty"):
        reconstruct_particles(np.zeros((4, 0, 32)), None, QUAD, 1.0)
    bad = imgs.copy()
    bad[2, 5, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*segment 2, row 5, col 7"):
        reconstruct_particles(bad, None, QUAD, 1.0)
    with pytest.raises(ValueError, match=r"\(n_seg, ny, nx\)"):
        reconstruct_particles(imgs[0], None, QUAD, 1.0)
    with pytest.raises(ValueError, match="valid mask has shape"):
        reconstruct_particles(imgs, np.ones((31, 32), bool), QUAD, 1.0)
    with pytest.raises(ValueError, match="no stereo baseline"):
        reconstruct_particles(imgs, None, np.zeros((4, 2)), 1.0)
    with pytest.raises(ValueError, match="scan_step_nm"):
        reconstruct_particles(imgs, None, QUAD, 0.0)
    # NaN outside the valid region is fine (unfilled positions)
    ok = imgs.copy()
    ok[:, 30:] = np.nan
    valid = np.ones((32, 32), bool)
    valid[30:] = False
    reconstruct_particles(ok, valid, QUAD, 1.0)


def test_flat_images_give_an_empty_table():
    t = reconstruct_particles(np.full((4, 64, 64), 50.0), None, QUAD, 1.0)
    assert len(t) == 0 and t.view_xy_px.shape == (0, 4, 2)


def test_log_stack_matches_scipy_reference():
    rng = np.random.default_rng(0)
    # smooth input: the Fourier filter is the continuous LoG, scipy samples a truncated kernel
    img = ndimage.gaussian_filter(rng.normal(size=(128, 96)), 2.0, mode="wrap").astype(np.float32)
    sig = [1.5, 2.5, 4.0]
    R = log_stack(img, sig)
    for k, s in enumerate(sig):
        ref = -s * s * ndimage.gaussian_laplace(img.astype(np.float64), s, mode="wrap")
        np.testing.assert_allclose(R[k], ref, atol=2e-3 * np.abs(ref).max())


def test_weighted_fit_matches_numpy_reference():
    rng = np.random.default_rng(1)
    S = rng.normal(size=(5, 2)) * 0.03
    r0, dz = np.array([10.0, -4.0]), 37.0
    q = r0 + S * dz + rng.normal(size=(5, 2)) * 0.1
    w = rng.uniform(0.5, 2.0, 5)
    mem = np.array([0, 1, 2, -1, 4])
    qn = q.copy()
    qn[3] = np.nan
    ref_r0, ref_dz, res = fit_depth(qn, S, w)
    r0x, r0y, dz_fit, emax, erms, info = _fit(mem, q[:, 0], q[:, 1], w, S)
    assert dz_fit == pytest.approx(ref_dz, rel=1e-10)
    np.testing.assert_allclose([r0x, r0y], ref_r0, rtol=1e-10)
    assert emax == pytest.approx(np.nanmax(np.linalg.norm(res, axis=1)), rel=1e-10)
    # and plain least squares with numpy.linalg.lstsq on the stacked system
    use = [0, 1, 2, 4]
    A = np.zeros((8, 3))
    b = np.zeros(8)
    for k, v in enumerate(use):
        sw = np.sqrt(w[v])
        A[2 * k] = [sw, 0, sw * S[v, 0]]
        A[2 * k + 1] = [0, sw, sw * S[v, 1]]
        b[2 * k: 2 * k + 2] = sw * q[v]
    sol = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(sol, [r0x, r0y, dz_fit], rtol=1e-9)
    with pytest.raises(ValueError, match="identical angles"):
        fit_depth(q[:2], np.zeros((2, 2)))


def test_table_hdf5_and_csv_round_trip(tmp_path):
    imgs = make_views(GRID, QUAD, skip={(1, 3)})
    t = reconstruct_particles(imgs, None, QUAD, 1.0)
    write_particle_table(t, tmp_path / "p.h5", tmp_path / "p.csv")
    back = read_particle_table(tmp_path / "p.h5")
    for name in ("id", "x_nm", "y_nm", "z_nm", "radius_nm", "sigma_z_nm", "n_views", "views", "flags"):
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
    np.testing.assert_array_equal(back.view_xy_px, t.view_xy_px)
    np.testing.assert_allclose(back.meta["segment_angles_mrad"], QUAD)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == len(t)
    assert list(rows[0]) == ["id", "x_nm", "y_nm", "z_nm", "radius_nm", "sigma_z_nm", "n_views", "views",
                             "residual_px", "flags"]
    assert sum("missing_view" in r["flags"] for r in rows) == 1
    assert float(rows[0]["z_nm"]) == pytest.approx(t.z_nm[0], abs=1e-3)
    # into a group of an open file (one group per scan)
    with h5py.File(tmp_path / "run.h5", "w") as f:
        write_particle_table(t, f.create_group("scan_0000/particles"))
    with h5py.File(tmp_path / "run.h5") as f:
        assert len(read_particle_table(f["scan_0000/particles"])) == len(t)


def test_parallel_views_and_filter_localisation_agree():
    imgs = make_views(GRID, QUAD, rng=np.random.default_rng(4))
    a = reconstruct_particles(imgs, None, QUAD, 1.0)
    b = reconstruct_particles(imgs, None, QUAD, 1.0, ParticleParams(view_threads=4))
    np.testing.assert_array_equal(a.z_nm, b.z_nm)
    c = reconstruct_particles(imgs, None, QUAD, 1.0, ParticleParams(localize="filter"))
    i, _ = match(c, GRID[:, :2])
    np.testing.assert_allclose(c.z_nm[i], GRID[:, 2], atol=3.0)


def test_half_resolution_coarse_scales_match_full_filter():
    rng = np.random.default_rng(2)
    img = (ndimage.gaussian_filter(rng.normal(size=(256, 192)), 1.5, mode="wrap")).astype(np.float32)
    sig = [1.0, 2.0, HALF_RES_SIGMA + 0.5, 6.0, 9.0]
    a, b = log_stack(img, sig), log_stack_fast(img, sig)
    np.testing.assert_array_equal(a[:2], b[:2])  # fine scales: the same computation
    for k in range(2, 5):
        assert np.abs(a[k] - b[k]).max() < 0.02 * np.abs(a[k]).max()
        np.testing.assert_allclose(a[k, ::2, ::2], b[k, ::2, ::2], atol=1e-4 * np.abs(a[k]).max())
    # odd sizes fall back to the full filter
    np.testing.assert_array_equal(log_stack_fast(img[:255], sig), log_stack(img[:255], sig))


def _sphere_contrast(shape, parts):
    """Contrast of projected spheres: a * sqrt(r^2 - rho^2) / r for rows (x, y, r, a) in px."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    c = np.zeros(shape)
    for x, y, r, a in parts:
        c += a * np.sqrt(np.clip(r * r - (xx - x) ** 2 - (yy - y) ** 2, 0, None)) / r
    return c


@pytest.mark.parametrize("sep", [10.0, 10.5, 11.0])
def test_touching_small_particle_next_to_a_big_one_is_split_off(sep):
    """A small particle touching a big one has no maximum of its own in the largest significance
    over scales (one merged blob); the hidden scale-space maximum gives it back, at its position."""
    from livestereo.compute.particles.circles import detect_circles

    rng = np.random.default_rng(3)
    truth = np.array([[50.3, 48.6, 8.0, 0.3], [50.3 + sep, 48.6, 3.5, 0.3]])
    c = (_sphere_contrast((96, 112), truth) + rng.normal(0, 0.003, (96, 112))).astype(np.float32)
    valid = np.ones(c.shape, dtype=bool)

    def near(d):
        dist = np.hypot(d.x[:, None] - truth[None, :, 0], d.y[:, None] - truth[None, :, 1])
        return dist.min(0), np.sum(dist.min(1) < 6.0)

    merged = detect_circles(c, valid, (1.5, 12.0), min_noise=0.002, hidden_peaks=False)
    dmin, n_near = near(merged)
    assert n_near == 1 and dmin[1] > 2.0  # the old behaviour: one blob
    split = detect_circles(c, valid, (1.5, 12.0), min_noise=0.002)
    dmin, n_near = near(split)
    assert n_near == 2
    assert dmin[0] < 1.5 and dmin[1] < 1.5
    big, small = (np.argmin(np.hypot(split.x - t[0], split.y - t[1])) for t in truth)
    assert split.radius[small] < 0.7 * split.radius[big]


def test_hidden_peaks_do_not_split_a_single_round_particle():
    from livestereo.compute.particles.circles import detect_circles

    rng = np.random.default_rng(4)
    for r in (3.0, 6.0, 9.0):
        c = (_sphere_contrast((96, 112), [(50.3, 48.6, r, 0.3)]) + rng.normal(0, 0.003, (96, 112))).astype(np.float32)
        d = detect_circles(c, np.ones(c.shape, dtype=bool), (1.5, 12.0), min_noise=0.002)
        assert np.sum(np.hypot(d.x - 50.3, d.y - 48.6) < r + 3) == 1


def test_touching_pair_gives_two_particles_in_the_pipeline():
    """Two touching particles (big + small) in all four views: two table rows at their positions."""
    rng = np.random.default_rng(5)
    parts = [(50.0, 48.0, 20.0, 8.0), (61.0, 48.5, -20.0, 3.5)]
    shape = (96, 112)
    imgs = np.empty((4, *shape))
    for v, th in enumerate(QUAD):
        proj = [((x - th[0] * 1e-3 * z), (y - th[1] * 1e-3 * z), r, 0.3) for x, y, z, r in parts]
        imgs[v] = rng.poisson(2000.0 * (1 - _sphere_contrast(shape, proj)))
    with_hidden = reconstruct_particles(imgs, None, QUAD, 1.0, ParticleParams())
    without = reconstruct_particles(imgs, None, QUAD, 1.0, ParticleParams(hidden_peaks=False))
    xy = np.array([p[:2] for p in parts])
    _, dist = match(with_hidden, xy)
    assert len(with_hidden) == 2 and (dist < 1.5).all()
    assert len(without) == 1
