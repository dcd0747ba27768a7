"""In-situ tracking of 3D dislocation lines: stable identities, displacement and velocity on
series of known motion (pure translated curves, and the simulator's own gliding lines)."""

from __future__ import annotations

import numpy as np
import pytest

from livestereo.compute.tracking import LineTracker


def _line(p0, p1, n=200):
    s = np.linspace(0, 1, n)[:, None]
    return np.asarray(p0, float) + s * (np.asarray(p1, float) - np.asarray(p0, float))


def _perp(v, u):
    u = np.asarray(u, float) / np.linalg.norm(u)
    return np.asarray(v, float) - np.dot(v, u) * u


def test_translated_curves_keep_ids_and_give_velocity():
    a = _line([10, 20, -30], [50, 25, 30])
    b = _line([60, 10, -10], [60, 60, 10])
    arc = np.column_stack([20 + 15 * np.cos(np.linspace(0, np.pi, 300)), 70 + 15 * np.sin(np.linspace(0, np.pi, 300)),
                           np.linspace(-20, 20, 300)])
    va, vb, vc = np.array([0.0, 3.0, 0.0]), np.array([-2.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.0])
    tr = LineTracker(max_distance_nm=10.0)
    dt = 4.0
    ids = None
    for k in range(5):
        curves = [a + k * va, b + k * vb, arc + k * vc]
        order = [2, 0, 1] if k % 2 else [0, 1, 2]  # the detector's line order changes from scan to scan
        steps = tr.update(k, 100.0 + k * dt, [curves[i] for i in order])
        by_truth = {order[s.line_index]: s for s in steps}
        if ids is None:
            ids = {i: by_truth[i].track_id for i in range(3)}
            assert all(s.status == "new" for s in steps) and len(set(ids.values())) == 3
            continue
        for i, s in by_truth.items():
            assert s.track_id == ids[i] and s.status == "continued"
            assert s.dt_s == pytest.approx(dt)
        # the perpendicular part of the motion (motion along a line is not observable)
        np.testing.assert_allclose(by_truth[0].displacement_nm, _perp(va, a[-1] - a[0]), atol=1e-6)
        np.testing.assert_allclose(by_truth[1].velocity_nm_s, _perp(vb, b[-1] - b[0]) / dt, atol=1e-6)
        assert by_truth[1].speed_nm_s == pytest.approx(2.0 / dt)
        assert by_truth[2].speed_nm_s == pytest.approx(0.0, abs=1e-9)
    summary = {t["track_id"]: t for t in tr.summary()}
    assert summary[ids[1]]["scans"] == [0, 1, 2, 3, 4] and not summary[ids[1]]["ended"]
    np.testing.assert_allclose(summary[ids[1]]["mean_velocity_nm_s"], [-0.5, 0, 0], atol=1e-6)


def test_new_lines_get_new_ids_and_lost_tracks_end():
    a = _line([0, 0, 0], [40, 0, 0])
    far = _line([0, 80, 0], [40, 80, 0])
    tr = LineTracker(max_distance_nm=5.0, max_missed=1)
    (s0,) = tr.update(0, 0.0, [a])
    s1 = tr.update(1, 1.0, [a + [0, 1, 0], far])
    assert s1[0].track_id == s0.track_id and s1[1].status == "new" and s1[1].track_id != s0.track_id
    # a jump beyond the gate is a new line, not a continuation
    s2 = tr.update(2, 2.0, [a + [0, 20, 0]])
    assert s2[0].status == "new" and s2[0].track_id not in (s0.track_id, s1[1].track_id)
    tr.update(3, 3.0, [a + [0, 20, 0]])
    ended = {t["track_id"]: t["ended"] for t in tr.summary()}
    assert ended[s0.track_id] and ended[s1[1].track_id] and not ended[s2[0].track_id]
    # a track missed for one scan (max_missed=1) is still continued
    tr2 = LineTracker(max_distance_nm=5.0, max_missed=1)
    (t0,) = tr2.update(0, 0.0, [a])
    tr2.update(1, 1.0, [])
    (t2,) = tr2.update(2, 2.0, [a + [0, 2, 0]])
    assert t2.track_id == t0.track_id and t2.dt_s == 2.0
    np.testing.assert_allclose(t2.velocity_nm_s, [0, 1, 0], atol=1e-9)


