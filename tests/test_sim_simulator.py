"""Simulated detector streams: frames, segments, start message, truth files, configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from livestereo.config import ConfigError, load_toml
from livestereo.protocol.messages import StartMessage
from livestereo.sim.config import SimConfig
from livestereo.sim.render import render_views
from livestereo.sim.simulator import Simulator
from livestereo.sim.truth import read_truth

ROOT = Path(__file__).resolve().parents[1]

QUIET = dict(n_dislocations=0, bend_contours=0.0, thickness_fringes=0.0)


def test_pixelated_disc_centre_radius_dose_and_background():
    cfg = SimConfig(scan_shape=(8, 8), frame_shape=(96, 100), disc_center_px=(44.0, 53.5), mrad_per_px=0.75,
                    convergence_semiangle_mrad=30.0, dose_e_per_A2=40.0, dark_field_background=0.05,
                    disc_edge_falloff=0.0, **QUIET)
    sim = Simulator(cfg)
    frames = sim.precompute_scan(0)
    assert frames.shape == (64, 96, 100) and frames.dtype == np.uint16
    mean = frames.astype(np.float64).mean(axis=0)
    signal = np.clip(mean - cfg.dark_field_background, 0, None)
    rows, cols = np.indices(mean.shape)
    assert (signal * rows).sum() / signal.sum() == pytest.approx(44.0, abs=0.15)
    assert (signal * cols).sum() / signal.sum() == pytest.approx(53.5, abs=0.15)
    inside = mean > 0.5 * np.median(mean[sim.model.disc_weight > 0.99])
    assert np.sqrt(inside.sum() / np.pi) == pytest.approx(cfg.disc_radius_px, abs=0.3)
    n_out = (sim.model.disc_weight <= 1e-3).sum()
    expect = cfg.electrons_per_position + cfg.dark_field_background * n_out
    assert frames.sum(axis=(1, 2)).mean() == pytest.approx(expect, rel=0.01)
    far = sim.model.disc_weight == 0
    assert mean[far].mean() == pytest.approx(cfg.dark_field_background, rel=0.15)


def test_frames_are_deterministic_and_chunking_invariant():
    cfg = SimConfig(seed=9, scan_shape=(10, 10), frame_shape=(48, 48), mrad_per_px=1.5, frames_per_message=7)
    a = Simulator(cfg)
    chunks = list(a.scan_frames(1))
    assert [f for f, _ in chunks] == list(range(0, 100, 7))
    assert all(c.shape[1:] == (48, 48) and c.dtype == np.uint16 for _, c in chunks)
    whole = Simulator(cfg).precompute_scan(1)
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), whole)
    other = Simulator(cfg.model_copy(update={"seed": 10})).precompute_scan(1)
    assert not np.array_equal(whole, other)
    assert not np.array_equal(whole, a.precompute_scan(0))


def test_virtual_detector_sums_match_render_views():
    cfg = SimConfig(seed=2, scan_shape=(40, 40), frame_shape=(64, 64), mrad_per_px=1.0,
                    convergence_semiangle_mrad=30.0, dose_e_per_A2=3000.0, n_dislocations=4, contrast=0.5,
                    contrast_variation=0.0, bend_contours=0.0, thickness_fringes=0.0, thickness_nm=200.0,
                    disc_edge_falloff=0.0)
    sim = Simulator(cfg)
    frames = sim.precompute_scan(0).reshape(1600, -1).astype(np.float64)
    theta = sim.model.pixel_theta_mrad.reshape(-1, 2)
    tc, R = np.array([16.0, 0.0]), 9.0
    region = np.linalg.norm(theta - tc, axis=1) <= R
    img = (frames @ region).reshape(40, 40)
    views = render_views(sim.scene_at(0), np.stack([tc, -tc]), (40, 40), cfg.scan_step_nm, region_radius_mrad=R)

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    same, mirrored = corr(img, views[0]), corr(img, views[1])
    assert same > 0.9
    assert same > mirrored + 0.02  # the shift -theta dz follows the region's side of the disc
    # brightness: counts = electrons in the region x transmission
    expect = cfg.electrons_per_position * region.sum() / (np.pi * cfg.disc_radius_px ** 2)
    assert img.mean() / views[0].mean() == pytest.approx(expect, rel=0.03)


def test_segmented_values_and_effective_angles():
    cfg = SimConfig(detector="segmented", n_segments=4, scan_shape=(8, 8), dtype="uint32",
                    segment_inner_mrad=4.0, dose_e_per_A2=50.0, **QUIET)
    sim = Simulator(cfg)
    start = sim.start_message("seg")
    assert start.item_shape == (4,) and start.frame_shape is None
    eff = np.array(start.calibration.segment_angles_mrad)
    geo = sim.model.geometric_mrad
    for e, g in zip(eff, geo):
        assert np.linalg.norm(e) < np.linalg.norm(g)  # intensity-weighted: towards the centre
        cosang = e @ g / (np.linalg.norm(e) * np.linalg.norm(g))
        assert cosang > np.cos(np.radians(0.5))
    np.testing.assert_allclose(eff[0], [np.linalg.norm(eff[0]), 0.0], atol=1e-6)  # segment 0 on +x
    vals = sim.precompute_scan(0)
    assert vals.shape == (64, 4) and vals.dtype == np.uint32
    np.testing.assert_allclose(vals.mean(axis=0), sim.model.bf_counts + sim.model.background, rtol=0.02)
    # the annulus 4..30 mrad of a uniform 30 mrad disc holds (1 - (4/30)^2) of the electrons, minus the MTF edge
    frac = vals.sum(axis=1).mean() / cfg.electrons_per_position
    assert 0.9 < frac < 1 - (4 / 30) ** 2 + 0.005


def test_segment_images_shift_by_effective_angles():
    cfg = SimConfig(detector="segmented", n_segments=4, scan_shape=(32, 32), seed=1, n_dislocations=0,
                    bend_contours=0.0, thickness_fringes=0.0, dose_e_per_A2=1e4, dtype="uint32", focus_nm=-60.0,
                    contrast_variation=0.0)
    sim = Simulator(cfg)
    from livestereo.sim.scene import single_line_scene

    blob = np.stack([np.linspace(15.5, 16.5, 6), np.full(6, 15.5), np.full(6, 40.0)], axis=1)
    sim._scenes = {0: single_line_scene(blob, focus_nm=cfg.focus_nm, line_width_nm=2.0, contrast=1.0,
                                        extent_nm=(32, 32))}
    sim._views = None
    vals = sim.precompute_scan(0).astype(np.float64).reshape(32, 32, 4)
    dz = 40.0 - cfg.focus_nm
    rows, cols = np.indices((32, 32))
    for k, th in enumerate(sim.model.effective_mrad):
        img = vals[..., k] / np.median(vals[..., k])
        expect = np.array([16.0, 15.5]) - th * 1e-3 * dz  # (x, y) = (col, row) at p = 1 nm
        w = (1.0 - img) * (np.hypot(cols - expect[0], rows - expect[1]) < 7)
        c = np.array([(w * cols).sum(), (w * rows).sum()]) / w.sum()
        np.testing.assert_allclose(c, expect, atol=0.15)


def test_start_message_and_calibration():
    cfg = SimConfig(scan_shape=(4, 5), frame_shape=(32, 40), mrad_per_px=2.0, seed=3)
    start = Simulator(cfg).start_message("run-1")
    assert isinstance(start, StartMessage)
    assert start.scan_shape == (4, 5) and start.item_shape == (32, 40) and start.dtype == "uint16"
    assert start.calibration.disc_center_px == (15.5, 19.5) and start.calibration.disc_radius_px == 15.0
    md = start.metadata
    assert md["material"] == "gamma-TiAl" and md["zone_axis"] == [1, 1, 0] and md["seed"] == 3
    assert md["thickness_nm"] == cfg.thickness_nm
    hidden = Simulator(cfg.model_copy(update={"send_disc_calibration": False})).start_message("r")
    assert hidden.calibration.disc_center_px is None and hidden.calibration.disc_radius_px is None


def test_in_situ_series_moves_lines_and_keeps_ids():
    cfg = SimConfig(seed=4, n_dislocations=5, repeat=4, glide_velocity_nm_per_scan=3.0, drift_nm_per_scan=(0.5, 0.0))
    sim = Simulator(cfg)
    s0, s3 = sim.scene_at(0), sim.scene_at(3)
    assert s0.ids == s3.ids
    np.testing.assert_allclose(s3.offset_nm, [1.5, 0.0])
    moved = [np.abs(a.points_nm.mean(axis=0) - b.points_nm.mean(axis=0)).max()
             for a, b in zip(s0.dislocations, s3.dislocations) if len(a.points_nm) and len(b.points_nm)]
    assert max(moved) > 2.0
    # the same scene whichever way it is reached
    again = Simulator(cfg)
    for a, b in zip(again.scene_at(3).dislocations, s3.dislocations):
        np.testing.assert_array_equal(a.points_nm, b.points_nm)


def test_write_truth_round_trip(tmp_path):
    cfg = SimConfig(seed=6, scan_shape=(24, 32), n_dislocations=4, repeat=2)
    sim = Simulator(cfg)
    path = tmp_path / "truth.h5"
    sim.write_truth(path, [0, 1])
    back = read_truth(path)
    assert back["attrs"]["material"] == "gamma-TiAl"
    assert back["calibration"]["scan_step_nm"] == cfg.scan_step_nm
    for scan in (0, 1):
        t = sim.truth(scan)
        b = back["scans"][scan]
        assert sorted(b["curves"]) == sorted(t["ids"])
        for ident, pts in zip(t["ids"], t["curves"]):
            np.testing.assert_array_equal(b["curves"][ident], pts)
        np.testing.assert_array_equal(b["height_nm"], t["height_nm"])
        np.testing.assert_array_equal(b["line_mask"], t["line_mask"])
        np.testing.assert_array_equal(b["disparity_px"], t["disparity_px"])
        assert t["line_mask"].shape == (2, 24, 32) and t["disparity_px"].shape == (24, 32, 2)
        assert np.isfinite(t["height_nm"]).sum() > 20


@pytest.mark.parametrize("name", ["sim_tial_insitu.toml", "sim_bench.toml"])
def test_shipped_configs_load(name):
    cfg = load_toml(ROOT / "configs" / name, SimConfig)
    assert cfg.detector == "pixelated"


def test_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('thicknes_nm = 100.0\n')
    with pytest.raises(ConfigError, match="thicknes_nm"):
        load_toml(bad, SimConfig)
    bad.write_text('thickness_nm = "thick"\n')
    with pytest.raises(ConfigError, match="thickness_nm"):
        load_toml(bad, SimConfig)
    bad.write_text('scan_shape = [64]\n')
    with pytest.raises(ConfigError, match="scan_shape"):
        load_toml(bad, SimConfig)
