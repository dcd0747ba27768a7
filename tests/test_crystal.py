"""Crystallography (livestereo.compute.crystal) and line analysis (compute.dislocations)
against hand-computed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from livestereo.compute.crystal import (
    PRESET_DIR,
    Lattice,
    MaterialError,
    Orientation,
    angle_between_directions_deg,
    angle_between_planes_deg,
    index_direction,
    index_plane,
    known_materials,
    load_material,
    low_index_triplets,
)
from livestereo.compute.dislocations import DislocationResult, analyse_line, analyse_lines
from livestereo.compute.lines import DislocationLine

REPO = Path(__file__).resolve().parents[1]
A_TIAL, C_TIAL = 0.4005, 0.4070


# ---------------------------------------------------------------- lattice


def test_cubic_lattice_matrices():
    lat = Lattice(a_nm=0.405)
    assert np.allclose(lat.A, 0.405 * np.eye(3))
    assert np.allclose(lat.G, 0.405**2 * np.eye(3))
    assert np.allclose(lat.B, np.eye(3) / 0.405)
    assert lat.d_spacing_nm((1, 1, 1)) == pytest.approx(0.405 / math.sqrt(3))


def test_triclinic_lattice_is_consistent():
    lat = Lattice(a_nm=0.5, b_nm=0.6, c_nm=0.7, alpha_deg=80, beta_deg=95, gamma_deg=105)
    A = lat.A
    a, b, c = A.T
    assert np.linalg.norm(a) == pytest.approx(0.5)
    assert np.linalg.norm(b) == pytest.approx(0.6)
    assert np.linalg.norm(c) == pytest.approx(0.7)
    ang = lambda u, v: math.degrees(math.acos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))  # noqa: E731
    assert ang(b, c) == pytest.approx(80)
    assert ang(a, c) == pytest.approx(95)
    assert ang(a, b) == pytest.approx(105)
    assert np.allclose(lat.G, A.T @ A)
    assert np.allclose(A.T @ lat.B, np.eye(3))  # a_i . a*_j = delta_ij
    with pytest.raises(ValueError, match="do not form a cell"):
        _ = Lattice(a_nm=1, alpha_deg=10, beta_deg=10, gamma_deg=170).A


def test_low_index_triplets():
    t = low_index_triplets(1)
    assert len(t) == 13  # 3 <100> + 6 <110> + 4 <111>
    assert tuple(t[0]) in {(0, 0, 1), (0, 1, 0), (1, 0, 0)}
    t3 = low_index_triplets(3)
    assert np.all(np.gcd.reduce(np.abs(t3), axis=1) == 1)
    assert len({tuple(x) for x in t3} & {tuple(-x) for x in t3}) == 0


# ---------------------------------------------------------------- presets


def test_presets_load_and_match_the_issue():
    names = known_materials()
    assert set(names) == {"gamma-TiAl", "Al", "Ni", "Cu", "Fe"}
    tial = load_material("gamma-TiAl")
    assert tial.structure == "L1_0"
    assert tial.lattice.abc == pytest.approx((A_TIAL, A_TIAL, C_TIAL))
    for name, a in (("Al", 0.4050), ("Ni", 0.3524), ("Cu", 0.3615), ("Fe", 0.2867)):
        assert load_material(name).lattice.abc == pytest.approx((a, a, a))
    assert load_material("fe").structure == "bcc"
    assert load_material("TIAL").name == "gamma-TiAl"  # alias, case-insensitive
    assert load_material("aluminium").name == "Al"
    assert load_material(PRESET_DIR / "cu.toml").name == "Cu"


def test_configs_materials_is_the_package_presets():
    link = REPO / "configs" / "materials"
    assert link.is_symlink()
    assert link.resolve() == PRESET_DIR.resolve()
    assert sorted(p.name for p in link.glob("*.toml")) == sorted(p.name for p in PRESET_DIR.glob("*.toml"))


def test_unknown_material_lists_known_names(tmp_path):
    with pytest.raises(MaterialError) as e:
        load_material("unobtainium")
    for name in ("gamma-TiAl", "Al", "Ni", "Cu", "Fe"):
        assert name in str(e.value)
    with pytest.raises(MaterialError, match="not found"):
        load_material(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "X"\n[lattice]\na_nm = 0.4\nfoo = 1\n')
    with pytest.raises(MaterialError, match="unknown key 'lattice.foo'"):
        load_material(bad)
    good = tmp_path / "mine.toml"
    good.write_text('name = "Mine"\nstructure = "fcc"\n[lattice]\na_nm = 0.36\n')
    assert load_material(good).lattice.A[0, 0] == pytest.approx(0.36)


# ---------------------------------------------------------------- orientation


def test_orientation_zone_001_g_200():
    al = load_material("Al").lattice
    o = Orientation.from_zone_axis(al, (0, 0, 1), (2, 0, 0), 0.0)
    assert np.allclose(o.U, np.eye(3))
    assert np.allclose(o.to_fractional([0.405, 0.0, 0.0]), [1, 0, 0])
    # g at 90 deg: g points along scan +y, so scan +y is crystal a
    o90 = Orientation.from_zone_axis(al, (0, 0, 1), (2, 0, 0), 90.0)
    assert np.allclose(o90.to_fractional([0.0, 0.405, 0.0]), [1, 0, 0], atol=1e-12)
    assert np.allclose(o90.to_fractional([0.405, 0.0, 0.0]), [0, -1, 0], atol=1e-12)
    assert np.allclose(o90.R, o90.U.T)


@pytest.mark.parametrize("zone,g,phi", [((1, 1, 0), (0, 0, 2), 30.0), ((1, 1, 2), (1, 1, -1), -65.0), ((0, 1, 1), (2, 0, 0), 150.0)])
def test_orientation_puts_zone_on_beam_and_g_at_its_angle(zone, g, phi):
    lat = load_material("Cu").lattice
    o = Orientation.from_zone_axis(lat, zone, g, phi)
    assert np.allclose(o.U.T @ o.U, np.eye(3))
    assert np.linalg.det(o.U) == pytest.approx(1.0)
    assert np.allclose(o.uvw_to_microscope(zone), [0, 0, 1])
    gm = o.hkl_to_microscope(g)
    assert gm[2] == pytest.approx(0.0, abs=1e-12)  # g is perpendicular to the zone axis here
    assert math.degrees(math.atan2(gm[1], gm[0])) == pytest.approx(phi)


def test_orientation_rejects_g_parallel_to_zone():
    with pytest.raises(ValueError, match="parallel"):
        Orientation.from_zone_axis(load_material("Ni").lattice, (1, 1, 1), (2, 2, 2))


# ---------------------------------------------------------------- gamma-TiAl (c != a)


def test_tial_angles_and_fractional_coordinates():
    lat = load_material("gamma-TiAl").lattice
    # [001] vs [101]: tan = a / c (not 45 deg); (001) vs (101) normals: tan = c / a
    assert angle_between_directions_deg(lat, (0, 0, 1), (1, 0, 1)) == pytest.approx(math.degrees(math.atan(A_TIAL / C_TIAL)))
    assert angle_between_directions_deg(lat, (0, 0, 1), (1, 0, 1)) == pytest.approx(44.5388, abs=1e-4)
    assert angle_between_planes_deg(lat, (0, 0, 1), (1, 0, 1)) == pytest.approx(45.4612, abs=1e-4)
    # [110] vs [111]: cos = sqrt(2) a / sqrt(2 a^2 + c^2)
    exp = math.degrees(math.acos(math.sqrt(2) * A_TIAL / math.sqrt(2 * A_TIAL**2 + C_TIAL**2)))
    assert angle_between_directions_deg(lat, (1, 1, 0), (1, 1, 1)) == pytest.approx(exp)

    o = Orientation.from_zone_axis(lat, (0, 0, 1), (1, 0, 0), 0.0)
    assert np.allclose(o.to_fractional([A_TIAL, 0.0, C_TIAL]), [1, 0, 1])
    assert np.allclose(o.to_fractional([0.0, 0.0, 1.0]), [0, 0, 1 / C_TIAL])
    # zone [101] along the beam: one lattice vector a + c along z is sqrt(a^2 + c^2) long
    o101 = Orientation.from_zone_axis(lat, (1, 0, 1), (0, 1, 0), 0.0)
    assert np.allclose(o101.to_fractional([0.0, 0.0, math.hypot(A_TIAL, C_TIAL)]), [1, 0, 1])
    # the Cartesian (1, 0, 1) is 0.46 deg off [101] in TiAl; exactly on it in a cubic crystal
    uvw, ang = index_direction(np.array([1.0, 0.0, 1.0]), lat)
    assert uvw == (1, 0, 1)
    assert ang == pytest.approx(45 - 44.5388, abs=1e-3)
    assert index_direction(np.array([1.0, 0.0, 1.0]), Lattice(a_nm=0.4))[1] == pytest.approx(0.0, abs=1e-6)
    # Miller ~ A^T n: the normal of (101) in TiAl maps back to (101)
    n = lat.plane_normal_cartesian((1, 0, 1))
    h = lat.A.T @ n
    assert np.allclose(h / h.max(), [1, 0, 1])
    assert index_plane(n, lat) == ((1, 0, 1), pytest.approx(0.0, abs=1e-6))


# ---------------------------------------------------------------- line analysis


def _line(points, sigma=0.05, lid=0):
    pts = np.asarray(points, dtype=float)
    return DislocationLine(lid, pts, np.full(len(pts), sigma), float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum()),
                           pts[:, :2].copy())


def _bowed_line(o, uvw, hkl, length=80.0, bow=12.0, n=200, centre=(50.0, 40.0, 5.0)):
    t = o.uvw_to_microscope(uvw)
    nrm = o.hkl_to_microscope(hkl)
    assert abs(t @ nrm) < 1e-12, "the direction must lie in the plane"
    m = np.cross(nrm, t)
    s = np.linspace(-0.5, 0.5, n)
    return np.asarray(centre) + (length * s)[:, None] * t + (bow * (1 - 4 * s**2))[:, None] * m


@pytest.mark.parametrize("zone,g,phi", [((0, 0, 1), (2, 0, 0), 0.0), ((1, 1, 2), (1, 1, -1), 25.0), ((0, 1, 1), (2, 0, 0), -40.0)])
def test_fcc_1m10_line_in_111(zone, g, phi):
    al = load_material("Al")
    o = Orientation.from_zone_axis(al.lattice, zone, g, phi)
    # hand check: [1-10] lies in (111) (h u + k v + l w = 0); 70.53 deg between {111} planes
    assert np.dot((1, -1, 0), (1, 1, 1)) == 0
    assert angle_between_planes_deg(al.lattice, (1, 1, 1), (1, 1, -1)) == pytest.approx(70.5288, abs=1e-4)
    pts = _bowed_line(o, (1, -1, 0), (1, 1, 1))
    a = analyse_line(_line(pts), o)
    assert set([a.direction_uvw, tuple(-x for x in a.direction_uvw)]) == {(1, -1, 0), (-1, 1, 0)}
    assert a.direction_angle_deg < 0.5
    assert a.habit == "determined"
    assert a.habit_hkl in {(1, 1, 1), (-1, -1, -1)}
    assert a.habit_angle_deg < 0.5
    assert a.planarity < 1e-6
    assert np.allclose(np.abs(a.direction_indices), [1, 1, 0], atol=1e-6)
    assert np.allclose(a.fractional, o.to_fractional(pts))


def test_tial_habit_plane_uses_the_metric():
    tial = load_material("gamma-TiAl")
    o = Orientation.from_zone_axis(tial.lattice, (1, 1, 0), (0, 0, 1), 10.0)
    # [1-10] lies in (111) in a tetragonal cell too; a line bowing in (111)
    pts = _bowed_line(o, (1, -1, 0), (1, 1, 1))
    (a,) = analyse_lines([_line(pts)], tial, o)
    assert a.habit_hkl in {(1, 1, 1), (-1, -1, -1)}
    assert a.habit_angle_deg < 0.01
    # with c != a the normal of (111) is not along the Cartesian [111]
    assert a.habit_indices is not None
    n_cart = o.to_crystal_cartesian(a.habit_normal)
    assert np.degrees(np.arccos(abs(n_cart @ np.ones(3) / math.sqrt(3)))) > 0.3


def test_straight_line_has_undetermined_habit_plane():
    o = Orientation.from_zone_axis(load_material("Ni").lattice, (0, 0, 1), (2, 0, 0))
    s = np.linspace(0, 60, 120)[:, None]
    rng = np.random.default_rng(1)
    pts = np.array([10.0, 20.0, -30.0]) + s * o.uvw_to_microscope((1, 1, 0)) + rng.normal(0, 0.05, (120, 3))
    a = analyse_line(_line(pts, sigma=0.1), o)
    assert a.habit == "undetermined"
    assert a.habit_hkl is None and a.habit_normal is None
    assert a.direction_uvw in {(1, 1, 0), (-1, -1, 0)}
    # a bow of 1 nm on 80 nm (s1/s0 ~ 0.013) is too straight, however precise
    pts1 = _bowed_line(o, (1, -1, 0), (1, 1, 1), bow=1.0)
    assert analyse_line(_line(pts1, sigma=0.001), o).habit == "undetermined"
    # a 6 nm bow (s1/s0 ~ 0.08) counts, unless it is buried in the depth noise
    pts2 = _bowed_line(o, (1, -1, 0), (1, 1, 1), bow=6.0)
    assert analyse_line(_line(pts2, sigma=2.0), o).habit == "undetermined"
    a2 = analyse_line(_line(pts2, sigma=0.01), o)
    assert a2.habit == "determined" and a2.habit_hkl in {(1, 1, 1), (-1, -1, -1)}


def test_analyse_lines_rejects_foreign_orientation():
    o = Orientation.from_zone_axis(load_material("Ni").lattice, (0, 0, 1), (2, 0, 0))
    with pytest.raises(ValueError, match="not the lattice"):
        analyse_lines([], load_material("Cu"), o)


def test_result_json_and_hdf5(tmp_path):
    h5py = pytest.importorskip("h5py")
    cu = load_material("Cu")
    o = Orientation.from_zone_axis(cu.lattice, (1, 1, 0), (0, 0, 2), 20.0)
    lines = [_line(_bowed_line(o, (1, -1, 0), (1, 1, 1)), lid=0),
             _line(np.linspace([0, 0, 0], [30, 0, 10], 50), lid=1)]
    res = DislocationResult(3, lines, analyse_lines(lines, cu, o), np.array([[-50.0, 0], [50, 0]]), 1.0, 200.0, cu, o,
                            {"note": "test"})
    d = res.to_json_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["lines"][0]["crystal"]["habit_hkl"] in ([1, 1, 1], [-1, -1, -1])
    assert d["lines"][1]["crystal"]["habit_plane"] == "undetermined"
    assert d["material"] == "Cu" and d["orientation"]["zone_axis"] == [1, 1, 0]
    with h5py.File(tmp_path / "r.h5", "w") as f:
        res.write_hdf5(f)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f.attrs["format"] == "livestereo.dislocations"
        assert f.attrs["n_lines"] == 2 and f.attrs["scan"] == 3
        assert f["lines/0000/points_nm"].shape == (200, 3)
        assert f["lines/0000/fractional"].shape == (200, 3)
        assert f["lines/0001"].attrs["habit_plane"] == "undetermined"
        assert "habit_hkl" not in f["lines/0001"].attrs
        assert np.allclose(f["crystal/A_nm"][()], cu.lattice.A)
        assert list(f["crystal"].attrs["zone_axis"]) == [1, 1, 0]
