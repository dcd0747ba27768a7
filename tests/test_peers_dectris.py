"""Interop with an independent peer: LiberTEM-live's DECTRIS simulator (optional ``peers``
extra).

``libertem-live-dectris-sim CAPTURE --port API --zmqport 0`` replays a ZeroMQ capture file
(records of int64 little-endian length + message: the stream v1 ``dheader-1.0`` and detector
config, then per image ``dimage-1.0`` / ``dimage_d-1.0`` / bitshuffle-lz4 data without HDF5
framing / ``dconfig-1.0``) as DECTRIS stream v1 on a PUSH socket, and serves the SIMPLON
REST API (Flask) on API: arming over REST sends the series. The capture is written here
with the bitshuffle library, independently of livestereo's encoders.

- livestereo's DectrisSource arms the simulator through livestereo's SimplonClient (stream
  mode, trigger mode read back, nimages / ntrigger from the scan shape, arm -> series id),
  reads the series and gets the frames of the capture, its scan shape and frame count.
- ``livestereo run --source dectris://...?rest=...&arm=1`` (the real daemon) writes virtual
  images equal to a float64 numpy reference of the same frames with the same layout weights.

``--zmqport 0``: with a fixed ZeroMQ port the simulator of libertem-live 0.3.0 /
libertem-dectris 0.3.2 binds that port twice (once to read the headers, once to serve) and
fails ("should be possible to bind the zmq socket"); with 0 it picks a free port and logs
it ("RustedReplay listening on tcp://127.0.0.1:PORT"), which is read here.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livestereo.compute.layouts import LayoutSpec, build_layout
from livestereo.daemon.results import read_scan
from livestereo.detectors.dectris.rest import DectrisRestError, SimplonClient
from livestereo.detectors.dectris.source import DectrisSource
from livestereo.protocol.messages import Calibration, EndMessage, FramesMessage, StartMessage
from tests.conftest import reference_images
from tests.source_helpers import collect, free_port

pytestmark = pytest.mark.slow

pytest.importorskip("libertem_live", reason="LiberTEM-live not installed: pip install -e '.[peers]'")
pytest.importorskip("libertem_dectris", reason="libertem-dectris (the DECTRIS simulator's engine) not installed: pip install -e '.[peers]'")
pytest.importorskip("flask", reason="flask (LiberTEM-live's [sim] extra, the simulator's REST API) not installed: pip install -e '.[peers]'")
bitshuffle = pytest.importorskip("bitshuffle", reason="bitshuffle (to write the capture file) not installed")

SIM_EXE = Path(sys.executable).parent / "libertem-live-dectris-sim"
SCAN = (6, 8)
SIZE = 64
SERIES = 17
CAL = dict(convergence_semiangle_mrad=20.0, scan_step_nm=1.0, mrad_per_px=1.25, disc_center_px=(31.5, 31.5), disc_radius_px=16.0)


def make_frames(dtype: str, seed: int = 7) -> np.ndarray:
    """A bright-field disc (radius 16 px) whose brightness changes over the scan, on a weak background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = np.hypot(yy - 31.5, xx - 31.5) < 16
    n = SCAN[0] * SCAN[1]
    lam = np.where(disc, 1.0, 0.02)[None] * rng.uniform(50, 400, size=(n, 1, 1))
    frames = rng.poisson(lam)
    if dtype == "uint32":
        frames = frames * 1000 + 70000  # beyond 16 bits
    return frames.astype(dtype)


def write_capture(path: Path, frames: np.ndarray) -> Path:
    """The simulator's input: DECTRIS stream v1 messages, each as int64 LE length + bytes."""
    n, h, w = frames.shape
    bits = 8 * frames.dtype.itemsize
    out = bytearray()

    def record(msg) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        out.extend(struct.pack("<q", len(data)))
        out.extend(data)

    record({"htype": "dheader-1.0", "header_detail": "basic", "series": SERIES})
    record({"ntrigger": n, "nimages": 1, "trigger_mode": "exte", "x_pixels_in_detector": w, "y_pixels_in_detector": h,
            "bit_depth_image": bits, "compression": "bslz4", "count_time": 0.001, "frame_time": 0.001,
            "description": "livestereo peers test capture"})
    for i, f in enumerate(frames):
        blob = np.asarray(bitshuffle.compress_lz4(np.ascontiguousarray(f))).tobytes()
        record({"htype": "dimage-1.0", "series": SERIES, "frame": i, "hash": ""})
        record({"htype": "dimage_d-1.0", "shape": [w, h], "type": frames.dtype.name, "encoding": f"bs{bits}-lz4<", "size": len(blob)})
        record(blob)
        record({"htype": "dconfig-1.0", "start_time": i * 1000, "stop_time": i * 1000 + 900, "real_time": 900})
    record({"htype": "dseries_end-1.0", "series": SERIES})
    path.write_bytes(bytes(out))
    return path


