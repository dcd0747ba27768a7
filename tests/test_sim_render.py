"""Simulator physics: materials, scenes, in-situ motion, view rendering and truth maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from livestereo.sim.config import SimConfig
from livestereo.sim.materials import (
    MATERIALS,
    default_g,
    get_material,
    glide_systems,
    is_allowed_reflection,
    lattice_matrix,
    orientation_matrix,
)
from livestereo.sim.render import disparity_map, height_map, line_masks, project_points, render_views
from livestereo.sim.scene import advance, make_scene, single_line_scene, translate

P = 1.0  # scan step (nm)


def _blob(x0: float, y0: float, z: float, half: float = 0.3) -> np.ndarray:
    """A short segment along x centred on (x0, y0, z): a point-like feature."""
    xs = np.linspace(x0 - half, x0 + half, 4)
    return np.stack([xs, np.full_like(xs, y0), np.full_like(xs, z)], axis=1)


def _centroid(img: np.ndarray) -> np.ndarray:
    """(col, row) centroid of the attenuation 1 - T."""
    w = 1.0 - img.astype(np.float64)
    rows, cols = np.indices(w.shape)
    return np.array([(w * cols).sum(), (w * rows).sum()]) / w.sum()


# --------------------------------------------------------------------------------- materials

@pytest.mark.parametrize("name", list(MATERIALS))
def test_orientation_puts_zone_axis_on_the_beam(name):
    mat = get_material(name)
    zone = (1, 1, 0)
    R = orientation_matrix(mat, zone)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    z = R @ (lattice_matrix(mat) @ np.array(zone, dtype=float))
    np.testing.assert_allclose(z / np.linalg.norm(z), [0, 0, 1], atol=1e-12)
    g = default_g(mat, zone)
    assert int(np.dot(g, zone)) == 0 and is_allowed_reflection(g, mat.structure)


def test_glide_systems():
    fcc = glide_systems(get_material("Al"), np.eye(3))
    assert sorted(s.plane_hkl for s in fcc) == sorted([(1, 1, 1), (1, 1, -1), (1, -1, 1), (1, -1, -1)])
    for s in fcc:  # three <110> directions lie in each {111}
        assert len(s.directions_uvw) == 3
        np.testing.assert_allclose(s.directions @ s.normal, 0, atol=1e-12)
    bcc = glide_systems(get_material("Fe"), np.eye(3))
    assert len(bcc) == 6 + 12


# ------------------------------------------------------------------------------------ scenes

def test_scene_lines_lie_in_glide_planes_inside_the_foil():
    cfg = SimConfig(seed=3, n_dislocations=8, thickness_nm=120)
    scene = make_scene(cfg, np.random.default_rng(3))
    assert len(scene.dislocations) == 8
    assert len({d.id for d in scene.dislocations}) == 8
    for d in scene.dislocations:
        pts = d.points_nm
        assert pts.shape[1] == 3 and len(pts) >= 2
        assert np.abs(pts[:, 2]).max() <= cfg.thickness_nm / 2 + 1e-6
        assert np.linalg.norm(np.diff(pts, axis=0), axis=1).max() <= 0.5
        # planar: distance of every point to the glide plane through the first point
        dist = (pts - pts[0]) @ d.glide_plane_normal
        assert np.abs(dist).max() < 1e-6, d.kind


def test_scene_is_deterministic():
    cfg = SimConfig(seed=11)
    a = make_scene(cfg, np.random.default_rng(11))
    b = make_scene(cfg, np.random.default_rng(11))
    for da, db in zip(a.dislocations, b.dislocations):
        np.testing.assert_array_equal(da.points_nm, db.points_nm)


def test_advance_moves_lines_by_velocity_times_scans_with_stable_ids():
    cfg = SimConfig(seed=5, n_dislocations=14, glide_velocity_nm_per_scan=2.0)
    scene = make_scene(cfg, np.random.default_rng(5))
    scans = 3
    later = advance(scene, scans, cfg)  # uniform motion
    assert later.ids == scene.ids and later.scan_index == scans
    checked = 0
    for d0, d1 in zip(scene.dislocations, later.dislocations):
        expect = abs(d0.velocity_nm_per_scan) * scans
        dist, _ = cKDTree(d0.points_nm).query(d1.points_nm)
        if d0.kind in ("straight", "dipole"):
            interior = dist[len(dist) // 4: -len(dist) // 4]
            assert np.median(interior) == pytest.approx(expect, rel=0.05)
            checked += 1
        elif len(d1.points_nm):
            assert 0.3 * expect < dist.max() < 2.0 * expect, d0.kind
    assert checked > 0
    # jerky motion (rng): still about velocity x scans on average
    jerky = advance(scene, scans, cfg, np.random.default_rng(0))
    assert jerky.ids == scene.ids


def test_translate_shifts_points():
    cfg = SimConfig(seed=2, n_dislocations=2)
    scene = make_scene(cfg, np.random.default_rng(2))
    moved = translate(scene, (1.5, -2.0))
    np.testing.assert_allclose(moved.dislocations[0].points_nm - scene.dislocations[0].points_nm,
                               np.tile([1.5, -2.0, 0.0], (len(scene.dislocations[0].points_nm), 1)))
    np.testing.assert_allclose(advance(moved, 1, cfg).offset_nm, [1.5, -2.0])


# ------------------------------------------------------------------------------------ render

@pytest.mark.parametrize("dz", [-60.0, 45.0])
def test_point_feature_shifts_by_minus_theta_dz(dz):
    x0, y0 = 20.3, 17.6
    scene = single_line_scene(_blob(x0, y0, dz), line_width_nm=2.0, contrast=0.2, extent_nm=(40, 40))
    thetas = np.array([[0.0, 0.0], [25.0, 0.0], [0.0, -20.0], [-18.0, 12.0]])
    views = render_views(scene, thetas, (40, 40), P)
    for th, img in zip(thetas, views):
        expect = np.array([x0, y0]) - th * 1e-3 * dz  # E2 (nm == px at p = 1)
        np.testing.assert_allclose(_centroid(img), expect / P, atol=0.1)


def test_disparity_equals_theta_difference_times_dz():
    cfg = SimConfig(seed=4, n_dislocations=5, scan_shape=(48, 48))
    scene = make_scene(cfg, np.random.default_rng(4))
    ta, tb = np.array([-17.0, 3.0]), np.array([17.0, -2.0])
    d = disparity_map(scene, ta, tb, (48, 48), P)
    mask = line_masks(scene, ta[None], (48, 48), P)[0]
    assert d.shape == (48, 48, 2) and mask.sum() > 50
    np.testing.assert_array_equal(np.isfinite(d[..., 0]), mask)
    # independent check: dz of the nearest projected point of view A
    pts = np.concatenate([x.points_nm for x in scene.dislocations])
    uv = project_points(pts, ta, scene.focus_nm, P)
    rows, cols = np.nonzero(mask)
    _, idx = cKDTree(uv).query(np.stack([cols, rows], axis=1))
    dz = pts[idx, 2] - scene.focus_nm
    expect = (tb - ta)[None, :] * 1e-3 * dz[:, None] / P
    close = np.all(np.abs(d[rows, cols] - expect) < 0.02, axis=1)
    assert close.mean() > 0.97  # the rest: where two lines cross, either dz is right
    # sign convention against rendering: position in A minus position in B
    x0, y0, z = 15.0, 16.0, 70.0
    blob = single_line_scene(_blob(x0, y0, z), line_width_nm=2.0, contrast=0.2, extent_nm=(32, 32))
    va, vb = render_views(blob, np.stack([ta, tb]), (32, 32), P)
    da = disparity_map(blob, ta, tb, (32, 32), P)
    r, c = np.argwhere(np.isfinite(da[..., 0]))[0]
    np.testing.assert_allclose(_centroid(va) - _centroid(vb), da[r, c], atol=0.1)


def test_height_map_holds_dz_on_line_pixels():
    z, focus = 30.0, -20.0
    line = np.stack([np.linspace(5, 35, 80), np.linspace(8, 30, 80), np.full(80, z)], axis=1)
    scene = single_line_scene(line, focus_nm=focus, extent_nm=(40, 40))
    h = height_map(scene, (40, 40), P)
    assert np.isfinite(h).sum() >= 30
    np.testing.assert_allclose(h[np.isfinite(h)], z - focus)


def test_line_masks_are_connected():
    from skimage.measure import label

    line = np.stack([np.linspace(3, 40, 200), np.linspace(5, 28, 200), np.linspace(-40, 40, 200)], axis=1)
    scene = single_line_scene(line, extent_nm=(48, 48))
    masks = line_masks(scene, np.array([[0.0, 0.0], [30.0, 10.0]]), (48, 48), P)
    for m in masks:
        assert label(m, connectivity=2).max() == 1


def _profile_sigma(img: np.ndarray) -> float:
    w = (1.0 - img.astype(np.float64)).mean(axis=1)
    y = np.arange(len(w))
    m = (w * y).sum() / w.sum()
    return float(np.sqrt((w * (y - m) ** 2).sum() / w.sum()))


def test_region_blur_grows_with_dz_and_radius():
    sig0 = 1.5 / 2.3548
    widths = {}
    for dz in (0.0, 40.0, 80.0):
        line = np.stack([np.linspace(-10, 74, 300), np.full(300, 32.0), np.full(300, dz)], axis=1)
        scene = single_line_scene(line, extent_nm=(64, 64), contrast=0.02)
        for R in (0.0, 10.0, 20.0):
            img = render_views(scene, np.array([[0.0, 0.0]]), (64, 64), P, region_radius_mrad=R)[0]
            widths[dz, R] = _profile_sigma(img)
            # a uniform disc of radius rho has a marginal variance rho^2 / 4
            rho = R * 1e-3 * dz
            assert widths[dz, R] == pytest.approx(np.sqrt(sig0 ** 2 + rho ** 2 / 4), rel=0.12), (dz, R)
    assert widths[80, 20] > widths[40, 20] > widths[0, 20]
    assert widths[80, 20] > widths[80, 10] > widths[80, 0]


def test_contrast_signs_turn_lines_bright():
    scene = single_line_scene(_blob(10, 10, 0.0), extent_nm=(20, 20))
    img = render_views(scene, np.zeros((2, 2)), (20, 20), P, contrast_signs=np.array([[1.0], [-1.0]]))
    assert img[0].min() < 0.9 and img[1].max() > 1.1


def test_render_handles_empty_scene_and_jitter():
    scene = single_line_scene([])
    out = render_views(scene, np.zeros((1, 2)), (8, 9), P)
    assert out.shape == (1, 8, 9) and np.all(out == 1)
    line = np.stack([np.full(100, 16.0), np.linspace(-5, 40, 100), np.zeros(100)], axis=1)
    scene = single_line_scene(line, extent_nm=(32, 32))
    off = np.zeros((32, 2))
    off[10, 0] = 2.0  # row 10 is scanned 2 nm further right: the line appears 2 px left
    img = render_views(scene, np.zeros((1, 2)), (32, 32), P, row_offsets_nm=off)[0]
    assert np.argmin(img[10]) == 14 and np.argmin(img[11]) == 16


def test_sample_thetas_average_views():
    line = np.stack([np.linspace(-5, 40, 150), np.full(150, 16.0), np.full(150, 50.0)], axis=1)
    scene = single_line_scene(line, extent_nm=(32, 32))
    th = np.array([[0.0, -20.0], [0.0, 20.0]])
    both = render_views(scene, None, (32, 32), P, sample_thetas_mrad=th[None])[0]
    single = render_views(scene, th, (32, 32), P)
    np.testing.assert_allclose(both, single.mean(axis=0), atol=1e-6)
