"""Replay and record over real ZeroMQ sockets (tcp on 127.0.0.1 with a free port, and ipc)."""

from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np
import pytest
import zmq

from livestereo.protocol import codec
from livestereo.protocol.messages import Calibration, EndMessage, FramesMessage, StartMessage
from livestereo.recording.format import RecordingReader, RecordingWriter
from livestereo.transport.record import record
from livestereo.transport.replay import replay


class _Bg(threading.Thread):
    """Runs fn in a thread; join() returns its result or re-raises its exception."""

    def __init__(self, fn, *args, **kw):
        super().__init__(daemon=True)
        self.fn, self.args, self.kw = fn, args, kw
        self.result = self.exc = None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args, **self.kw)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join
            self.exc = exc

    def join(self, timeout=30):
        super().join(timeout)
        assert not self.is_alive(), "background call did not finish"
        if self.exc is not None:
            raise self.exc
        return self.result


def _make_recording(path, n=30, span_s=0.0, big=False):
    rng = np.random.default_rng(0)
    msgs = []
    for i in range(n):
        parts = [b"header %d" % i, rng.integers(0, 255, rng.integers(0, 3000), dtype=np.uint8).tobytes()]
        if i % 7 == 3:
            parts.append(b"")  # an empty part
        if big and i % 10 == 0:
            parts.append(rng.integers(0, 255, 300_000, dtype=np.uint8).tobytes())
        msgs.append(parts)
    with RecordingWriter(path, fsync_every_s=None) as w:
        for i, parts in enumerate(msgs):
            w.write(parts, 1_700_000_000.0 + (span_s * i / max(1, n - 1)))
    return msgs


def _receive(endpoint, n, pattern=zmq.PULL, timeout_s=10.0):
    """Connect and receive n messages; returns (list of parts, arrival times)."""
    ctx = zmq.Context.instance()
    s = ctx.socket(pattern)
    if pattern == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    got, times = [], []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            if s.poll(100):
                got.append(s.recv_multipart())
                times.append(time.monotonic())
    finally:
        s.close(linger=0)
    return got, times


def _replay_bg(path, endpoint, **kw):
    q: queue.Queue = queue.Queue()
    bg = _Bg(replay, path, endpoint, on_bound=q.put, **kw)
    return bg, q.get(timeout=10)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_replay_push_max_speed_delivers_everything(tmp_path, transport):
    path = tmp_path / "r.lsrec"
    msgs = _make_recording(path, n=60, big=True)
    endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp_path}/replay.ipc"
    bg, bound = _replay_bg(path, endpoint, speed=None)
    assert ":*" not in bound
    got, _ = _receive(bound, len(msgs))
    stats = bg.join()
    assert got == msgs  # byte-identical and in order
    assert stats.records_sent == len(msgs) and stats.stop_reason == "end of file" and stats.complete
    assert stats.bytes_sent == sum(len(p) for m in msgs for p in m)
    assert stats.endpoint == bound


def test_replay_pacing(tmp_path):
    path = tmp_path / "p.lsrec"
    msgs = _make_recording(path, n=21, span_s=0.2)
    spans = {}
    for speed in (1.0, 4.0):
        bg, bound = _replay_bg(path, "tcp://127.0.0.1:*", speed=speed)
        got, times = _receive(bound, len(msgs))
        stats = bg.join()
        assert got == msgs
        spans[speed] = times[-1] - times[0]
        assert stats.recorded_duration_s == pytest.approx(0.2)
    assert spans[1.0] >= 0.15, spans
    assert spans[4.0] < 0.15 and spans[4.0] < spans[1.0], spans


def test_replay_long_gaps_are_shortened(tmp_path):
    path = tmp_path / "g.lsrec"
    with RecordingWriter(path) as w:
        w.write([b"a"], 100.0)
        w.write([b"b"], 100.0 + 3600.0)  # an hour later (appended run)
    bg, bound = _replay_bg(path, "tcp://127.0.0.1:*", speed=1.0, max_gap_s=0.05)
    got, times = _receive(bound, 2)
    bg.join()
    assert got == [[b"a"], [b"b"]] and times[1] - times[0] < 2.0


def test_replay_truncated_file_sends_complete_records(tmp_path):
    path = tmp_path / "t.lsrec"
    msgs = _make_recording(path, n=10)
    with RecordingReader(path) as r:
        offsets = [rec.offset for rec in r]
    data = path.read_bytes()
    path.write_bytes(data[: offsets[7] + 50])  # cut inside record 7's payload
    bg, bound = _replay_bg(path, "tcp://127.0.0.1:*", speed=None)
    got, _ = _receive(bound, 7)
    stats = bg.join()
    assert got == msgs[:7] and stats.records_sent == 7
    assert stats.stop_offset == offsets[7] and stats.stop_reason.startswith(f"truncated payload at byte {offsets[7]}")
    assert not stats.complete and "truncated" in str(stats)


def test_replay_pub(tmp_path):
    path = tmp_path / "pub.lsrec"
    msgs = _make_recording(path, n=40, big=True)
    bg, bound = _replay_bg(path, "tcp://127.0.0.1:*", speed=None, pattern="pub", slow_joiner_s=0.05)
    got, _ = _receive(bound, len(msgs), pattern=zmq.SUB)
    stats = bg.join()
    assert got == msgs and stats.records_sent == len(msgs) and stats.pattern == "pub"


