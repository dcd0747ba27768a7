"""Detection maps + disparity -> 3D polylines (livestereo.compute.lines): geometry round trips.

A small projector stands in for the networks: 3D curves are projected into the reference
view by E1/E2 (a point (x, y, z) appears at ((x, y) - theta * z) / p px), rasterised as a
Gaussian line-probability tube, and the disparity map holds beta * z / p of the nearest
curve point (E4), NaN off the lines.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from livestereo.compute.lines import DislocationLine, LineParams, depth_map, extract_lines, skeleton_paths
from livestereo.compute.stereo_geometry import baseline_unit


def render(curves, thetas, p, shape, sigma_px=1.0, pairs=((0, 1),)):
    """prob (ny, nx) of view 0 and disparity maps (P, ny, nx) along each pair's baseline."""
    thetas = np.asarray(thetas, float)
    pos = {k: [] for k in range(len(thetas))}
    for c in curves:
        for k, t in enumerate(thetas):
            pos[k].append((c[:, :2] - t * 1e-3 * c[:, 2:3]) / p)
    pos = {k: np.concatenate(v) for k, v in pos.items()}
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    q = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    d, i = cKDTree(pos[0]).query(q)
    prob = np.exp(-(d**2) / (2 * sigma_px**2)).reshape(shape)
    disp = []
    for a, b in pairs:
        dv = (pos[a] - pos[b]) @ baseline_unit(thetas[a], thetas[b])
        m = dv[i].reshape(shape)
        m[prob < 0.05] = np.nan
        disp.append(m)
    return prob, np.array(disp)


def curve(fx, fy, fz, n=4000, closed=False):
    s = np.linspace(0, 1, n, endpoint=not closed)
    return np.column_stack([fx(s), fy(s), fz(s)])


ARC = curve(lambda s: 20 + 100 * s, lambda s: 40 + 15 * np.sin(np.pi * s), lambda s: -80 + 150 * s)
LOOP = curve(lambda s: 150 + 25 * np.cos(2 * np.pi * s), lambda s: 150 + 20 * np.sin(2 * np.pi * s),
             lambda s: 30 + 20 * np.sin(2 * np.pi * s), closed=True)
CROSSING = curve(lambda s: 60 + 20 * s, lambda s: 10 + 110 * s, lambda s: 60 - 100 * s)


def _length(c, closed=False):
    seg = np.linalg.norm(np.diff(c, axis=0), axis=1).sum()
    return seg + (np.linalg.norm(c[0] - c[-1]) if closed else 0.0)


def _errors(lines, curves):
    tree = cKDTree(np.concatenate(curves))
    return np.concatenate([tree.query(ln.points_nm)[0] for ln in lines])


def _match(lines, curves):
    """index of the true curve each line follows (by median distance)."""
    trees = [cKDTree(c) for c in curves]
    return [int(np.argmin([np.median(t.query(ln.points_nm)[0]) for t in trees])) for ln in lines]


@pytest.mark.parametrize("baseline_deg", [0.0, 30.0, 90.0, 135.0, 250.0])
def test_round_trip_single_curve(baseline_deg):
    """p = 1 nm, beta = 105 mrad (6 deg), t = 200 nm: every point within 0.5 nm of the curve."""
    u = np.array([math.cos(math.radians(baseline_deg)), math.sin(math.radians(baseline_deg))])
    th = np.array([-52.5 * u, 52.5 * u])
    c = curve(lambda s: 30 + 90 * s, lambda s: 50 + 25 * np.sin(1.5 * np.pi * s), lambda s: -95 + 190 * s)
    prob, disp = render([c], th, 1.0, (140, 150))
    lines = extract_lines(prob, disp[0], th, 1.0)
    assert len(lines) == 1
    ln = lines[0]
    assert isinstance(ln, DislocationLine) and ln.id == 0 and not ln.closed
    err = _errors(lines, [c])
    assert np.median(err) < 0.1
    assert err.max() < 0.5
    # skeleton ends retract by about the line width: nearly the whole curve is found
    assert ln.length_nm == pytest.approx(_length(c), rel=0.05)
    assert ln.points_nm.shape == (ln.n_points, 3) and ln.sigma_z_nm.shape == (ln.n_points,)
    assert np.all(np.isfinite(ln.sigma_z_nm)) and np.median(ln.sigma_z_nm) < 0.5
    # pixels_px are positions in view 0; points are the theta = 0 positions
    back = (ln.points_nm[:, :2] - th[0] * 1e-3 * ln.points_nm[:, 2:3]) / 1.0
    assert np.allclose(back, ln.pixels_px)