def test_partial_line_matches_its_track_without_changing_it():
    a = _line([0, 0, 0], [60, 0, 0], 400)
    tr = LineTracker(max_distance_nm=5.0)
    (s0,) = tr.update(0, 0.0, [a])
    half = a[:150] + [0, 1.5, 0]  # a snapshot: only part of the line scanned so far
    (tid, cost), = tr.match([half])
    assert tid == s0.track_id and cost < 5.0
    np.testing.assert_allclose(tr.displacement(tid, half), [0, 1.5, 0], atol=1e-6)
    assert tr.tracks[tid].scans == [0]  # match() does not update


def test_simulated_in_situ_series_identities_and_glide_velocity():
    """The simulator's gliding lines (jerky motion, drift): every line keeps one track id, and
    the velocity of the straight ones equals the truth (perpendicular part of glide + drift)."""
    from livestereo.sim.config import SimConfig
    from livestereo.sim.simulator import Simulator

    cfg = SimConfig(seed=4, scan_shape=(64, 64), n_dislocations=5, repeat=6, glide_velocity_nm_per_scan=3.0,
                    thickness_nm=150.0, material="gamma-TiAl", zone_axis=(1, 1, 0), drift_nm_per_scan=(0.3, -0.2),
                    frame_time_s=2e-4)
    sim = Simulator(cfg)
    scan_s = cfg.scan_shape[0] * cfg.scan_shape[1] * cfg.frame_time_s  # back-to-back scans
    tr = LineTracker(max_distance_nm=15.0)
    track_of: dict[int, int] = {}
    checked = 0
    for s in range(cfg.repeat):
        scene = sim.scene_at(s)
        truth = sim.truth(s) if s == 0 else None
        if truth is not None:
            assert truth["ids"] == scene.ids
        dis = [d for d in scene.dislocations if len(d.points_nm) >= 2]
        steps = tr.update(s, (s + 0.5) * scan_s, [d.points_nm for d in dis], [d.closed for d in dis])
        for d, st in zip(dis, steps):
            if d.id not in track_of:
                assert s == 0, f"dislocation {d.id} got a new track in scan {s}"
                track_of[d.id] = st.track_id
                continue
            assert st.track_id == track_of[d.id], f"scan {s}: dislocation {d.id} changed identity"
            assert st.dt_s == pytest.approx(scan_s)
            if d.kind == "straight":
                prev = sim.scene_at(s - 1).by_id(d.id)
                dq = d.params["q"] - prev.params["q"]
                move = dq * d.params["m"] + np.array([*cfg.drift_nm_per_scan, 0.0])
                expected = _perp(move, d.params["u"]) / scan_s
                np.testing.assert_allclose(st.velocity_nm_s, expected, atol=0.02 * np.linalg.norm(expected) + 1e-3)
                assert 0.3 * cfg.glide_velocity_nm_per_scan / scan_s < st.speed_nm_s < 3 * cfg.glide_velocity_nm_per_scan / scan_s
                checked += 1
    assert len(set(track_of.values())) == len(track_of) == 5
    assert checked >= 8, checked


def test_in_plane_speed_is_the_xy_part_of_the_perpendicular_motion():
    line = np.stack([np.linspace(0, 40, 41), np.zeros(41), np.zeros(41)], axis=1)  # along x
    tr = LineTracker(max_distance_nm=10.0)
    tr.update(0, 0.0, [line])
    (step,) = tr.update(1, 2.0, [line + [0.0, 3.0, 4.0]])  # 3 nm in y, 4 nm in depth, in 2 s
    assert step.speed_nm_s == pytest.approx(2.5)
    assert step.speed_xy_nm_s == pytest.approx(1.5)
    (summary,) = tr.summary()
    assert summary["mean_speed_xy_nm_s"] == pytest.approx(1.5)


