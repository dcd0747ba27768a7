"""The results publisher on real ZeroMQ sockets: documented message layout, latest-wins
hand-over, and a subscriber that never reads does not slow ingest."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from livestereo.protocol.live import decode_live
from livestereo.transport.publisher import ResultsPublisher
from tests.conftest import make_start, random_frames


def _subscriber(ctx, endpoint, rcvhwm=1000):
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = rcvhwm
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def _collect(sub, until, timeout=20.0):
    """Decoded messages until ``until(messages)`` is true."""
    out = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if sub.poll(50):
            out.append(decode_live(sub.recv_multipart(copy=False)))
            if until(out):
                return out
    raise AssertionError(f"timed out; got {[m.topic for m in out]}")


def test_latest_wins_slots_and_counters():
    pub = ResultsPublisher("tcp://127.0.0.1:*")
    ctx = zmq.Context()
    sub = _subscriber(ctx, pub.endpoint)
    try:
        for i in range(5):  # not started yet: each offer replaces the previous one
            pub.offer("snapshot", lambda i=i: ({"i": i}, {"a": np.arange(3, dtype=np.float32)}, {"run_id": "r", "scan": 0, "seq": i}))
        for i in range(3):  # scan_done keeps every item
            pub.offer("scan_done", lambda i=i: ({"i": i}, {}, {"scan": i}))
        assert pub.skipped == 4
        time.sleep(0.3)  # let the subscription arrive (slow joiner)
        pub.start()
        msgs = _collect(sub, lambda m: len(m) >= 4)
        assert [m.topic for m in msgs] == ["scan_done"] * 3 + ["snapshot"]
        assert [m.data["i"] for m in msgs] == [0, 1, 2, 4]
        assert [m.pub_seq for m in msgs] == [0, 1, 2, 3]
        snap = msgs[-1]
        assert snap.header["protocol"] == "livestereo.live" and snap.header["seq"] == 4 and snap.run_id == "r"
        np.testing.assert_array_equal(snap.arrays["a"], [0, 1, 2])
        assert pub.sent == 4 and pub.counters()["skipped"] == 4
    finally:
        pub.stop()
        sub.close(0)
        ctx.term()


def _stream(h, n_frames, batch, shape):
    start = make_start(scan_shape=shape, frame_shape=(16, 16))
    frames = random_frames(n_frames, seed=1)
    t0 = time.monotonic()
    h.send_run(start, frames, batch=batch)
    h.wait_runs(1, timeout=60)
    return time.monotonic() - t0


def test_subscriber_that_never_reads_does_not_slow_ingest(harness):
    shape = (256, 256)          # 512 KiB of images per snapshot message, one snapshot per frames message
    n = shape[0] * shape[1]
    ctx = zmq.Context()
    try:
        # normal priority: this is about the socket; in the idle class the publisher would
        # (rightly) send fewer snapshots while ingest keeps the machine busy
        h0 = harness(publish="tcp://127.0.0.1:*", snapshot_interval_s=0.0, particles=False, publish_idle=False)
        base = _stream(h0, n, 512, shape)
        assert h0.counters.frames == n
        h0.stop()

        h = harness(publish="tcp://127.0.0.1:*", snapshot_interval_s=0.0, particles=False, publish_idle=False)
        stuck = _subscriber(ctx, h.daemon.publisher.endpoint, rcvhwm=1)  # connected, never reads
        time.sleep(0.3)
        slow = _stream(h, n, 512, shape)
        assert h.counters.frames == n and h.daemon.runs_ended[0]["reason"] == "complete"
        pub = h.daemon.publisher
        h.wait_for(lambda: pub.sent_by_topic["snapshot"] >= 20)
        # ingest did not wait for the subscriber (generous margin: the machine is shared)
        assert slow < 3 * base + 3.0, (slow, base)
        # the subscriber lost messages inside libzmq: it sees gaps in pub_seq
        got = []
        while stuck.poll(200):
            got.append(decode_live(stuck.recv_multipart(copy=False)).pub_seq)
        print(f"ingest {base:.2f} s without a subscriber, {slow:.2f} s with one that never reads; "
              f"published {pub.sent}, it holds {len(got)}")
        assert len(got) < pub.sent
        assert any(b - a > 1 for a, b in zip(got, got[1:])) or (got and got[-1] - got[0] + 1 > len(got)) or not got
        stuck.close(0)
    finally:
        ctx.term()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is a Linux scheduling class")
def test_publisher_builds_messages_in_the_idle_class():
    seen = []
    pub = ResultsPublisher("tcp://127.0.0.1:*", idle=True)
    pub.start()
    try:
        pub.offer("status", lambda: seen.append(os.sched_getscheduler(threading.get_native_id())) or ({"n": 1}, {}, {}))
        t0 = time.monotonic()
        while not seen and time.monotonic() - t0 < 10:
            time.sleep(0.01)
    finally:
        pub.stop()
    assert seen == [os.SCHED_IDLE] and pub.sent == 1


def _scan_images(shape, weights, names, roles, mean_pattern=None, filled_rows=None):
    from livestereo.daemon.products import LayoutInfo, ScanImages
    from livestereo.protocol.messages import Calibration

    n = len(names)
    rng = np.random.default_rng(0)
    valid = np.zeros(shape, bool)
    valid[: filled_rows if filled_rows is not None else shape[0]] = True
    lay = LayoutInfo(tuple(names), tuple(roles), rng.normal(size=(n, 2)), weights, None, None)
    cal = Calibration(convergence_semiangle_mrad=30.0, scan_step_nm=2.0)
    return ScanImages("r", 3, 17, rng.random((n, *shape)) * valid, valid, lay, cal, {}, False, False, {"frames": 5},
                      mean_pattern=mean_pattern)


def _roundtrip(topic, built):
    from livestereo.protocol.live import encode_live

    data, arrays, ids = built
    parts = [bytes(p) for p in encode_live(topic, 7, data, arrays, **ids)]
    return decode_live(parts)


def test_snapshot_binning_regions_and_segmented_layout():
    from livestereo.daemon.live import snapshot_message

    w = np.zeros((2, 600, 300), np.float32)
    w[0, :, :150], w[1, :, 150:200] = 1.0, 0.5
    snap = _scan_images((1000, 700), w, ["view0", "view1"], ["view", "view"],
                        mean_pattern=np.ones((600, 300), np.float32), filled_rows=501)
    m = _roundtrip("snapshot", snapshot_message(snap))
    assert m.data["display_binning"] == 2 and m.data["pattern_binning"] == 3 and m.data["detector"] == "pixelated"
    assert m.arrays["images"].shape == (2, 500, 350) and m.arrays["images"].dtype == np.float32
    assert m.arrays["valid"][:251].all() and not m.arrays["valid"][251:].any()  # 501 filled rows -> 251 binned rows
    np.testing.assert_allclose(m.arrays["images"][:, 0, 0], snap.images[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)
    assert m.arrays["mean_pattern"].shape == m.arrays["regions"].shape == (200, 100)
    assert set(np.unique(m.arrays["regions"])) == {0, 1, 2}
    assert (m.run_id, m.scan, m.header["seq"], m.pub_seq) == ("r", 3, 17, 7)

    seg = _scan_images((20, 30), np.eye(4, dtype=np.float32), [f"seg{i}" for i in range(4)], ["segment"] * 4)
    m = _roundtrip("snapshot", snapshot_message(seg))
    assert m.data["detector"] == "segmented" and set(m.arrays) == {"images", "valid"}
    assert m.arrays["images"].shape == (4, 20, 30)


def test_particles_message_layout():
    from livestereo.compute.particles.table import ParticleTable
    from livestereo.daemon.live import particles_message

    seg = _scan_images((20, 30), np.eye(4, dtype=np.float32), [f"seg{i}" for i in range(4)], ["segment"] * 4)
    m = _roundtrip("particles", particles_message(seg, ParticleTable.empty(4), 0.0123))
    assert m.data["n"] == 0 and m.data["latency_s"] == 0.0123 and not m.data["final"]
    assert m.arrays["xyz_nm"].shape == (0, 3) and m.arrays["view_xy_px"].shape == (0, 4, 2)
    assert {"radius_nm", "sigma_z_nm", "flags"} <= set(m.arrays)
