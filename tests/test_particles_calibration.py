"""Segment-angle calibration from a known focus change, its file, and ``livestereo calibrate``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from livestereo.cli import main
from livestereo.compute.particles import (
    SegmentCalibration,
    calibrate_segment_angles,
    load_segment_calibration,
    reconstruct_particles,
    save_segment_calibration,
)
from livestereo.config import ConfigError
from livestereo.sim.particles import ParticleSimConfig, ParticleSimulator

ANGLES = np.array([[9.0, 7.0], [-8.0, 8.5], [-7.5, -8.0], [8.0, -9.0]])


def fourier_shift(img, dx, dy):
    """img moved by (+dx, +dy) px (numpy reference, periodic)."""
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.fftfreq(img.shape[1])[None, :]
    return np.real(np.fft.ifft2(np.fft.fft2(img) * np.exp(-2j * np.pi * (fx * dx + fy * dy))))


def textured(shape=(128, 128), seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    return 200 + 60 * ndimage.gaussian_filter(rng.normal(size=shape), 2.5, mode="wrap") / 0.1


def test_pure_shifts_recover_angles_and_remove_drift():
    base = textured()
    dz, p = 300.0, 0.5
    drift = np.array([0.7, -0.4])  # px, common to all segments
    a = np.stack([base] * 4)
    b = np.stack([fourier_shift(base, *(ANGLES[s] * 1e-3 * dz / p + drift)) for s in range(4)])
    # upsampled correlation peak only (the apodisation pulls it ~1 % towards zero)
    theta, det = calibrate_segment_angles(a, b, dz, p, return_details=True, centroid_radius_px=None)
    # equal intensities: the convention makes the plain mean zero
    np.testing.assert_allclose(theta, ANGLES - ANGLES.mean(0), atol=0.12)
    np.testing.assert_allclose(det["common_shift_px"], drift + ANGLES.mean(0) * 1e-3 * dz / p, atol=0.01)
    raw = calibrate_segment_angles(a, b, dz, p, remove_common_mode=False, centroid_radius_px=None)
    np.testing.assert_allclose(raw, ANGLES + drift * p / dz * 1e3, atol=0.12)
    # the focus change sign flips the angles
    np.testing.assert_allclose(calibrate_segment_angles(a, b, -dz, p, centroid_radius_px=None),
                               -(ANGLES - ANGLES.mean(0)), atol=0.12)
    # default: centroid of the correlation peak (right for blurred particles), ~1 % here
    np.testing.assert_allclose(calibrate_segment_angles(a, b, dz, p), ANGLES - ANGLES.mean(0), atol=0.2)


def test_simulated_round_trip_then_pipeline_uses_it(tmp_path):
    cfg = ParticleSimConfig(scan_shape=(192, 192), n_particles=90, seed=41, dose_e_per_a2=20.0,
                            report_angles="geometric")
    sim_a = ParticleSimulator(cfg)
    sim_b = ParticleSimulator(cfg.model_copy(update={"focus_offset_nm": 200.0, "noise_seed": 42}))
    theta = calibrate_segment_angles(sim_a.segment_images(), sim_b.segment_images(), 200.0, 1.0)
    true = sim_a.effective_angles_mrad
    # within 3 % of |theta| (the effective angle, not the ~6 % larger geometric centroid)
    assert np.abs(theta - true).max() < 0.03 * np.hypot(*true.T).min()
    assert np.abs(theta - sim_a.geometric_angles_mrad).max() > np.abs(theta - true).max()
    cal = SegmentCalibration(n_segments=4, segment_angles_mrad=[tuple(t) for t in theta], focus_change_nm=200.0,
                             scan_step_nm=1.0)
    save_segment_calibration(tmp_path / "calib.toml", cal)
    back = load_segment_calibration(tmp_path / "calib.toml", n_segments=4)
    np.testing.assert_allclose(back.angles, theta, atol=1e-6)
    t = reconstruct_particles(sim_a.segment_images(), None, back.angles, 1.0)
    assert len(t) > 40


def test_calibration_file_errors(tmp_path):
    cal = SegmentCalibration(n_segments=2, segment_angles_mrad=[(1.0, 0.0), (-1.0, 0.0)])
    save_segment_calibration(tmp_path / "c.toml", cal)
    with pytest.raises(ValueError, match="2 segments but the detector has 4"):
        load_segment_calibration(tmp_path / "c.toml", n_segments=4)
    (tmp_path / "bad.toml").write_text('kind = "livestereo segment calibration"\nn_segments = 2\n'
                                       'segment_angles_mrad = [[1.0, 0.0]]\n')
    with pytest.raises(ConfigError, match="n_segments is 2"):
        load_segment_calibration(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text('n_segments = 1\nsegment_angles_mrad = [[1.0, 0.0]]\nsegment_angle = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'segment_angle'"):
        load_segment_calibration(tmp_path / "typo.toml")


def test_calibrate_bad_inputs():
    a = np.ones((4, 32, 32))
    with pytest.raises(ValueError, match="differ in shape"):
        calibrate_segment_angles(a, np.ones((3, 32, 32)), 100.0, 1.0)
    with pytest.raises(ValueError, match="non-zero"):
        calibrate_segment_angles(a, a, 0.0, 1.0)
    b = a.copy()
    b[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        calibrate_segment_angles(a, b, 100.0, 1.0)


def _pair(tmp_path):
    base = textured(seed=3)
    a = np.stack([base] * 4)
    b = np.stack([fourier_shift(base, *(ANGLES[s] * 1e-3 * 250.0 / 1.0)) for s in range(4)])
    return a, b


def test_cli_calibrate_npy_and_h5(tmp_path, capsys):
    a, b = _pair(tmp_path)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "calib.toml"
    rc = main(["calibrate", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy"),
               "--focus-change-nm", "250", "--scan-step-nm", "1", "-o", str(out)])
    assert rc == 0
    assert "segment 3" in capsys.readouterr().out
    cal = load_segment_calibration(out, n_segments=4)
    np.testing.assert_allclose(cal.angles, ANGLES - ANGLES.mean(0), atol=0.2)
    assert cal.focus_change_nm == 250.0 and cal.sources[0].endswith("a.npy")
    # HDF5, scan step from an attribute
    for name, arr in (("a", a), ("b", b)):
        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f.create_dataset("segments", data=arr).attrs["scan_step_nm"] = 1.0
    rc = main(["calibrate", "--a", str(tmp_path / "a.h5"), "--b", str(tmp_path / "b.h5"),
               "--focus-change-nm", "250", "-o", str(tmp_path / "c2.toml")])
    assert rc == 0
    np.testing.assert_allclose(load_segment_calibration(tmp_path / "c2.toml").angles, cal.angles, atol=1e-6)


def test_cli_calibrate_errors(tmp_path, capsys):
    a, b = _pair(tmp_path)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b3.npy", b[:3])
    np.save(tmp_path / "flat.npy", a[0])
    rc = main(["calibrate", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b3.npy"),
               "--focus-change-nm", "250", "--scan-step-nm", "1", "-o", str(tmp_path / "x.toml")])
    assert rc == 2 and "differ in shape" in capsys.readouterr().err
    rc = main(["calibrate", "--a", str(tmp_path / "flat.npy"), "--b", str(tmp_path / "flat.npy"),
               "--focus-change-nm", "250", "--scan-step-nm", "1", "-o", str(tmp_path / "x.toml")])
    assert rc == 2 and "(n_seg, ny, nx)" in capsys.readouterr().err
    rc = main(["calibrate", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "missing.npy"),
               "--focus-change-nm", "250", "--scan-step-nm", "1"])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    rc = main(["calibrate", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "a.npy"), "--focus-change-nm", "250"])
    assert rc == 2 and "--scan-step-nm" in capsys.readouterr().err
    assert not (tmp_path / "x.toml").exists()


def test_cli_calibrate_from_recordings(tmp_path):
    pytest.importorskip("livestereo.recording.format")
    from livestereo.protocol.codec import encode
    from livestereo.protocol.messages import EndMessage, FramesMessage
    from livestereo.recording.format import RecordingWriter

    cfg = ParticleSimConfig(scan_shape=(192, 192), n_particles=90, seed=51, dose_e_per_a2=20.0)
    paths = []
    for name, focus, nseed in (("a", 0.0, 1), ("b", 200.0, 2)):
        sim = ParticleSimulator(cfg.model_copy(update={"focus_offset_nm": focus, "noise_seed": nseed}))
        path = tmp_path / f"{name}.lsrec"
        with RecordingWriter(path, fsync_every_s=None) as w:
            w.write(encode(sim.start_message(name)), 0.0)
            n = 0
            for seq, (first, frames) in enumerate(sim.scan_frames(0)):
                w.write(encode(FramesMessage(name, seq, 0, first, frames)), 0.0)
                n += len(frames)
            w.write(encode(EndMessage(name, n, "complete")), 0.0)
        paths.append(path)
    out = tmp_path / "rec.toml"
    assert main(["calibrate", "--a", str(paths[0]), "--b", str(paths[1]), "--focus-change-nm", "200", "-o", str(out)]) == 0
    cal = load_segment_calibration(out)
    true = ParticleSimulator(cfg).effective_angles_mrad
    assert cal.scan_step_nm == 1.0  # from the start message
    assert np.abs(cal.angles - true).max() < 0.05 * np.hypot(*true.T).min()


def test_resolve_segment_angles_prefers_the_calibration_file():
    from livestereo.compute.particles import resolve_segment_angles

    cal = SegmentCalibration(n_segments=4, segment_angles_mrad=[tuple(a) for a in ANGLES])
    np.testing.assert_array_equal(resolve_segment_angles(4, ANGLES * 2, cal), ANGLES)
    np.testing.assert_array_equal(resolve_segment_angles(4, ANGLES * 2, None), ANGLES * 2)
    with pytest.raises(ValueError, match="calibration file has 4 segment angles but the detector has 3"):
        resolve_segment_angles(3, None, cal)
    with pytest.raises(ValueError, match="no segment angles"):
        resolve_segment_angles(4, None, None)


def test_particle_config_file_with_calibration(tmp_path):
    from livestereo.compute.particles import load_particle_config

    save_segment_calibration(tmp_path / "cal.toml",
                             SegmentCalibration(n_segments=4, segment_angles_mrad=[tuple(a) for a in ANGLES]))
    (tmp_path / "p.toml").write_text('calibration = "cal.toml"\n[particles]\nthreshold_sigma = 4.0\n')
    params, cal = load_particle_config(tmp_path / "p.toml")
    assert params.threshold_sigma == 4.0 and cal.n_segments == 4
    (tmp_path / "bad.toml").write_text('[particles]\nthreshold = 4.0\n')
    with pytest.raises(ConfigError, match="unknown key 'particles.threshold'"):
        load_particle_config(tmp_path / "bad.toml")
    # the shipped defaults file is the defaults
    from pathlib import Path

    from livestereo.compute.particles import ParticleParams

    shipped, cal0 = load_particle_config(Path(__file__).resolve().parents[1] / "configs" / "particles.toml")
    assert shipped == ParticleParams() and cal0 is None