def test_compiled_nearest_point_kernels_match_a_kd_tree_and_numpy():
    """The brute-force nearest points, median distances and segment projections give what a
    KD tree and the plain numpy projection give (tracking's own reference)."""
    from scipy.spatial import cKDTree

    from livestereo.compute.tracking import _Curve, curve_distance

    rng = np.random.default_rng(8)
    for trial in range(4):
        a = _Curve(np.cumsum(rng.normal(size=(40, 3)) * 2, axis=0), 1.0, 0.5)
        b = _Curve(np.cumsum(rng.normal(size=(55, 3)) * 2, axis=0) + rng.normal(size=3) * 3, 1.0, 0.5)
        tree_b = cKDTree(b.dense * b.scale)
        d_ref, i_ref = tree_b.query(a.dense * a.scale)
        d, i = b.nearest(a.dense)
        np.testing.assert_allclose(d, d_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b.distance(a.dense), d_ref, rtol=1e-12, atol=1e-12)
        dab, dba = curve_distance(a, b)
        assert dab == pytest.approx(np.median(d_ref), abs=1e-12)
        assert dba == pytest.approx(np.median(cKDTree(a.dense * a.scale).query(b.dense * b.scale)[0]), abs=1e-12)
        # segment projections against the numpy formulation
        f, _ = b.foot(a.dense)
        n = len(b.dense)
        best = b.dense[i_ref].copy()
        bestd = np.linalg.norm((a.dense - best) * b.scale, axis=1)
        for lo in (i_ref - 1, i_ref):
            ok = (lo >= 0) & (lo + 1 < n)
            p0, p1 = b.dense[np.clip(lo, 0, n - 1)], b.dense[np.clip(lo + 1, 0, n - 1)]
            ab = p1 - p0
            L2 = np.einsum("ij,ij->i", ab, ab)
            t = np.clip(np.einsum("ij,ij->i", a.dense - p0, ab) / np.where(L2 > 0, L2, 1.0), 0.0, 1.0)
            q = p0 + t[:, None] * ab
            dq = np.linalg.norm((a.dense - q) * b.scale, axis=1)
            better = ok & (dq < bestd)
            best[better], bestd[better] = q[better], dq[better]
        np.testing.assert_allclose(f, best, rtol=1e-12, atol=1e-12)


def test_large_curves_use_the_kd_tree_with_the_same_results(monkeypatch):
    from livestereo.compute import tracking
    from livestereo.compute.tracking import _Curve, curve_distance

    rng = np.random.default_rng(9)
    a = _Curve(np.cumsum(rng.normal(size=(30, 3)), axis=0), 1.0, 0.5)
    b = _Curve(np.cumsum(rng.normal(size=(30, 3)), axis=0), 1.0, 0.5)
    brute = curve_distance(a, b), b.nearest(a.dense), b.foot(a.dense)[0]
    monkeypatch.setattr(tracking, "_BRUTE_MAX_PAIRS", 0)
    tree = curve_distance(a, b), b.nearest(a.dense), b.foot(a.dense)[0]
    assert b._tree is not None
    np.testing.assert_allclose(tree[0], brute[0], atol=1e-12)
    np.testing.assert_allclose(tree[1][0], brute[1][0], atol=1e-12)
    np.testing.assert_allclose(tree[2], brute[2], atol=1e-12)


def test_z_velocity_uncertainty_from_the_lines_depth_sigma():
    line = np.stack([np.linspace(0, 40, 41), np.zeros(41), np.zeros(41)], axis=1)
    sig0 = np.full(41, 3.0)
    sig0[:5] = np.nan  # points without a sigma do not count
    sig1 = np.linspace(2.0, 6.0, 41)  # median 4
    tr = LineTracker(max_distance_nm=10.0)
    (first,) = tr.update(0, 0.0, [line], sigma_z=[sig0])
    assert first.velocity_sigma_z_nm_s is None
    (step,) = tr.update(1, 2.0, [line + [0.0, 1.0, 0.0]], sigma_z=[sig1])
    assert step.velocity_sigma_z_nm_s == pytest.approx(5.0 / 2.0)  # sqrt(3^2 + 4^2) / dt
    assert step.to_json_dict()["velocity_sigma_z_nm_s"] == pytest.approx(2.5)
    (no_sigma,) = tr.update(2, 4.0, [line + [0.0, 2.0, 0.0]])
    assert no_sigma.velocity_sigma_z_nm_s is None
    (unknown_before,) = tr.update(3, 6.0, [line + [0.0, 3.0, 0.0]], sigma_z=[2.0])
    assert unknown_before.velocity_sigma_z_nm_s is None and tr.tracks[0].sigma_z_nm == 2.0
    (summary,) = tr.summary()
    assert summary["median_velocity_sigma_z_nm_s"] == pytest.approx(2.5)  # the one step that had both sigmas


def test_update_lines_takes_the_lines_points_closure_and_sigma():
    from types import SimpleNamespace

    line = np.stack([np.linspace(0, 40, 41), np.zeros(41), np.zeros(41)], axis=1)
    a, b = LineTracker(max_distance_nm=10.0), LineTracker(max_distance_nm=10.0)
    for s in range(3):
        pts = line + [0.0, 1.5 * s, 0.5 * s]
        (x,) = a.update_lines(s, 2.0 * s, [SimpleNamespace(points_nm=pts, closed=False, sigma_z_nm=np.full(41, 1.0 + s))])
        (y,) = b.update(s, 2.0 * s, [pts], [False], [np.full(41, 1.0 + s)])
        assert x.to_json_dict() == y.to_json_dict()
    assert x.velocity_sigma_z_nm_s == pytest.approx(np.hypot(2.0, 3.0) / 2.0)


