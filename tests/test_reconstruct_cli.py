"""``livestereo reconstruct``: manifest loading, input errors, and the whole command with a
stand-in for the trained networks (no torch needed)."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from livestereo.cli import main
from livestereo.commands import reconstruct as rc
from livestereo.compute.stereo_geometry import baseline_unit

SHAPE = (96, 112)
THETAS = np.array([[-52.5, 0.0], [52.5, 0.0]])
P = 1.0
CURVE = np.column_stack([
    20 + 70 * np.linspace(0, 1, 3000),
    30 + 30 * np.sin(np.linspace(0, np.pi, 3000)),
    -60 + 120 * np.linspace(0, 1, 3000),
])


def _maps(thetas=THETAS, shape=SHAPE, p=P):
    """What a perfect network would return for CURVE: prob per view, disparity of views 0-1."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    q = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    pos = [(CURVE[:, :2] - t * 1e-3 * CURVE[:, 2:3]) / p for t in thetas]
    probs = []
    for k in range(len(thetas)):
        d, i = cKDTree(pos[k]).query(q)
        probs.append(np.exp(-(d**2) / 2).reshape(shape))
        if k == 0:
            idx = i
    disp = ((pos[0] - pos[1]) @ baseline_unit(thetas[0], thetas[1]))[idx].reshape(shape)
    disp[probs[0] < 0.05] = np.nan
    return np.array(probs, np.float32), disp.astype(np.float32)


class FakePipeline:
    """Stands in for livestereo.inference.pipeline.DislocationPipeline."""

    calls: list = []

    def process(self, views, valid, centroids_mrad, scan_step_nm, thickness_nm):
        assert views.dtype == np.float32 and views.ndim == 3
        assert valid.shape == views.shape[1:] and valid.dtype == bool
        assert np.asarray(centroids_mrad).shape == (len(views), 2)
        FakePipeline.calls.append((views.shape, np.asarray(centroids_mrad).copy(), scan_step_nm, thickness_nm))
        prob, disp = _maps(np.asarray(centroids_mrad), views.shape[1:], scan_step_nm)
        return {"prob": prob, "disparity": disp, "sigma_disparity": np.full(disp.shape, 0.05, np.float32)}


@pytest.fixture
def fake_pipeline(monkeypatch):
    FakePipeline.calls = []
    monkeypatch.setattr(rc, "_load_pipeline", lambda: FakePipeline())
    return FakePipeline


def _write_manifest(tmp_path: Path, body: str | None = None, images=None, suffix=".npy") -> Path:
    rng = np.random.default_rng(0)
    images = images if images is not None else [rng.normal(100, 5, SHAPE), rng.normal(100, 5, SHAPE)]
    names = []
    for i, img in enumerate(images):
        name = f"view{i}{suffix}"
        if suffix == ".npy":
            np.save(tmp_path / name, img)
        else:
            import tifffile

            tifffile.imwrite(tmp_path / name, np.asarray(img, np.float32))
        names.append(name)
    if body is None:
        body = f"""
scan_step_nm = {P}
thickness_nm = 200.0
material = "Al"

[orientation]
zone_axis = [0, 0, 1]
g = [2, 0, 0]
g_angle_deg = 0.0

[[views]]
file = "{names[0]}"
theta_mrad = [-52.5, 0.0]

[[views]]
file = "{names[1]}"
theta_mrad = [52.5, 0.0]
"""
    m = tmp_path / "views.toml"
    m.write_text(body)
    return m


# ---------------------------------------------------------------- manifest loading


def test_manifest_loads_npy_and_tif(tmp_path):
    for suffix in (".npy", ".tif"):
        d = tmp_path / suffix.strip(".")
        d.mkdir()
        vs = rc.load_manifest(_write_manifest(d, suffix=suffix))
        assert vs.views.shape == (2,) + SHAPE
        assert vs.valid.all() and vs.thetas_mrad.tolist() == THETAS.tolist()
        assert vs.scan_step_nm == P and vs.thickness_nm == 200.0
        assert vs.material.name == "Al" and vs.orientation.zone_axis == (0, 0, 1)
        assert vs.names == ["view0", "view1"]


def test_manifest_missing_file_is_named(tmp_path):
    m = _write_manifest(tmp_path)
    (tmp_path / "view1.npy").unlink()
    with pytest.raises(rc.ManifestError) as e:
        rc.load_manifest(m)
    assert "views[1].file" in str(e.value) and "view1.npy" in str(e.value) and "not found" in str(e.value)
    with pytest.raises(rc.ManifestError, match="manifest not found"):
        rc.load_manifest(tmp_path / "nope.toml")