class LiberTEMDectrisSim:
    """``libertem-live-dectris-sim`` as a subprocess: REST API on ``api_port``, stream v1 on ``zmq_port``."""

    def __init__(self, capture: Path, log: Path):
        if not SIM_EXE.exists():
            pytest.skip(f"{SIM_EXE} not found (LiberTEM-live's DECTRIS simulator)")
        self.api_port = free_port()
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen([str(SIM_EXE), str(capture), "--port", str(self.api_port), "--zmqport", "0"],
                                     stdout=self._log_file, stderr=subprocess.STDOUT)
        self.zmq_port = None
        self.client = SimplonClient("127.0.0.1", self.api_port, timeout_s=10)
        t0 = time.monotonic()
        while True:
            if self.zmq_port is None:
                m = re.search(r"RustedReplay listening on tcp://[^:\s]+:(\d+)", log.read_text(errors="replace"))
                self.zmq_port = int(m.group(1)) if m else None
            if self.zmq_port is not None:
                try:
                    if self.client.version():
                        return
                except DectrisRestError:
                    pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 60:
                self.close()
                pytest.fail(f"LiberTEM-live's DECTRIS simulator did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log_file.close()


@pytest.fixture(params=["uint16", "uint32"])
def sim16or32(request, tmp_path):
    frames = make_frames(request.param)
    sim = LiberTEMDectrisSim(write_capture(tmp_path / "capture.bin", frames), tmp_path / "sim.log")
    yield sim, frames
    sim.close()


@pytest.fixture
def sim16(tmp_path):
    frames = make_frames("uint16")
    sim = LiberTEMDectrisSim(write_capture(tmp_path / "capture.bin", frames), tmp_path / "sim.log")
    yield sim, frames
    sim.close()


def test_dectris_source_arms_and_reads_libertem_simulator(sim16or32):
    sim, frames = sim16or32
    n = SCAN[0] * SCAN[1]
    assert sim.client.detector_config("trigger_mode") == "exte" and sim.client.detector_config("ntrigger") == n
    src = DectrisSource(f"tcp://127.0.0.1:{sim.zmq_port}", scan_shape=SCAN, rest=sim.client, arm=True, images="scan",
                        frames_per_message=16)
    try:
        items = collect(src, timeout_s=60.0, poll_s=0.5)
    finally:
        src.close()
    assert src.armed_series_id == SERIES
    assert not [i.error for i in items if i.error]
    start = items[0].message
    assert isinstance(start, StartMessage)
    assert start.scan_shape == SCAN and start.frame_shape == (SIZE, SIZE) and start.dtype == frames.dtype.name
    assert start.metadata["dectris_stream_version"] == 1 and start.metadata["dectris_series_id"] == SERIES
    assert start.metadata["dectris_armed_series_id"] == SERIES and start.metadata["dectris_trigger_mode"] == "exte"
    got = np.concatenate([i.message.data for i in items if isinstance(i.message, FramesMessage)])
    assert got.dtype == frames.dtype and np.array_equal(got, frames)
    end = items[-1].message
    assert isinstance(end, EndMessage) and end.reason == "complete" and end.frames_sent == n
    assert src.counters["frames"] == n and src.counters["armed"] == 1 and not src.counters["frames_lost"]


def test_simulator_refuses_a_wrong_series_length(sim16):
    sim, _ = sim16
    with pytest.raises(DectrisRestError, match=r"PUT .*/detector/api/1.8.0/config/ntrigger: HTTP 500.*does not match file content"):
        DectrisSource(f"tcp://127.0.0.1:{sim.zmq_port}", scan_shape=(5, 5), rest=sim.client, arm=True, images="scan")


def test_daemon_virtual_images_from_libertem_simulator(sim16, tmp_path):
    sim, frames = sim16
    cal = tmp_path / "cal.toml"
    cal.write_text("\n".join(f"{k} = {list(v) if isinstance(v, tuple) else v}" for k, v in CAL.items()) + "\n")
    url = f"dectris://127.0.0.1:{sim.zmq_port}?rest={sim.api_port}&arm=1&images=scan"
    out = subprocess.run([sys.executable, "-m", "livestereo", "run", "--source", url, "--calibration", str(cal),
                          "--scan-shape", str(SCAN[0]), str(SCAN[1]), "--layout", "multiview", "--k", "4", "--no-inference",
                          "--max-runs", "1", "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = sorted((tmp_path / "out").rglob("scan_0000.h5"))
    assert len(files) == 1, out.stdout[-2000:]
    got = read_scan(files[0])
    assert got["complete"] and got["images"].shape == (4, *SCAN)
    start = StartMessage(version=1, run_id="ref", detector="pixelated", scan_shape=SCAN, frame_shape=(SIZE, SIZE), dtype="uint16",
                         calibration=Calibration(**CAL))
    weights = np.stack([d.weights for d in build_layout(LayoutSpec(kind="multiview", k=4), start).detectors]).reshape(4, -1)
    ref = reference_images(frames, weights, 0, frames.shape[0]).reshape(4, *SCAN)
    assert np.all(ref > 0)
    np.testing.assert_allclose(got["images"], ref, rtol=1e-12)
