"""Segmented runs through the daemon: pass-through segment images and nanoparticles per scan."""

from __future__ import annotations

import csv

import h5py
import numpy as np
from scipy.spatial import cKDTree

from livestereo.daemon.results import read_scan, scan_path
from livestereo.protocol.messages import EndMessage
from livestereo.sim.particles import ParticleSimConfig, ParticleSimulator
from tests.conftest import frames_parts


def test_segmented_run_gives_segment_images_and_particles(harness):
    cfg = ParticleSimConfig(seed=3, scan_shape=(128, 128), n_particles=25, radius_range_nm=(5.0, 9.0), materials=("Au",))
    sim = ParticleSimulator(cfg)
    start = sim.start_message("np")
    frames = sim.precompute_scan(0)
    h = harness()
    h.send_msg(start)
    for seq, i in enumerate(range(0, len(frames), 1024)):
        h.send(frames_parts("np", seq, 0, i, frames[i:i + 1024]))
    h.send_msg(EndMessage("np", len(frames), "complete"))
    h.wait_runs(1)
    path = scan_path(h.cfg.output_dir, "np", 0)
    csv_path = path.with_name("scan_0000_particles.csv")
    h.wait_for(csv_path.exists)
    got = read_scan(path)
    # pass-through: image of segment s at position i is the frame value itself
    np.testing.assert_array_equal(got["images"].reshape(4, -1), frames.T.astype(np.float64))
    np.testing.assert_allclose(got["centroids_mrad"], np.asarray(start.calibration.segment_angles_mrad))
    with h5py.File(path) as f:
        z = f["particles/z_nm"][()]
        xy = np.stack([f["particles/x_nm"][()], f["particles/y_nm"][()]], 1)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(z) >= 15  # 25 simulated, some at the edges or overlapping
    truth = sim.truth(0)
    t_xy = np.stack([truth["x_nm"], truth["y_nm"]], 1)
    dist, idx = cKDTree(t_xy).query(xy)
    matched = dist < truth["radius_nm"][idx]  # the detection tolerance: one radius
    assert matched.mean() > 0.9
    dz_err = z[matched] - truth["z_nm"][idx[matched]]
    assert np.median(np.abs(dz_err - np.median(dz_err))) < 10.0  # depth recovered (nm)
    worker = h.daemon.workers[0]
    h.wait_for(lambda: worker.done >= 1)


def test_reconstruct_command_finds_particles_in_a_segmented_recording(tmp_path):
    import subprocess
    import sys

    rec = tmp_path / "np.lsrec"
    common = [sys.executable, "-m", "livestereo"]
    sets = ["--set", "scan_shape=[128,128]", "--set", "n_particles=20", "--set", "seed=5",
            "--set", "radius_range_nm=[5.0,9.0]", "--set", 'materials=["Au"]']
    out = subprocess.run(common + ["simulate", "--particles", *sets, "--record", str(rec), "--truth", str(tmp_path / "t.h5")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = subprocess.run(common + ["reconstruct", str(rec), "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "particle(s)" in res.stdout
    rows = list(csv.DictReader((tmp_path / "out" / "scan_0000_particles.csv").open()))
    assert len(rows) >= 12
    cfg = ParticleSimConfig(scan_shape=(128, 128), n_particles=20, seed=5, radius_range_nm=(5.0, 9.0), materials=("Au",))
    truth = ParticleSimulator(cfg).truth(0)
    xy = np.array([[float(r["x_nm"]), float(r["y_nm"])] for r in rows])
    dist, idx = cKDTree(np.stack([truth["x_nm"], truth["y_nm"]], 1)).query(xy)
    assert np.mean(dist < truth["radius_nm"][idx]) > 0.9  # within one radius, as the issue scores detections