@pytest.mark.parametrize("th", [((-52.5, 0), (52.5, 0)), ((37, 37), (-37, -37)), ((20, -40), (-30, 50))])
def test_round_trip_crossing_lines_and_a_loop(th):
    th = np.asarray(th, float)
    curves = [ARC, LOOP, CROSSING]
    prob, disp = render(curves, th, 1.0, (200, 200))
    lines = extract_lines(prob, disp[0], th, 1.0)
    assert len(lines) == 3  # the X crossing stays two lines
    assert sorted(_match(lines, curves)) == [0, 1, 2]
    loop = [ln for ln, m in zip(lines, _match(lines, curves)) if m == 1][0]
    assert loop.closed
    assert loop.length_nm == pytest.approx(_length(LOOP, closed=True), rel=0.03)
    err = _errors(lines, curves)
    assert np.median(err) < 0.1
    assert np.percentile(err, 95) < 0.6
    assert err.max() < 1.5  # worst near the crossing, where depth is interpolated


def test_spurs_are_pruned_and_junctions_split():
    p = 1.0
    th = np.array([[-50.0, 0.0], [50.0, 0.0]])
    main = curve(lambda s: 20 + 100 * s, lambda s: 60 + 0 * s, lambda s: -50 + 100 * s)
    spur = curve(lambda s: 70 + 0 * s, lambda s: 60 + 4 * s, lambda s: 0 * s)  # 4 px side branch
    branch = curve(lambda s: 70 + 0 * s, lambda s: 60 + 40 * s, lambda s: 0 + 40 * s)  # a T junction
    prob, disp = render([main, spur], th, p, (120, 140))
    lines = extract_lines(prob, disp[0], th, p)
    assert len(lines) == 1
    assert lines[0].length_nm == pytest.approx(_length(main), rel=0.05)
    prob, disp = render([main, branch], th, p, (120, 140))
    lines = extract_lines(prob, disp[0], th, p)
    assert len(lines) == 2
    assert sorted(_match(lines, [main, branch])) == [0, 1]
    assert lines[0].length_nm == pytest.approx(_length(main), rel=0.06)
    # min_length_px drops short bits
    long_only = extract_lines(prob, disp[0], th, p, params=LineParams(min_length_px=60))
    assert len(long_only) == 1 and long_only[0].length_nm == pytest.approx(lines[0].length_nm)


def test_more_views_least_squares_and_given_sigma():
    th = np.array([[52.5 * math.cos(a), 52.5 * math.sin(a)] for a in np.linspace(0, 2 * math.pi, 4, endpoint=False)])
    pairs = [(0, 1), (0, 2), (0, 3)]
    c = curve(lambda s: 30 + 80 * s, lambda s: 70 - 30 * s, lambda s: 60 - 120 * s**2)
    prob, disp = render([c], th, 0.5, (180, 180), pairs=pairs)
    rng = np.random.default_rng(3)
    noisy = disp + rng.normal(0, 0.2, disp.shape)
    sig = np.full(disp.shape, 0.2)
    lines = extract_lines(prob, noisy, th, 0.5, pairs=pairs, sigma_disparity=sig)
    assert len(lines) == 1
    err = _errors(lines, [c])
    assert np.median(err) < 0.5
    # per-point sigma: the least-squares depth sigma over the pairs, reduced by smoothing
    _, s_raw = depth_map(noisy, th, 0.5, pairs=pairs, sigma_disparity=sig)
    s0 = np.nanmedian(s_raw)
    assert s0 == pytest.approx(0.2 * 0.5 / math.sqrt(sum(np.hypot(*(th[j] - th[0])) ** 2 for _, j in pairs) * 1e-6))
    assert 0 < np.median(lines[0].sigma_z_nm) < s0
    # the reported sigma is honest: |z error| mostly within 3 sigma
    tree = cKDTree(c)
    _, idx = tree.query(lines[0].points_nm)
    zerr = np.abs(lines[0].points_nm[:, 2] - c[idx, 2])
    assert np.mean(zerr < 3 * lines[0].sigma_z_nm) > 0.9


