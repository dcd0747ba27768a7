"""Shared fixtures: messages, and a daemon on a real ZeroMQ socket."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from livestereo.protocol.codec import encode, encode_frames_header
from livestereo.protocol.messages import Calibration, EndMessage, StartMessage

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_start(run_id="r1", scan_shape=(6, 5), frame_shape=(16, 16), dtype="uint16", repeat=1, **cal) -> StartMessage:
    """A pixelated start message with the disc calibrated (centre of a 16x16 frame, radius 6 px)."""
    h, w = frame_shape
    calibration = dict(convergence_semiangle_mrad=30.0, scan_step_nm=1.0, mrad_per_px=5.0,
                       disc_center_px=((h - 1) / 2, (w - 1) / 2), disc_radius_px=min(h, w) * 0.375)
    calibration.update(cal)
    return StartMessage(version=1, run_id=run_id, detector="pixelated", scan_shape=scan_shape, frame_shape=frame_shape,
                        dtype=dtype, repeat=repeat, calibration=Calibration(**calibration))


def random_frames(n, shape=(16, 16), dtype="uint16", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=(n, *shape)).astype(dtype)


def frames_parts(run_id, seq, scan, first, frames):
    frames = np.ascontiguousarray(frames)
    return [encode_frames_header(run_id, seq, scan, first, len(frames), frames.dtype.name, frames.shape[1:]), frames.tobytes()]


class DaemonHarness:
    """A PUSH socket bound by the test (the source), a Daemon connected to it in a thread."""

    def __init__(self, tmp_path: Path, analyses=None, **cfg):
        from livestereo.daemon.config import DaemonConfig
        from livestereo.daemon.daemon import Daemon
        from livestereo.transport.zmq_source import ZmqStreamSource

        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.linger = 2000
        self.push.bind("tcp://127.0.0.1:*")
        self.endpoint = self.push.getsockopt_string(zmq.LAST_ENDPOINT)
        cfg.setdefault("output_dir", tmp_path / "results")
        cfg.setdefault("idle_timeout_s", 5.0)
        cfg.setdefault("status_interval_s", 0.2)
        self.cfg = DaemonConfig(endpoint=self.endpoint, **cfg)
        self.daemon = Daemon(self.cfg, ZmqStreamSource(self.endpoint, "pull", context=self.ctx), analyses=analyses)
        self.rc = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.rc = self.daemon.run()

    def send(self, parts):
        self.push.send_multipart(parts)

    def send_msg(self, msg):
        self.push.send_multipart([bytes(p) for p in encode(msg)])

    def send_run(self, start: StartMessage, frames: np.ndarray, batch=4, scan=0, end=True, seq0=0):
        self.send_msg(start)
        seq = seq0
        for i in range(0, len(frames), batch):
            self.send(frames_parts(start.run_id, seq, scan, i, frames[i:i + batch]))
            seq += 1
        if end:
            self.send_msg(EndMessage(start.run_id, len(frames), "complete"))
        return seq

    @property
    def counters(self):
        return self.daemon.ingest.counters

    def wait_for(self, predicate, timeout=20.0):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if predicate():
                return True
            time.sleep(0.02)
        raise AssertionError("timed out waiting for the daemon")

    def wait_runs(self, n, timeout=20.0):
        self.wait_for(lambda: len(self.daemon.runs_ended) >= n, timeout)

    def stop(self):
        self.daemon.stop()
        self.thread.join(10)
        self.push.close(0)
        self.ctx.term()


@pytest.fixture
def harness(tmp_path):
    made = []

    def factory(**cfg):
        h = DaemonHarness(tmp_path, **cfg)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.stop()


def reference_images(frames: np.ndarray, weights: np.ndarray, first: int, n_positions: int):
    """Independent numpy reference: images[d, first+i] = sum(weights[d] * frames[i]) in float64."""
    out = np.zeros((weights.shape[0], n_positions))
    flat = frames.reshape(len(frames), -1).astype(np.float64)
    out[:, first:first + len(frames)] = weights.reshape(weights.shape[0], -1).astype(np.float64) @ flat.T
    return out