def test_manifest_mismatched_shapes(tmp_path):
    m = _write_manifest(tmp_path, images=[np.zeros(SHAPE), np.zeros((SHAPE[0], SHAPE[1] - 1))])
    with pytest.raises(rc.ManifestError) as e:
        rc.load_manifest(m)
    msg = str(e.value)
    assert "views[1]" in msg and str((SHAPE[0], SHAPE[1] - 1)) in msg and str(SHAPE) in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_manifest_nan_inf_pixels(tmp_path, bad):
    img = np.ones(SHAPE)
    img[7, 9] = bad
    m = _write_manifest(tmp_path, images=[np.ones(SHAPE), img])
    with pytest.raises(rc.ManifestError) as e:
        rc.load_manifest(m)
    assert "views[1]" in str(e.value) and "NaN/inf" in str(e.value) and "row 7, col 9" in str(e.value)


def test_manifest_nan_outside_valid_mask_is_fine(tmp_path):
    img = np.ones(SHAPE)
    img[-5:, :] = np.nan  # scan not finished
    valid = np.ones(SHAPE, bool)
    valid[-5:, :] = False
    np.save(tmp_path / "mask.npy", valid)
    m = _write_manifest(tmp_path, images=[np.ones(SHAPE), img])
    m.write_text('valid = "mask.npy"\n' + m.read_text())
    vs = rc.load_manifest(m)
    assert not vs.valid[-1].any() and np.isfinite(vs.views).all()


@pytest.mark.parametrize("body,match", [
    ("scan_step_nm = 1.0\nthickness_nm = 100.0\nbogus = 1\n[[views]]\nfile='view0.npy'\ntheta_mrad=[0,1]\n"
     "[[views]]\nfile='view1.npy'\ntheta_mrad=[0,-1]\n", "unknown key 'bogus'"),
    ("scan_step_nm = 1.0\nthickness_nm = 100.0\n[[views]]\nfile='view0.npy'\ntheta_mrad=[0,1]\n", "views"),
    ("thickness_nm = 100.0\n[[views]]\nfile='view0.npy'\ntheta_mrad=[0,1]\n"
     "[[views]]\nfile='view1.npy'\ntheta_mrad=[0,-1]\n", "scan_step_nm"),
    ("scan_step_nm = 1.0\nthickness_nm = 100.0\n[[views]]\nfile='view0.npy'\ntheta_mrad=[5,1]\n"
     "[[views]]\nfile='view1.npy'\ntheta_mrad=[5,1]\n", "same incident angle"),
    ("scan_step_nm = 1.0\nthickness_nm = 100.0\n[orientation]\nzone_axis=[0,0,1]\ng=[2,0,0]\n[[views]]\nfile='view0.npy'\n"
     "theta_mrad=[0,1]\n[[views]]\nfile='view1.npy'\ntheta_mrad=[0,-1]\n", "needs a material"),
    ("scan_step_nm = 1.0\nthickness_nm = 100.0\nmaterial='kryptonite'\n[[views]]\nfile='view0.npy'\n"
     "theta_mrad=[0,1]\n[[views]]\nfile='view1.npy'\ntheta_mrad=[0,-1]\n", "known presets are"),
    ("scan_step_nm = 1.0\nthickness_nm = 100.0\nmaterial='Cu'\n[orientation]\nzone_axis=[1,1,1]\ng=[2,2,2]\n"
     "[[views]]\nfile='view0.npy'\ntheta_mrad=[0,1]\n[[views]]\nfile='view1.npy'\ntheta_mrad=[0,-1]\n", "parallel"),
    ("scan_step_nm = = 1\n", "not valid TOML"),
])
def test_manifest_errors_are_clear(tmp_path, body, match):
    _write_manifest(tmp_path)
    m = tmp_path / "views.toml"
    m.write_text(body)
    with pytest.raises(rc.ManifestError, match=match) as e:
        rc.load_manifest(m)
    assert str(m) in str(e.value)


def test_image_of_wrong_kind(tmp_path):
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(rc.ManifestError, match="2D image"):
        rc.read_image(tmp_path / "cube.npy", "x")
    np.save(tmp_path / "txt.npy", np.array(["a", "b"]))
    with pytest.raises(rc.ManifestError, match="2D image|not a real number"):
        rc.read_image(tmp_path / "txt.npy", "x")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(rc.ManifestError, match="unsupported image type"):
        rc.read_image(tmp_path / "img.png", "x")


# ---------------------------------------------------------------- the command


