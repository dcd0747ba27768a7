"""Recording while running, replaying bit-identically, truncated recordings, and the CLI path
simulate -> ZeroMQ -> run in separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livestereo.daemon.offline import accumulate_file
from livestereo.daemon.results import read_scan, scan_path
from tests.conftest import make_start, random_frames


def _run_and_record(harness, tmp_path):
    rec = tmp_path / "live.lsrec"
    h = harness(record=rec, output_dir=tmp_path / "live")
    start = make_start(scan_shape=(5, 6), repeat=2)
    h.send_msg(start)
    from livestereo.protocol.messages import EndMessage
    from tests.conftest import frames_parts

    seq = 0
    for scan in range(2):
        frames = random_frames(30, seed=10 + scan)
        for i in range(0, 30, 4):
            h.send(frames_parts("r1", seq, scan, i, frames[i:i + 4]))
            seq += 1
    h.send([b"\xc1 a bad message is recorded too"])
    h.send_msg(EndMessage("r1", 60, "complete"))
    h.wait_runs(1)
    h.stop()
    live = [read_scan(scan_path(tmp_path / "live", "r1", s)) for s in range(2)]
    return rec, live


def test_replay_is_bit_identical_offline_and_over_a_socket(harness, tmp_path):
    rec, live = _run_and_record(harness, tmp_path)
    offline = accumulate_file(rec)
    assert [s.scan for s in offline] == [0, 1]
    for s, ref in zip(offline, live):
        assert np.array_equal(s.images, ref["images"])  # bit for bit
        assert np.array_equal(s.valid, ref["valid"])

    import threading

    from livestereo.transport.replay import replay

    from livestereo.daemon.config import DaemonConfig
    from livestereo.daemon.daemon import Daemon
    from livestereo.transport.zmq_source import ZmqStreamSource

    endpoint = "ipc://" + str(tmp_path / "replay.sock")
    cfg = DaemonConfig(endpoint=endpoint, output_dir=tmp_path / "replayed", max_runs=1, idle_timeout_s=5)
    d = Daemon(cfg, ZmqStreamSource(endpoint))
    runner = threading.Thread(target=d.run, daemon=True)
    runner.start()
    replay(rec, endpoint, speed=None)
    runner.join(20)
    assert d.runs_ended and d.ingest.counters.rejected["not_msgpack"] == 1
    for s, ref in enumerate(live):
        got = read_scan(scan_path(tmp_path / "replayed", "r1", s))
        assert np.array_equal(got["images"], ref["images"])


def test_truncated_recording_replays_complete_records_and_says_where(harness, tmp_path):
    rec, live = _run_and_record(harness, tmp_path)
    data = rec.read_bytes()
    cut = tmp_path / "cut.lsrec"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    from livestereo.daemon.sources import RecordingSource

    src = RecordingSource(cut)
    n = 0
    with pytest.raises(EOFError, match="byte"):
        while True:
            if src.receive(0) is not None:
                n += 1
    assert n > 5
    scans = accumulate_file(cut)
    assert scans[0].complete and np.array_equal(scans[0].images, live[0]["images"])
    assert not scans[-1].complete or len(scans) == 1


@pytest.mark.slow
def test_cli_simulate_streams_into_run(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ep = tmp_path / "ep"
    sim = subprocess.Popen([sys.executable, "-m", "livestereo", "simulate", "--set", "scan_shape=[12,10]",
                            "--set", "frame_shape=[64,64]", "--set", "repeat=2", "--set", "frames_per_message=16",
                            "--endpoint", "tcp://127.0.0.1:*", "--endpoint-file", str(ep), "--truth", str(tmp_path / "truth.h5"),
                            "--run-id", "cli"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not (ep.exists() and ep.read_text()):
        assert sim.poll() is None, sim.stdout.read()
        assert time.monotonic() - t0 < 120
        time.sleep(0.05)
    run = subprocess.run([sys.executable, "-m", "livestereo", "run", "--endpoint", ep.read_text(), "--max-runs", "1",
                          "--output-dir", str(tmp_path / "out"), "--idle-timeout", "30"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert sim.wait(60) == 0
    assert run.returncode == 0, run.stdout + run.stderr
    assert "frames/s" in run.stderr and "scans done 2" in run.stderr
    for s in range(2):
        got = read_scan(scan_path(tmp_path / "out", "cli", s))
        assert got["complete"] and got["images"].shape == (2, 12, 10)
        assert np.all(got["images"] > 0)
    assert (tmp_path / "truth.h5").exists()