def test_a_line_seen_in_pieces_keeps_its_track_on_every_piece():
    """A dislocation detected as two pieces in one scan: the piece that continues its track
    one to one is "continued", the other a "fragment" of the same track (not a new one); its
    motion is measured from the previous line, the track's own motion counts once; the next
    scan's whole line continues the track from both pieces."""
    a = _line([0, 0, 0], [80, 0, 10], 400)
    v = np.array([0.0, 2.0, 0.0])
    tr = LineTracker(max_distance_nm=8.0)
    (s0,) = tr.update(0, 0.0, [a])
    head, tail = a[:230] + v, a[270:] + v  # a gap of ~8 nm where the line faded in this scan
    s1 = tr.update(1, 1.0, [tail, head])
    assert {s.track_id for s in s1} == {s0.track_id}
    assert sorted(s.status for s in s1) == ["continued", "fragment"]
    for s in s1:
        np.testing.assert_allclose(s.velocity_nm_s, _perp(v, a[-1] - a[0]), atol=1e-6)
    track = tr.tracks[s0.track_id]
    assert track.scans == [0, 1] and len(track.displacements_nm) == 1 and len(track.speeds_nm_s) == 1
    assert track.lengths_nm[-1] == pytest.approx(np.linalg.norm(a[229] - a[0]) + np.linalg.norm(a[-1] - a[270]), rel=1e-3)
    assert len(track.pieces) == 2
    # the provisional match of a live snapshot gives both pieces the track's id, and its
    # displacement is measured from the nearest piece, as a final scan's step is
    assert [m[0] for m in tr.match([head, tail])] == [s0.track_id, s0.track_id]
    np.testing.assert_allclose(tr.displacement(s0.track_id, tail[20:] + v), _perp(v, a[-1] - a[0]), atol=1e-6)
    # whole again: one line continues the track, measured from the nearest piece
    (s2,) = tr.update(2, 2.0, [a + 2 * v])
    assert s2.track_id == s0.track_id and s2.status == "continued"
    np.testing.assert_allclose(s2.velocity_nm_s, _perp(v, a[-1] - a[0]), atol=1e-6)
    summary = {t["track_id"]: t for t in tr.summary()}[s0.track_id]
    assert summary["scans"] == [0, 1, 2]


def test_a_parallel_neighbour_is_a_new_track_not_a_fragment():
    """A second line running alongside the continued one within the gate (a pile-up) is
    another dislocation; so is a line far from the track's previous curve."""
    a = _line([0, 0, 0], [80, 0, 0], 400)
    tr = LineTracker(max_distance_nm=8.0)
    (s0,) = tr.update(0, 0.0, [a])
    s1 = tr.update(1, 1.0, [a + [0, 1, 0], a + [0, 6, 0], _line([0, 40, 0], [80, 40, 0])])
    assert s1[0].track_id == s0.track_id and s1[0].status == "continued"
    assert s1[1].status == "new" and s1[2].status == "new"
    assert len({s.track_id for s in s1}) == 3


def test_a_curve_of_pieces_never_projects_across_the_gap():
    """The union of two pieces has no segment between them: a point beside the gap's middle
    finds its foot on a piece's end, not on the bridge."""
    from livestereo.compute.tracking import _Curve

    p = _Curve(_line([0, 0, 0], [10, 0, 0], 50), 1.0, 1.0)
    q = _Curve(_line([20, 0, 0], [30, 0, 0], 50), 1.0, 1.0)
    u = _Curve.union([p, q])
    assert len(u.dense) == len(p.dense) + len(q.dense) and u.seg_ok.sum() == len(u.dense) - 2
    assert u.end.sum() == p.end.sum() + q.end.sum() and u.length == pytest.approx(20.0)
    foot, _ = u.foot(np.array([[15.2, 3.0, 0.0]]))
    assert foot[0, 0] in (pytest.approx(10.0), pytest.approx(20.0)) and foot[0, 1] == pytest.approx(0.0)
    single, _ = _Curve(_line([0, 0, 0], [30, 0, 0], 100), 1.0, 1.0).foot(np.array([[15.2, 3.0, 0.0]]))
    np.testing.assert_allclose(single[0], [15.2, 0, 0], atol=1e-9)
