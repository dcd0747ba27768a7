"""Rolling inference in the daemon: a short simulated in-situ stereo series through the
shipped networks, its live results stream (documented layout), per-scan /dislocations with
tracks, latest-wins skipping of stale snapshots, and a missing weights file."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from livestereo.daemon.results import scan_path
from livestereo.daemon.worker import Retry
from livestereo.protocol.live import decode_live
from livestereo.protocol.messages import EndMessage
from tests.conftest import frames_parts

SCANS = 3


@pytest.fixture(scope="module")
def series():
    """A 48 x 48 in-situ series of 3 scans of gliding dislocations (64 x 64 px frames)."""
    from livestereo.config import load_toml
    from livestereo.sim.config import SimConfig
    from livestereo.sim.simulator import Simulator

    cfg = load_toml(Path(__file__).resolve().parents[1] / "configs" / "sim_tial_insitu.toml", SimConfig,
                    {"scan_shape": [48, 48], "frame_shape": [64, 64], "mrad_per_px": 1.2, "repeat": SCANS})
    sim = Simulator(cfg)
    return sim, [sim.precompute_scan(s) for s in range(SCANS)]


def _send_series(h, sim, scans, run_id="ins", pause=0.01, slow_until=None):
    """Stream the scans; while ``slow_until()`` is False, the second half of the last scan
    trickles in one frame per 0.3 s (what must happen while a scan fills gets its time,
    however busy the machine)."""
    h.send_msg(sim.start_message(run_id))
    seq = 0
    for s, frames in enumerate(scans):
        i = 0
        while i < len(frames):
            n = 64
            if slow_until is not None and s == len(scans) - 1 and i >= len(frames) // 2 and not slow_until():
                n = 1
                time.sleep(0.3)
            h.send(frames_parts(run_id, seq, s, i, frames[i:i + n]))
            seq += 1
            i += n
            time.sleep(pause)  # about live speed for a 2-core machine: snapshots while the scan fills
    h.send_msg(EndMessage(run_id, sum(len(f) for f in scans), "complete"))


def _subscribe(endpoint):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    time.sleep(0.3)  # slow joiner
    return ctx, sub


def _drain(sub, msgs, until=None, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if sub.poll(50):
            msgs.append(decode_live(sub.recv_multipart(copy=False)))
        elif until is None or until():
            return msgs
    raise AssertionError("timed out")


def test_live_series_stream_layout_tracks_and_files(harness, series, tmp_path):
    from livestereo.inference.live import DislocationAnalysis

    sim, scans = series
    out = tmp_path / "results"
    h = harness(analyses=[DislocationAnalysis(out, threads=1)], output_dir=out,
                publish="tcp://127.0.0.1:*", snapshot_interval_s=0.05, status_interval_s=0.2)
    ctx, sub = _subscribe(h.daemon.publisher.endpoint)
    msgs: list = []
    try:
        # the first snapshots also prepare the networks (a second or more on a busy machine)
        # and finished scans go first, so the last scan fills slowly until a rolling
        # inference on a partial scan has been published
        def partial_seen():
            _drain(sub, msgs)
            return any(m.topic == "dislocations" and not m.data["final"] for m in msgs)

        _send_series(h, sim, scans, slow_until=partial_seen)
        h.wait_runs(1, timeout=120)
        run_json = h.cfg.output_dir / "ins" / "run.json"
        _drain(sub, msgs, until=lambda: run_json.exists() and sum(m.topic == "scan_done" for m in msgs) >= SCANS)
    finally:
        sub.close(0)
        ctx.term()
    by = {}
    for m in msgs:
        by.setdefault(m.topic, []).append(m)
        assert m.header["protocol"] == "livestereo.live" and m.header["version"] == 1
    assert set(by) >= {"snapshot", "dislocations", "status", "scan_done"}
    seqs = [m.pub_seq for m in msgs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    # snapshot: images (n_det, h, w) float32, valid, mean pattern and detector regions
    snap = by["snapshot"][-1]
    d = snap.data
    assert d["names"] == ["view0", "view1"] and d["roles"] == ["view", "view"] and d["detector"] == "pixelated"
    assert d["scan_shape"] == [48, 48] and d["display_binning"] == 1 and d["scan_step_nm"] == 1.0
    assert {"centroids_mrad", "fill_fraction", "final", "complete", "frames", "disc_center_px", "disc_radius_px"} <= set(d)
    a = snap.arrays
    assert a["images"].shape == (2, 48, 48) and a["images"].dtype == np.float32
    assert a["valid"].shape == (48, 48) and a["valid"].dtype == bool
    assert a["mean_pattern"].shape == (64, 64) and a["mean_pattern"].dtype == np.float32
    assert a["regions"].dtype == np.uint8 and set(np.unique(a["regions"])) == {0, 1, 2}
    assert any(0 < m.data["fill_fraction"] < 1 for m in by["snapshot"])  # partial snapshots too
    assert sorted(m.scan for m in by["snapshot"] if m.data["final"]) == list(range(SCANS))  # final ones are never skipped

    # dislocations: live (partial) and final results, lines packed in flat arrays
    dis = by["dislocations"]
    assert any(not m.data["final"] for m in dis), "no rolling inference on partial scans"
    finals = {m.scan: m for m in dis if m.data["final"]}
    assert sorted(finals) == list(range(SCANS))
    for m in dis:
        L = len(m.data["lines"])
        off = m.arrays["line_offsets"]
        assert off.dtype == np.int64 and off.shape == (L + 1,) and off[0] == 0
        assert m.arrays["line_points_nm"].shape == (off[-1], 3) and m.arrays["line_points_nm"].dtype == np.float32
        assert m.arrays["line_pixels_px"].shape == (off[-1], 2)
        assert m.arrays["prob"].dtype == np.uint8 and m.arrays["prob"].shape == (2, 48, 48)
        assert m.data["latency_s"] > 0 and m.data["thickness_nm"] == 150.0 and m.data["view_indices"] == [0, 1]
        assert m.run_id == "ins" and m.header["seq"] is not None
        for ln in m.data["lines"]:
            assert {"id", "track_id", "n_points", "length_nm", "z_range_nm", "direction_uvw", "habit_plane",
                    "habit_hkl", "displacement_nm", "velocity_nm_s", "speed_nm_s"} <= set(ln)
    assert finals[0].data["lines"] and all(ln["track_id"] is not None for ln in finals[0].data["lines"])
    later = [ln for s in range(1, SCANS) for ln in finals[s].data["lines"] if ln["speed_nm_s"] is not None]
    assert len(later) >= 3, "no line was followed from one scan to the next"
    assert all(len(ln["velocity_nm_s"]) == 3 for ln in later)
    assert all(ln["velocity_sigma_z_nm_s"] is not None and ln["velocity_sigma_z_nm_s"] > 0 for ln in later)

    # scan_done and status
    done = by["scan_done"]
    assert [m.scan for m in done] == list(range(SCANS))
    for m in done:
        assert m.data["complete"] and m.data["frames"] == 48 * 48 and m.data["hdf5"].endswith(f"scan_{m.scan:04d}.h5")
        assert m.data["n_lines"] == len(finals[m.scan].data["lines"]) and len(m.data["tracks"]) == m.data["n_lines"]
    st = by["status"][-1].data
    assert {"frames", "frames_per_s", "gb_per_s", "rejected", "gaps", "scans_done", "publisher", "inference"} <= set(st)
    assert st["inference"]["done"] >= 1 and st["inference"]["errors"] == 0

    # files: /dislocations with maps and tracks in every scan file, tracks in run.json
    for s in range(SCANS):
        with h5py.File(scan_path(h.cfg.output_dir, "ins", s)) as f:
            g = f["dislocations"]
            assert f["images"].shape == (2, 48, 48)  # the daemon's own datasets are still there
            assert g["maps/prob"].shape == (2, 48, 48) and g.attrs["n_lines"] == len(g["tracks/track_id"])
            assert g["tracks/displacement_nm"].shape == (g.attrs["n_lines"], 3)
            assert g["tracks"].attrs["clock"] == "frames"
            if s:
                assert np.isfinite(g["tracks/speed_nm_s"][()]).any()
                n_scans = g["tracks/dt_s"][()][np.isfinite(g["tracks/dt_s"][()])] / (48 * 48 * 2e-4)  # scans since last seen
                np.testing.assert_allclose(n_scans, np.rint(n_scans))
                assert set(np.rint(n_scans)) <= {1, 2}
    summary = json.loads(run_json.read_text())
    assert len(summary["scan_results"]) == SCANS and "tracks" in summary["scan_results"][1]["dislocations"]
    tracks = summary["dislocations"]["tracks"]
    assert any(len(t["scans"]) == SCANS for t in tracks)


def test_missing_weights_keeps_acquiring_and_writing(harness, tmp_path, caplog):
    from livestereo.inference.live import DislocationAnalysis
    from tests.conftest import make_start, random_frames

    ana = DislocationAnalysis(tmp_path / "results", thickness_nm=100.0, detector_weights=tmp_path / "nope.pt")
    with caplog.at_level(logging.ERROR):
        h = harness(analyses=[ana], output_dir=tmp_path / "results")
        start = make_start(scan_shape=(12, 10))
        h.send_run(start, random_frames(120), batch=8)
        h.wait_runs(1)
        path = scan_path(h.cfg.output_dir, "r1", 0)
        h.wait_for((path.parent / "run.json").exists)
    assert "dislocation inference disabled" in caplog.text and "nope.pt" in caplog.text
    with h5py.File(path) as f:
        assert f["images"].shape == (2, 12, 10) and "dislocations" not in f
    assert not ana.available and h.daemon.writer.errors == 0
    assert "nope.pt" in json.loads((path.parent / "run.json").read_text())["dislocations"]["error"]


class _Slow:
    """An analysis that takes longer than the snapshot interval."""

    name = "slow"

    def __init__(self):
        self.seen = []

    def applies(self, snap):
        return True

    def analyse(self, snap):
        self.seen.append(snap.seq)
        time.sleep(0.2)
        return snap.seq

    def on_scan(self, scan):
        return None


def test_worker_skips_stale_snapshots_and_ingest_never_waits(harness):
    from tests.conftest import make_start, random_frames

    slow = _Slow()
    h = harness(analyses=[slow], snapshot_interval_s=0.0, particles=False)
    start = make_start(scan_shape=(40, 40))
    t0 = time.monotonic()
    h.send_run(start, random_frames(1600), batch=4)  # 400 messages, a snapshot after each
    h.wait_runs(1)
    ingest_s = time.monotonic() - t0
    w = h.daemon.workers[0]
    h.wait_for(lambda: w.done >= 1)
    assert w.skipped > 10 and w.done < 50
    assert ingest_s < 0.2 * 400 / 4  # far below what waiting for every analysis would take
    assert slow.seen == sorted(slow.seen)  # always the newest, never an older one after a newer


class _CancelProbe:
    """A stand-in pipeline: a finished scan starts while a live snapshot is being analysed."""

    cancellable = True

    def __init__(self, ana):
        self.ana = ana
        self.calls = []

    def process(self, views, valid, centroids_mrad, scan_step_nm, thickness_nm, cancelled=None):
        self.calls.append(cancelled is not None)
        self.ana._finals_started += 1  # what on_scan does when it begins
        if cancelled is not None and cancelled():
            return None
        raise AssertionError("the live analysis should have given up")


def test_live_snapshot_gives_up_when_a_scan_finishes(tmp_path):
    from livestereo.daemon.products import LayoutInfo, ScanImages
    from livestereo.inference.live import DislocationAnalysis
    from livestereo.protocol.messages import Calibration

    ana = DislocationAnalysis(tmp_path, thickness_nm=100.0)
    ana.pipeline = _CancelProbe(ana)
    shape = (32, 32)
    valid = np.zeros(shape, bool)
    valid[:20] = True
    lay = LayoutInfo(("a", "b"), ("view", "view"), np.array([[-20.0, 0.0], [20.0, 0.0]]), np.ones((2, 8, 8), np.float32),
                     None, None)
    snap = ScanImages("r", 0, 5, np.random.default_rng(0).random((2, *shape)) * valid, valid, lay,
                      Calibration(convergence_semiangle_mrad=30.0, scan_step_nm=1.0), {}, False, False, {})
    assert ana.applies(snap)
    with pytest.raises(Retry):  # the worker tries it again unless a newer snapshot comes
        ana.analyse(snap)
    assert ana.pipeline.calls == [True] and ana.live_skipped_for_final == 1
    ana._finals_running = 1  # while a finished scan is reconstructed: wait, without starting
    with pytest.raises(Retry):
        ana.analyse(snap)
    assert ana.pipeline.calls == [True] and ana.live_skipped_for_final == 2
    ana._finals_running = 0
    ana._final_scans["r"] = 0  # this scan's own final has begun: its partial view is stale
    assert ana.analyse(snap) is None and ana.pipeline.calls == [True]
