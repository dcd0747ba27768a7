"""`livestereo run --view`: the window is its own process; killing it mid-run never stops acquisition."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import pytest
import zmq

from livestereo.protocol.codec import encode
from livestereo.protocol.messages import EndMessage
from tests.conftest import frames_parts, make_start, random_frames

SCANS, SHAPE = 3, (24, 20)


def _wait(pred, timeout, what, log=None):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{log.read_text()}" if log is not None else ""))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"  # a zombie is dead
    except FileNotFoundError:
        return False


def _shows_images(png) -> bool:
    """The top half of the window (the image panels) is mostly drawn, not the empty 'waiting' state."""
    import imageio.v3 as iio

    try:
        img = iio.imread(png)[..., :3]
    except Exception:
        return False
    top = img[40: img.shape[0] // 2].max(axis=-1)
    return bool((top > 60).mean() > 0.1)


@pytest.mark.gui
def test_window_killed_mid_run_daemon_finishes_and_writes_everything(tmp_path):
    from livestereo.view.app import headless_gl_problem

    problem = headless_gl_problem()
    if problem:
        pytest.skip(f"headless OpenGL (EGL) unavailable: {problem}")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 2000
    port = push.bind_to_random_port("tcp://127.0.0.1")
    out = tmp_path / "results"
    log = tmp_path / "daemon.log"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}  # headless: PNG snapshots
    with open(log, "wb") as logf:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "livestereo", "-v", "run", "--endpoint", f"tcp://127.0.0.1:{port}", "--view",
             "--publish", "tcp://127.0.0.1:*", "--no-inference", "--max-runs", "1", "--output-dir", str(out),
             "--idle-timeout", "30"], stdout=logf, stderr=subprocess.STDOUT, env=env)
    viewer_pid = None
    try:
        _wait(lambda: re.search(r"live window started \(pid (\d+)\)", log.read_text()), 60, "the live window", log)
        viewer_pid = int(re.search(r"live window started \(pid (\d+)\)", log.read_text()).group(1))
        start = make_start(run_id="kv", scan_shape=SHAPE, repeat=SCANS)
        push.send_multipart([bytes(p) for p in encode(start)])
        n = SHAPE[0] * SHAPE[1]
        seq = 0
        snap = out / "latest.png"  # run --view: the headless window writes its snapshots into the output folder
        for scan in range(SCANS):
            frames = random_frames(n, seed=scan)
            for i in range(0, n, 40):
                push.send_multipart(frames_parts("kv", seq, scan, i, frames[i:i + 40]))
                seq += 1
                time.sleep(0.2 if scan == 1 else 0.02)
            if scan == 0:
                _wait(snap.exists, 60, "the window to attach", log)
            if scan == 1:
                # the window has drawn the daemon's virtual images (it really was attached) ...
                _wait(lambda: _shows_images(snap), 30, "the window to draw the images", log)
                os.kill(viewer_pid, signal.SIGKILL)  # ... and now it dies mid-run
                _wait(lambda: not _alive(viewer_pid), 10, "the window to die")
        push.send_multipart([bytes(p) for p in encode(EndMessage("kv", SCANS * n, "complete"))])
        assert daemon.wait(120) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
        if viewer_pid is not None and _alive(viewer_pid):
            os.kill(viewer_pid, signal.SIGKILL)
        push.close()
        ctx.term()
    for scan in range(SCANS):
        path = out / "kv" / f"scan_{scan:04d}.h5"
        with h5py.File(path) as f:
            assert f["images"].shape == (2, *SHAPE)
            assert f["valid"][()].all()
    summary = json.loads((out / "kv" / "run.json").read_text())
    assert len(summary["scan_results"]) == SCANS
