"""Interop with an independent peer: LiberTEM-live (optional ``peers`` extra).

- LiberTEM-live's Merlin simulator (``libertem-live-mib-sim``) serves a .mib file;
  livestereo's MerlinSource arms it over the control port, reads the frames, and the
  virtual images equal a numpy reference of the same file (and LiberTEM-live's own live
  ApplyMasksUDF run on the same simulator).
- The other way round: LiberTEM-live's Merlin client (libertem-qd-mpx) reads livestereo's
  Merlin simulator, and its control client talks to livestereo's control port.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livestereo.detectors.files import open_file_source
from livestereo.detectors.merlin import mib
from livestereo.detectors.merlin.sim import MerlinSimulator
from livestereo.detectors.merlin.source import MerlinSource
from livestereo.protocol.messages import EndMessage, FramesMessage
from tests.source_helpers import free_port

pytestmark = pytest.mark.slow

libertem_live = pytest.importorskip("libertem_live", reason="LiberTEM-live not installed: pip install -e '.[peers]'")
pytest.importorskip("libertem_qd_mpx", reason="libertem-qd-mpx not installed: pip install -e '.[peers]'")

SIM_EXE = Path(sys.executable).parent / "libertem-live-mib-sim"
SCAN = (6, 8)
SIZE = 64


@pytest.fixture(scope="module")
def mib_file(tmp_path_factory):
    rng = np.random.default_rng(11)
    frames = rng.poisson(5, size=(SCAN[0] * SCAN[1], SIZE, SIZE)).astype(np.uint16)
    d = tmp_path_factory.mktemp("peers")
    p = d / "scan.mib"
    p.write_bytes(b"".join(mib.make_frame_header(i + 1, (SIZE, SIZE), "U16", depth=12) + mib.encode_payload(f, "U16")
                           for i, f in enumerate(frames)))
    p.with_suffix(".hdr").write_bytes(mib.make_acquisition_header(len(frames), frames_per_trigger=SCAN[1], scan_shape=SCAN))
    return p, frames


def weights():
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = np.hypot(yy - SIZE / 2, xx - SIZE / 2) < SIZE / 4
    w = np.zeros((2, SIZE, SIZE), np.float32)
    w[0][disc & (xx < SIZE / 2)] = 1
    w[1][disc & (xx >= SIZE / 2)] = 1
    return w


@pytest.fixture
def libertem_sim(mib_file):
    if not SIM_EXE.exists():
        pytest.skip(f"{SIM_EXE} not found")
    dp, cp, tp = free_port(), free_port(), free_port()
    proc = subprocess.Popen([str(SIM_EXE), str(mib_file[0].with_suffix(".hdr")), "--host", "127.0.0.1",
                             "--data-port", str(dp), "--control-port", str(cp), "--trigger-port", str(tp),
                             "--cached", "mem", "--wait-trigger"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", cp), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 120:
                proc.kill()
                pytest.fail("LiberTEM-live's Merlin simulator did not start")
            time.sleep(0.2)
    yield dp, cp
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_livestereo(dp, cp, n):
    from livestereo.compute.accumulate import Accumulator

    w = weights()
    acc = Accumulator(w.reshape(2, -1), n)
    src = MerlinSource("127.0.0.1", dp, control_port=cp, arm=True, soft_trigger=True, frames_per_message=16)
    items = []
    t0 = time.time()
    while time.time() - t0 < 60:
        it = src.receive(0.5)
        if it is None:
            continue
        items.append(it)
        if isinstance(it.message, FramesMessage):
            acc.add(it.message.data, it.message.first)
        if isinstance(it.message, EndMessage):
            break
    src.close()
    return items, acc


def test_livestereo_reads_libertem_simulator(mib_file, libertem_sim):
    path, frames = mib_file
    dp, cp = libertem_sim
    items, acc = run_livestereo(dp, cp, frames.shape[0])
    assert not [i.error for i in items if i.error]
    start = items[0].message
    assert start.scan_shape == SCAN and start.frame_shape == (SIZE, SIZE)
    got = np.concatenate([i.message.data for i in items if isinstance(i.message, FramesMessage)])
    assert np.array_equal(got, frames)
    ref = weights().reshape(2, -1).astype(np.float64) @ frames.reshape(len(frames), -1).T.astype(np.float64)
    assert np.array_equal(acc.images, ref)
    assert items[-1].message.reason == "complete"
    file_frames = np.concatenate([i.message.data for i in open_file_source(path) if isinstance(i.message, FramesMessage)])
    assert np.array_equal(file_frames, frames)


def test_same_images_as_libertem_live_apply_masks(mib_file, libertem_sim):
    from libertem.udf.masks import ApplyMasksUDF
    from libertem_live.api import Hooks, LiveContext

    from livestereo.detectors.merlin.source import MerlinControl

    path, frames = mib_file
    dp, cp = libertem_sim
    items, acc = run_livestereo(dp, cp, frames.shape[0])
    time.sleep(0.5)  # the simulator notices the closed data connection when it polls

    class Arm(Hooks):
        def on_ready_for_data(self, env):
            with MerlinControl("127.0.0.1", cp) as ctl:
                ctl.cmd("STARTACQUISITION")
                ctl.cmd("SOFTTRIGGER")

    w = weights()
    ctx = LiveContext()
    try:
        with ctx.make_connection("merlin").open(api_host="127.0.0.1", api_port=cp, data_host="127.0.0.1", data_port=dp) as conn:
            aq = ctx.make_acquisition(conn=conn, nav_shape=SCAN, hooks=Arm())
            res = ctx.run_udf(dataset=aq, udf=ApplyMasksUDF(mask_factories=[lambda: w[0], lambda: w[1]]))
    finally:
        ctx.close()
    theirs = np.asarray(res["intensity"].data).reshape(-1, 2).T
    assert np.allclose(theirs, acc.images, rtol=1e-6, atol=1e-3)


def test_libertem_live_reads_livestereo_simulator(mib_file):
    from libertem.udf.sum import SumUDF
    from libertem_live.api import Hooks, LiveContext
    from libertem_live.detectors.merlin.control import MerlinControl as TheirControl

    _, frames = mib_file
    with MerlinSimulator(frames, scan_shape=SCAN, wait_for_arm=True, acquisitions=None, max_connections=None) as sim:
        with TheirControl(host="127.0.0.1", port=sim.control_port) as c:
            c.set("NUMFRAMESTOACQUIRE", frames.shape[0])
            assert int(c.get("NUMFRAMESTOACQUIRE")) == frames.shape[0]

        class Arm(Hooks):
            def on_ready_for_data(self, env):
                with TheirControl(host="127.0.0.1", port=sim.control_port) as c:
                    c.cmd("STARTACQUISITION")

        ctx = LiveContext()
        try:
            with ctx.make_connection("merlin").open(api_host="127.0.0.1", api_port=sim.control_port, data_host="127.0.0.1",
                                                    data_port=sim.port) as conn:
                aq = ctx.make_acquisition(conn=conn, nav_shape=SCAN, hooks=Arm())
                res = ctx.run_udf(dataset=aq, udf=SumUDF())
        finally:
            ctx.close()
    assert np.array_equal(np.asarray(res["intensity"].data), frames.sum(0))