def test_noise_without_sigma_gives_residual_sigma():
    th = np.array([[-52.5, 0.0], [52.5, 0.0]])
    c = curve(lambda s: 20 + 100 * s, lambda s: 40 + 20 * s, lambda s: -50 + 100 * s)
    prob, disp = render([c], th, 1.0, (100, 140))
    rng = np.random.default_rng(5)
    lines = extract_lines(prob, disp[0] + rng.normal(0, 0.1, disp[0].shape), th, 1.0)
    assert len(lines) == 1
    s = np.median(lines[0].sigma_z_nm)
    assert 0.05 < s < 0.1 / 0.105  # below the raw depth noise (smoothed), above zero


def test_valid_mask_empty_and_bad_shapes():
    th = np.array([[-52.5, 0.0], [52.5, 0.0]])
    prob, disp = render([ARC], th, 1.0, (100, 140))
    valid = np.ones(prob.shape, bool)
    valid[:, 70:] = False  # right half not scanned yet
    lines = extract_lines(prob, disp[0], th, 1.0, valid=valid)
    assert len(lines) == 1 and lines[0].pixels_px[:, 0].max() < 70
    assert extract_lines(np.zeros((50, 50)), np.full((50, 50), np.nan), th, 1.0) == []
    # no depth anywhere: the line is dropped rather than invented
    assert extract_lines(prob, np.full(prob.shape, np.nan), th, 1.0) == []
    with pytest.raises(ValueError, match="does not match"):
        extract_lines(prob, disp[0][:, :-1], th, 1.0)
    # K per-view maps: only view 0 is used
    lines3 = extract_lines(np.stack([prob, np.zeros_like(prob)]), disp[0], th, 1.0)
    assert len(lines3) == 1


def test_pixel_graph_m_adjacency_has_no_false_junctions():
    from livestereo.compute.lines import _trace_graph

    sk = np.zeros((40, 40), bool)
    # a staircase diagonal (4-connected steps), which 8-adjacency would see as a chain of junctions
    r, c = 5, 5
    for _ in range(12):
        sk[r, c] = sk[r, c + 1] = True
        r, c = r + 1, c + 1
    sk[r, c] = True
    coords, edges, junctions, _ = _trace_graph(sk)
    assert junctions == set()
    assert len(edges) == 1 and len(edges[0].pix) == sk.sum()
    # a plus sign: one junction, four branches
    plus = np.zeros((21, 21), bool)
    plus[10, 2:19] = True
    plus[2:19, 10] = True
    coords, edges, junctions, _ = _trace_graph(plus)
    assert len(junctions) == 1 and len(edges) == 4
    # skeleton_paths continues straight through the crossing: two lines
    paths = skeleton_paths(plus, LineParams(spur_length_px=0))
    assert len(paths) == 2 and all(not closed for _, closed in paths)
    assert sorted(len(pix) for pix, _ in paths) == [17, 17]


@pytest.mark.parametrize("baseline_deg", [0.0, 30.0, 90.0, 135.0])
@pytest.mark.parametrize("half_width_px", [0.5, 1.5])
def test_round_trip_from_binary_line_masks(baseline_deg, half_width_px):
    """Rasterised (0/1) line masks instead of probabilities: still sub-pixel on average."""
    u = np.array([math.cos(math.radians(baseline_deg)), math.sin(math.radians(baseline_deg))])
    th = np.array([-52.5 * u, 52.5 * u])
    c = curve(lambda s: 30 + 90 * s, lambda s: 50 + 25 * np.sin(1.5 * np.pi * s), lambda s: -95 + 190 * s)
    prob, disp = render([c], th, 1.0, (140, 150))
    mask = (prob >= math.exp(-(half_width_px**2) / 2)).astype(np.float32)
    lines = extract_lines(mask, disp[0], th, 1.0)
    assert len(lines) == 1
    err = _errors(lines, [c])
    assert np.median(err) < 0.2
    assert np.percentile(err, 95) < 0.5
    assert err.max() < 0.8