def test_reconstruct_manifest_end_to_end(tmp_path, fake_pipeline, capsys):
    m = _write_manifest(tmp_path)
    out = tmp_path / "out"
    assert main(["reconstruct", str(m), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scan 0: 1 dislocation line(s)" in printed and "summary.json" in printed
    (shape, cents, p, t), = fake_pipeline.calls
    assert shape == (2,) + SHAPE and t == 200.0 and p == P
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_kind"] == "manifest" and len(summary["scans"]) == 1
    s0 = summary["scans"][0]
    assert s0["hdf5"] == "scan_0000.h5" and s0["n_lines"] == 1 and s0["material"] == "Al"
    line = s0["lines"][0]
    pts = np.array(line["points_nm"])
    assert np.max(cKDTree(CURVE).query(pts)[0]) < 0.5
    assert len(line["crystal"]["fractional"]) == len(pts)
    assert line["crystal"]["habit_plane"] in ("determined", "undetermined")
    import h5py

    with h5py.File(out / "scan_0000.h5", "r") as f:
        assert f.attrs["format"] == "livestereo.dislocations" and f.attrs["n_lines"] == 1
        assert f["maps/prob"].shape == (2,) + SHAPE
        assert f["maps/disparity"].shape == SHAPE and f["maps/dz_nm"].shape == SHAPE
        assert f["views/images"].shape == (2,) + SHAPE and f["views/valid"][()].all()
        assert np.allclose(f["lines/0000/points_nm"][()], pts, atol=1e-3)
        assert f["lines/0000/fractional"].shape == pts.shape
        assert list(f["crystal"].attrs["zone_axis"]) == [0, 0, 1]


def test_reconstruct_cli_overrides_and_line_params(tmp_path, fake_pipeline):
    m = _write_manifest(tmp_path)
    out = tmp_path / "o2"
    rc_ = main(["reconstruct", str(m), "-o", str(out), "--material", "Cu", "--zone-axis", "1", "1", "0",
                "--g", "0", "0", "2", "--g-angle-deg", "15", "--thickness-nm", "150", "--set", "lines.min_length_px=1000"])
    assert rc_ == 0
    s0 = json.loads((out / "summary.json").read_text())["scans"][0]
    assert s0["material"] == "Cu" and s0["orientation"]["zone_axis"] == [1, 1, 0]
    assert s0["orientation"]["g_angle_deg"] == 15.0 and s0["thickness_nm"] == 150.0
    assert s0["n_lines"] == 0  # min_length_px = 1000 keeps nothing
    assert main(["reconstruct", str(m), "-o", str(out), "--set", "lines.nope=1"]) == 2
    assert main(["reconstruct", str(m), "-o", str(out), "--set", "foo=1"]) == 2


def test_reconstruct_default_output_folder(tmp_path, fake_pipeline):
    m = _write_manifest(tmp_path)
    assert main(["reconstruct", str(m)]) == 0
    assert (tmp_path / "views_reconstruct" / "summary.json").is_file()


def test_reconstruct_bad_manifest_exit_code(tmp_path, fake_pipeline, capsys):
    m = _write_manifest(tmp_path)
    (tmp_path / "view0.npy").unlink()
    assert main(["reconstruct", str(m)]) == 2
    err = capsys.readouterr().err
    assert "view0.npy" in err and "not found" in err


def test_reconstruct_without_networks_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "livestereo.inference.pipeline", None)  # import fails
    m = _write_manifest(tmp_path)
    assert main(["reconstruct", str(m), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "dislocation networks are not available" in err and "livestereo.inference.pipeline" in err


def test_array_input_needs_calibration(tmp_path, fake_pipeline, capsys):
    np.save(tmp_path / "d4.npy", np.zeros((4, 4, 8, 8), np.uint16))
    assert main(["reconstruct", str(tmp_path / "d4.npy"), "--thickness-nm", "100"]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert main(["reconstruct", str(tmp_path / "missing.lsrec")]) == 2


def _fake_scan(scan, n_det=3, roles=("view", "view", "bf"), meta=None):
    from livestereo.protocol.messages import Calibration

    prob, _ = _maps()
    cents = np.array([[-52.5, 0.0], [52.5, 0.0], [0.0, 0.0]])[:n_det]
    layout = types.SimpleNamespace(view_indices=[i for i, r in enumerate(roles) if r in ("view", "segment")])
    return types.SimpleNamespace(
        run_id="run-1", scan=scan, images=np.stack([prob[0], prob[1], prob[0]])[:n_det].astype(np.float64),
        valid=np.ones(SHAPE, bool), centroids_mrad=cents, names=("v0", "v1", "bf")[:n_det], layout=layout,
        calibration=Calibration(convergence_semiangle_mrad=60, scan_step_nm=P), metadata=meta or {},
    )


def test_recording_input_through_offline_accumulation(tmp_path, fake_pipeline, monkeypatch, capsys):
    """(a)/(b): the views come from livestereo.daemon.offline.accumulate_file (stubbed here)."""
    got = {}

    def accumulate_file(path, *, calibration=None, layout=None, **kw):
        got.update(path=path, calibration=calibration, layout=layout, **kw)
        meta = {"sample": {"thickness_nm": 180.0, "material": "gamma-TiAl", "zone_axis": [1, 1, 0], "g": [0, 0, 1]}}
        return [_fake_scan(0, meta=meta), _fake_scan(1, meta=meta)]

    monkeypatch.setitem(sys.modules, "livestereo.daemon.offline",
                        types.SimpleNamespace(accumulate_file=accumulate_file))
    rec = tmp_path / "run.lsrec"
    rec.write_bytes(b"")
    out = tmp_path / "o"
    assert main(["reconstruct", str(rec), "-o", str(out), "--set", "layout.kind=multiview", "--set", "layout.k=4"]) == 0
    assert got["layout"].kind == "multiview" and got["layout"].k == 4 and got["calibration"] is None
    assert [c[0] for c in fake_pipeline.calls] == [(2,) + SHAPE] * 2  # the bf detector is not a view
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_kind"] == "recording"
    assert [s["scan"] for s in summary["scans"]] == [0, 1]
    assert summary["scans"][0]["material"] == "gamma-TiAl" and summary["scans"][0]["thickness_nm"] == 180.0
    assert (out / "scan_0001.h5").is_file()
    # without thickness anywhere: a clear error
    monkeypatch.setitem(sys.modules, "livestereo.daemon.offline",
                        types.SimpleNamespace(accumulate_file=lambda path, **kw: [_fake_scan(0)]))
    assert main(["reconstruct", str(rec), "-o", str(out)]) == 2
    assert "--thickness-nm" in capsys.readouterr().err


def test_array_input_with_real_accumulation(tmp_path, fake_pipeline):
    """(b) end to end through the daemon's accumulation, when it is importable."""
    try:
        from livestereo.daemon.offline import accumulate_file  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"livestereo.daemon.offline not importable yet: {exc}")
    yy, xx = np.mgrid[:32, :32]
    disc = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 10**2).astype(np.uint16) * 10
    np.save(tmp_path / "d4.npy", np.broadcast_to(disc, (16, 20, 32, 32)).copy())
    (tmp_path / "cal.toml").write_text(
        "convergence_semiangle_mrad = 20.0\nscan_step_nm = 1.0\nmrad_per_px = 2.0\n"
        "disc_center_px = [15.5, 15.5]\ndisc_radius_px = 10.0\n")
    out = tmp_path / "o"
    assert main(["reconstruct", str(tmp_path / "d4.npy"), "--calibration", str(tmp_path / "cal.toml"),
                 "--thickness-nm", "100", "-o", str(out)]) == 0
    (shape, cents, p, t), = fake_pipeline.calls
    assert shape == (2, 16, 20) and p == 1.0 and t == 100.0
    assert math.isclose(cents[0][0], -cents[1][0], abs_tol=1e-6)


def test_recording_scans_are_tracked_as_an_in_situ_series(tmp_path, fake_pipeline, monkeypatch, capsys):
    """The scans of a recording's run are tracked with the live daemon's settings: stable
    track ids, displacement, and velocities on the acquisition clock (frame_time_s); without
    a frame time the identities and displacements stay, the velocities are NaN."""
    import h5py

    from livestereo.protocol.messages import Calibration

    base, shift = CURVE.copy(), np.array([0.0, 2.0, 0.0])  # the line moves 2 nm in y per scan
    orig = FakePipeline.process

    def moving(self, views, *args):
        monkeypatch.setattr(sys.modules[__name__], "CURVE", base + len(FakePipeline.calls) * shift)
        return orig(self, views, *args)

    monkeypatch.setattr(FakePipeline, "process", moving)
    # reference: the same tracking on the true curves (the displacement is the motion
    # perpendicular to the line, so less than the shift where the curve runs along y)
    from livestereo.compute.tracking import LineTracker

    ref = LineTracker(max_distance_nm=8.0, z_weight=0.25)
    true_disp = [ref.update(s, float(s), [base[::10] + s * shift])[0].displacement_nm for s in range(3)][1:]
    meta = {"sample": {"thickness_nm": 180.0}}
    rec = tmp_path / "run.lsrec"
    rec.write_bytes(b"")
    for frame_time_s in (1e-4, None):
        FakePipeline.calls.clear()
        cal = Calibration(convergence_semiangle_mrad=60, scan_step_nm=P, frame_time_s=frame_time_s)
        scans = []
        for s in range(3):
            sc = _fake_scan(s, meta=meta)
            sc.calibration = cal
            scans.append(sc)
        monkeypatch.setitem(sys.modules, "livestereo.daemon.offline",
                            types.SimpleNamespace(accumulate_file=lambda path, _s=scans, **kw: _s))
        out = tmp_path / f"o{frame_time_s}"
        assert main(["reconstruct", str(rec), "-o", str(out)]) == 0
        printed = capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        (track,) = summary["tracks"]["run-1"]
        assert f"track {track['track_id']}: scans 0-2, " + ("in-plane" if frame_time_s else "displacement (x, y, z)") in printed
        assert track["scans"] == [0, 1, 2]
        np.testing.assert_allclose(track["total_displacement_nm"], np.sum(true_disp, axis=0), atol=0.3)
        steps = [s["tracks"] for s in summary["scans"]]
        assert [st[0]["status"] for st in steps] == ["new", "continued", "continued"]
        with h5py.File(out / "scan_0002.h5") as f:
            t = f["tracks"]
            assert list(t["track_id"]) == [track["track_id"]] and f["lines/0000"].attrs["track_id"] == track["track_id"]
            np.testing.assert_allclose(t["displacement_nm"][0], true_disp[1], atol=0.3)
            if frame_time_s:
                dt = SHAPE[0] * SHAPE[1] * frame_time_s  # back-to-back scans
                assert t.attrs["clock"] == "frames" and summary["track_clock"] == "frames"
                assert t["dt_s"][0] == pytest.approx(dt)
                np.testing.assert_allclose(t["velocity_nm_s"][0], true_disp[1] / dt, atol=0.3 / dt)
                with h5py.File(out / "scan_0001.h5") as f1:
                    s_old = np.nanmedian(f1["lines/0000/sigma_z_nm"][()])
                s_new = np.nanmedian(f["lines/0000/sigma_z_nm"][()])
                assert np.isfinite(s_old) and np.isfinite(s_new)
                assert t["velocity_sigma_z_nm_s"][0] == pytest.approx(np.hypot(s_old, s_new) / dt)
            else:
                assert t.attrs["clock"] == "none" and summary["track_clock"] == "none"
                assert np.isnan(t["velocity_nm_s"][0]).all() and track["mean_speed_nm_s"] is None
    # the tracking settings can be given: a gate below the 2 nm steps continues nothing
    out = tmp_path / "gate"
    assert main(["reconstruct", str(rec), "-o", str(out), "--set", "track.max_distance_nm=0.5",
                 "--set", "track.z_weight=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["tracks"][0]["status"] for s in summary["scans"]] == ["new", "new", "new"]
    with h5py.File(out / "scan_0002.h5") as f:
        assert f["tracks"].attrs["max_distance_nm"] == 0.5 and f["tracks"].attrs["z_weight"] == 1.0
    capsys.readouterr()
    assert main(["reconstruct", str(rec), "-o", str(out), "--set", "track.max_distance_nm=-1"]) == 2
    assert "track_max_distance_nm" in capsys.readouterr().err
    assert main(["reconstruct", str(rec), "-o", str(out), "--set", "track.gate=3"]) == 2
    assert "track.gate" in capsys.readouterr().err


def test_several_runs_in_one_recording_get_a_folder_each(tmp_path, fake_pipeline, monkeypatch):
    """Scan numbers restart with each run: the files of two runs must not overwrite each other,
    and each run is tracked on its own."""
    scans = [_fake_scan(0, meta={"thickness_nm": 150.0}), _fake_scan(1, meta={"thickness_nm": 150.0}),
             _fake_scan(0, meta={"thickness_nm": 150.0})]
    scans[2].run_id = "run/2"
    monkeypatch.setitem(sys.modules, "livestereo.daemon.offline",
                        types.SimpleNamespace(accumulate_file=lambda path, **kw: scans))
    rec = tmp_path / "two.lsrec"
    rec.write_bytes(b"")
    out = tmp_path / "o"
    assert main(["reconstruct", str(rec), "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["hdf5"] for s in summary["scans"]] == ["run-1/scan_0000.h5", "run-1/scan_0001.h5", "run_2/scan_0000.h5"]
    assert all((out / s["hdf5"]).is_file() for s in summary["scans"])
    assert sorted(summary["tracks"]) == ["run-1", "run/2"]
    assert summary["tracks"]["run-1"][0]["scans"] == [0, 1] and summary["tracks"]["run/2"][0]["scans"] == [0]
