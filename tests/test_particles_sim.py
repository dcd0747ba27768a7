"""Nanoparticle simulator (livestereo.sim.particles): geometry, stream interface, truth."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from pydantic import ValidationError

from livestereo.protocol.codec import decode, encode
from livestereo.sim.particles import ParticleSimConfig, ParticleSimulator, render_log_transmission, segment_angle_samples


def small(**kw) -> ParticleSimConfig:
    base = dict(scan_shape=(64, 80), n_particles=12, seed=5, radius_range_nm=(2.0, 5.0), slab_thickness_nm=100.0)
    base.update(kw)
    return ParticleSimConfig(**base)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        ParticleSimConfig(n_particle=3)
    with pytest.raises(ValidationError, match="radius_range_nm"):
        ParticleSimConfig(radius_range_nm=(5.0, 2.0))
    with pytest.raises(ValidationError, match="unknown material"):
        ParticleSimConfig(materials=("Unobtainium",))
    ParticleSimConfig(materials=("X",), material_mu_per_nm={"X": 0.05})


@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_segment_angles_effective_below_geometric(n):
    cfg = ParticleSimConfig(n_segments=n, convergence_semiangle_mrad=20.0)
    theta, weight, eff, geo = segment_angle_samples(cfg)
    assert theta.shape[0] == weight.shape[0] == eff.shape[0] == geo.shape[0] == n
    # the whole disc's dose is shared between the segments; response < 1 loses some
    total = weight.sum()
    expected = 1 - cfg.response_falloff / 2  # integral of 1 - f r^2 over the unit disc / pi
    assert total == pytest.approx(expected, rel=2e-2)
    # response-weighted mean of all effective angles is zero (centred disc)
    np.testing.assert_allclose((weight.sum(1)[:, None] * eff).sum(0), 0, atol=1e-9)
    if n > 1:
        r_eff = np.hypot(*eff.T)
        r_geo = np.hypot(*geo.T)
        assert np.all(r_eff < r_geo)
        # sector centroid radius 2/3 R sin(phi/2)/(phi/2) for a full-disc sector
        phi = 2 * math.pi / n
        np.testing.assert_allclose(r_geo, 2 / 3 * 20 * math.sin(phi / 2) / (phi / 2), rtol=1e-9)


def test_render_sphere_projected_thickness_matches_numpy_reference():
    # one sphere, 1 nm pixels: the integral of mu * chord over the image = mu * 4/3 pi R^3
    parts = {"x_nm": np.array([20.3]), "y_nm": np.array([15.7]), "dz_nm": np.array([0.0]),
             "radius_nm": np.array([6.0]), "mu_per_nm": np.array([0.1]),
             "planes": np.zeros((1, 14, 4)), "nplanes": np.zeros(1, np.int64)}
    L = render_log_transmission((40, 48), parts, (0.0, 0.0), 1.0, ss=4)
    assert L.sum() == pytest.approx(0.1 * 4 / 3 * math.pi * 6.0**3, rel=2e-3)
    yy, xx = np.mgrid[0:40, 0:48]
    ref = 0.1 * 2 * np.sqrt(np.clip(36.0 - (xx - 20.3) ** 2 - (yy - 15.7) ** 2, 0, None))
    inner = (xx - 20.3) ** 2 + (yy - 15.7) ** 2 < 16
    np.testing.assert_allclose(L[inner], ref[inner], rtol=0.02)
    # a tilted ray at dz shifts the particle by -theta * dz
    parts["dz_nm"] = np.array([50.0])
    L2 = render_log_transmission((40, 48), parts, (40.0, -20.0), 1.0, ss=4)
    cy = (L2 * yy).sum() / L2.sum()
    cx = (L2 * xx).sum() / L2.sum()
    assert cx == pytest.approx(20.3 - 0.040 * 50, abs=0.02)
    assert cy == pytest.approx(15.7 + 0.020 * 50, abs=0.02)


def test_single_particle_shift_per_segment_is_minus_effective_angle_times_dz():
    cfg = small(n_particles=1, noise=False, ice_thickness_variation=0.0, faceted_fraction=0.0, seed=3,
                radius_range_nm=(4.0, 4.0), convergence_semiangle_mrad=40.0)
    sim = ParticleSimulator(cfg)
    truth = sim.truth()
    assert len(truth["x_nm"]) == 1
    exp = sim.expected_images()
    yy, xx = np.mgrid[0:64, 0:80]
    for s in range(4):
        c = exp[s].max() - exp[s]
        cx, cy = (c * xx).sum() / c.sum(), (c * yy).sum() / c.sum()
        want = truth["view_xy_px"][0, s]
        # the contrast (1 - exp(-mu t)) centroid follows the effective (response-weighted) angle
        assert cx == pytest.approx(want[0], abs=0.05)
        assert cy == pytest.approx(want[1], abs=0.05)


def test_stream_interface_segmented():
    sim = ParticleSimulator(small(frames_per_message=37))
    start = sim.start_message("p1")
    assert start.detector == "segmented" and start.n_segments == 4 and start.dtype == "uint32"
    assert np.allclose(start.calibration.segment_angles_mrad, sim.effective_angles_mrad)
    assert start.metadata["slab_thickness_nm"] == 100.0
    assert isinstance(decode(encode(start)), type(start))  # msgpack-serialisable metadata
    full = sim.precompute_scan(0)
    assert full.shape == (64 * 80, 4) and full.dtype == np.uint32
    got = np.zeros_like(full)
    firsts = []
    for first, frames in sim.scan_frames(0):
        assert frames.shape[1:] == (4,) and frames.dtype == np.uint32
        got[first:first + len(frames)] = frames
        firsts.append(first)
    assert firsts[:3] == [0, 37, 74]
    np.testing.assert_array_equal(got, full)
    # low dose: tens of counts per segment
    assert 10 < full.mean() < 200
    # deterministic; noise_seed changes only the noise
    np.testing.assert_array_equal(ParticleSimulator(small()).precompute_scan(0), full)
    other = ParticleSimulator(small(noise_seed=99))
    assert not np.array_equal(other.precompute_scan(0), full)
    np.testing.assert_allclose(other.expected_images(), sim.expected_images())


def test_report_geometric_or_no_angles():
    sim = ParticleSimulator(small(report_angles="geometric"))
    np.testing.assert_allclose(sim.start_message("r").calibration.segment_angles_mrad, sim.geometric_angles_mrad)
    assert ParticleSimulator(small(report_angles="none")).start_message("r").calibration.segment_angles_mrad is None


def test_truth_particles_inside_slab_without_overlap_and_h5(tmp_path):
    sim = ParticleSimulator(small(n_particles=40, seed=8))
    t = sim.truth(0)
    n = len(t["x_nm"])
    assert n == 40
    half = 50.0
    assert np.all(np.abs(t["z_nm"]) + t["radius_nm"] <= half + 1e-9)
    pos = np.stack([t["x_nm"], t["y_nm"], t["z_nm"]], 1)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + np.eye(n) * 1e9
    assert np.all(d >= t["radius_nm"][:, None] + t["radius_nm"][None] + 0.5 - 1e-9)
    assert t["view_xy_px"].shape == (n, 4, 2) and t["in_view"].shape == (n, 4)
    sim.write_truth(tmp_path / "truth.h5", scans=(0,))
    with h5py.File(tmp_path / "truth.h5") as f:
        np.testing.assert_allclose(f["scan_0/dz_nm"][()], t["dz_nm"])
        assert f["scan_0/material"][0].decode() in ("Au", "Pt", "Fe3O4")
        assert "n_particles" in f.attrs["config_json"]


def test_brownian_series_moves_particles():
    sim = ParticleSimulator(small(repeat=3, brownian_nm_per_scan=2.0))
    a, b = sim.truth(0), sim.truth(2)
    step = np.hypot(b["x_nm"] - a["x_nm"], b["y_nm"] - a["y_nm"])
    assert 0.5 < np.median(step) < 8
    np.testing.assert_allclose(sim.truth(2)["x_nm"], b["x_nm"])  # deterministic


def test_pixelated_frames_sum_to_segment_images():
    cfg = small(scan_shape=(12, 10), n_particles=3, detector="pixelated", frame_shape=(24, 24), disc_radius_px=10.0,
                noise=False, response_falloff=0.0, radius_range_nm=(3.0, 4.0), frames_per_message=25,
                dose_e_per_a2=2000.0)  # noise-free counts are rounded: use many per pixel
    sim = ParticleSimulator(cfg)
    start = sim.start_message("px")
    assert start.detector == "pixelated" and start.frame_shape == (24, 24) and start.dtype == "uint16"
    frames = np.zeros((120, 24, 24))
    for first, fr in sim.scan_frames(0):
        assert fr.dtype == np.uint16 and fr.shape[1:] == (24, 24)
        frames[first:first + len(fr)] = fr
    # quadrant masks on the detector, in scan axes: theta = (col - c, row - c) * mrad/px
    rows, cols, theta, _ = sim.detector_angles()
    phi = np.mod(np.arctan2(theta[:, 1], theta[:, 0]), 2 * np.pi)
    seg = (phi // (np.pi / 2)).astype(int)
    ref = ParticleSimulator(cfg.model_copy(update={"detector": "segmented", "angle_samples": (8, 8)})).expected_images()
    for s in range(4):
        img = frames[:, rows[seg == s], cols[seg == s]].sum(1).reshape(12, 10)
        # the pixelated detector samples the disc more finely: same images within a few %
        np.testing.assert_allclose(img, ref[s], rtol=0.06)


def test_shipped_config_is_the_defaults():
    from pathlib import Path

    from livestereo.config import load_toml

    path = Path(__file__).resolve().parents[1] / "configs" / "sim_particles.toml"
    assert load_toml(path, ParticleSimConfig) == ParticleSimConfig()