def test_replay_without_peer_times_out(tmp_path):
    path = tmp_path / "n.lsrec"
    _make_recording(path, n=2)
    with pytest.raises(TimeoutError, match="no receiver connected to tcp://127.0.0.1:"):
        replay(path, "tcp://127.0.0.1:*", wait_for_peer_s=0.2)
    with pytest.raises(ValueError, match="speed"):
        replay(path, "tcp://127.0.0.1:*", speed=0)


def test_replay_stop_event(tmp_path):
    path = tmp_path / "s.lsrec"
    _make_recording(path, n=5, span_s=20.0)
    stop = threading.Event()
    bg, bound = _replay_bg(path, "tcp://127.0.0.1:*", speed=1.0, stop=stop, linger_s=1.0)
    got, _ = _receive(bound, 1)
    stop.set()
    stats = bg.join(timeout=5)
    assert stats.interrupted and 1 <= stats.records_sent < 5 and not stats.complete


def _stream_messages():
    start = StartMessage(
        version=1, run_id="rec-run", detector="pixelated", scan_shape=(2, 3), frame_shape=(4, 4),
        dtype="uint16", calibration=Calibration(convergence_semiangle_mrad=25, scan_step_nm=2.0, mrad_per_px=1.5),
    )
    frames = np.arange(6 * 16, dtype=np.uint16).reshape(6, 4, 4)
    msgs = [codec.encode(start)]
    msgs.append(codec.encode(FramesMessage("rec-run", 0, 0, 0, frames[:2])))
    msgs.append([b"\xc1garbage", b"more"])  # bad: recorded anyway
    msgs.append(codec.encode(FramesMessage("rec-run", 1, 0, 2, frames[2:3])))
    msgs.append(codec.encode(FramesMessage("rec-run", 3, 0, 3, frames[3:6])))  # seq 2 missing
    msgs.append(codec.encode(EndMessage("rec-run", 6, "complete")))
    return [[bytes(p) for p in m] for m in msgs]


def test_record_from_push(tmp_path):
    msgs = _stream_messages()
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    path = tmp_path / "rec.lsrec"
    try:
        bg = _Bg(record, f"tcp://127.0.0.1:{port}", path, timeout_s=20)
        t_before = time.time()
        for m in msgs:
            push.send_multipart(m)
        push.send_multipart([b"after the end: not recorded"])
        stats = bg.join()
    finally:
        push.close(linger=0)
    assert stats.stop_reason == "end of run"
    assert stats.messages == len(msgs) and stats.ends == 1 and stats.runs == ["rec-run"]
    assert stats.types == {"start": 1, "frames": 3, "end": 1, "bad": 1}
    assert stats.frames == 6 and stats.seq_gaps == 1
    with RecordingReader(path) as r:
        recs = list(r)
        assert r.stop_reason == "end of file"
    assert [[bytes(p) for p in rec.parts] for rec in recs] == msgs
    assert all(t_before - 1 <= rec.recv_time <= time.time() + 1 for rec in recs)
    assert [rec.recv_time for rec in recs] == sorted(rec.recv_time for rec in recs)
    with pytest.raises(FileExistsError):
        record(f"tcp://127.0.0.1:{port}", path, timeout_s=0.1)


def test_record_timeout_and_idle_timeout(tmp_path):
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    try:
        t = time.monotonic()
        stats = record(f"tcp://127.0.0.1:{port}", tmp_path / "a.lsrec", timeout_s=0.3)
        assert stats.stop_reason == "timeout" and stats.messages == 0 and 0.25 <= time.monotonic() - t < 5
        bg = _Bg(record, f"tcp://127.0.0.1:{port}", tmp_path / "b.lsrec", idle_timeout_s=0.3, timeout_s=20)
        push.send_multipart([b"\x80"])  # an empty msgpack map: unknown type
        stats = bg.join()
        assert stats.stop_reason == "idle timeout" and stats.types == {"unknown": 1}
    finally:
        push.close(linger=0)


def test_replay_into_record_round_trip(tmp_path):
    """replay (PUSH, bound) -> record (PULL, connected): the new file holds the same messages."""
    src = tmp_path / "src.lsrec"
    msgs = _stream_messages()
    with RecordingWriter(src) as w:
        for i, m in enumerate(msgs):
            w.write(m, 50.0 + 0.01 * i)
    q: queue.Queue = queue.Queue()
    bg = _Bg(replay, src, f"ipc://{tmp_path}/rt.ipc", speed=None, on_bound=q.put)
    stats = record(q.get(timeout=10), tmp_path / "copy.lsrec", timeout_s=20)
    bg.join()
    assert stats.stop_reason == "end of run"
    with RecordingReader(tmp_path / "copy.lsrec") as r:
        assert [[bytes(p) for p in rec.parts] for rec in r] == msgs


@pytest.mark.slow
def test_replay_throughput(tmp_path):
    """128 KiB frames, PUSH over ipc at max speed (prints the rate; floor only: shared CPUs)."""
    path = tmp_path / "big.lsrec"
    frame = os.urandom(128 * 1024)
    n = 3000
    with RecordingWriter(path, fsync_every_s=None) as w:
        for i in range(n):
            w.write([b"h", frame], float(i))
    bg, bound = _replay_bg(path, f"ipc://{tmp_path}/big.ipc", speed=None)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PULL)
    s.connect(bound)
    got = 0
    t = time.perf_counter()
    while got < n:
        assert s.poll(10_000)
        s.recv_multipart(copy=False)
        got += 1
    dt = time.perf_counter() - t
    s.close()
    stats = bg.join()
    print(f"replay ipc: {n * len(frame) / dt / 1e9:.2f} GB/s ({stats})")
    assert stats.records_sent == n