def test_a_line_with_many_spurs_stays_one_line():
    """A comb: each pruned spur lowers its junction's degree, so the line runs on through
    all of them (the degree bookkeeping of the pruning, which is incremental)."""
    mask = np.zeros((40, 200), bool)
    mask[20, 5:195] = True
    for x in range(15, 190, 8):
        mask[21:24, x] = True  # 3 px spurs below the line
        mask[17:20, x + 4] = True  # and above it
    paths = skeleton_paths(mask)
    assert len(paths) == 1
    rc, closed = paths[0]
    assert not closed and np.all(np.abs(rc[:, 0] - 20) < 1e-9)
    assert rc[:, 1].min() <= 6 and rc[:, 1].max() >= 193
    # a fork at the end, both arms shorter than a spur: once the shorter one is pruned the
    # junction has degree 2, so the longer arm is the line's own end and stays
    fork = np.zeros((40, 200), bool)
    fork[20, 20:155] = True  # the line ends with a 4 px arm past the fork at x = 150
    fork[21:23, 150] = True  # the 2 px arm
    (rc, _), = skeleton_paths(fork)
    assert rc[:, 1].max() == 154 and rc[:, 0].max() == 20


def test_noisy_mask_links_into_paths_on_its_skeleton():
    """A mask of noise (thousands of branches and junctions): linking finishes and every
    path point lies on the skeleton or on a fill across a junction (<= junction_merge_px
    long, so within half of it of a skeleton pixel)."""
    from scipy import ndimage
    from skimage.morphology import skeletonize

    mask = np.random.default_rng(3).random((256, 256)) < 0.35
    sk = skeletonize(mask)
    paths = skeleton_paths(mask)
    assert len(paths) > 100
    on = np.concatenate([rc for rc, _ in paths])
    r, c = np.rint(on).astype(int).T
    dist = ndimage.distance_transform_edt(~sk)
    assert dist[r, c].max() <= LineParams().junction_merge_px / 2 + 1


def test_depth_sigma_accounts_for_correlated_disparity_errors():
    """sigma_z's noise gain for errors correlated along the line equals the scatter of the
    smoothed depth in a Monte Carlo of AR(1) errors with that correlation (numpy reference:
    np.convolve with the Savitzky-Golay coefficients of scipy.signal)."""
    from scipy.signal import savgol_coeffs

    from livestereo.compute.lines import _noise_gain

    w, order, ell = 15, 2, 1.0
    c = savgol_coeffs(w, order)
    assert _noise_gain(w, order, 0.0) == pytest.approx(np.sqrt((c**2).sum()))
    assert _noise_gain(w, order, 1e9) == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(0)
    a = math.exp(-1.0 / ell)  # AR(1) with correlation a^|k| = exp(-|k| / ell), unit variance
    e = np.empty((4000, 200))
    e[:, 0] = rng.normal(size=4000)
    for i in range(1, 200):
        e[:, i] = a * e[:, i - 1] + math.sqrt(1 - a * a) * rng.normal(size=4000)
    out = np.array([np.convolve(row, c, mode="valid") for row in e])
    assert out.std() == pytest.approx(_noise_gain(w, order, ell), rel=0.03)
    # on a line: error_correlation_px scales sigma_z by that gain over the independent one
    th = np.array([[-50.0, 0.0], [50.0, 0.0]])
    line = curve(lambda s: 20 + 100 * s, lambda s: 60 + 0 * s, lambda s: -30 + 60 * s)
    prob, disp = render([line], th, 1.0, (120, 140))
    sd = np.full(prob.shape, 0.5)
    (l0,) = extract_lines(prob, disp[0], th, 1.0, sigma_disparity=sd, params=LineParams(error_correlation_px=0.0))
    (l1,) = extract_lines(prob, disp[0], th, 1.0, sigma_disparity=sd)
    mid = len(l0.sigma_z_nm) // 2
    ratio = _noise_gain(w, order, LineParams().error_correlation_px) / _noise_gain(w, order, 0.0)
    assert l1.sigma_z_nm[mid] / l0.sigma_z_nm[mid] == pytest.approx(ratio, rel=1e-9)
    np.testing.assert_array_equal(l1.points_nm, l0.points_nm)
