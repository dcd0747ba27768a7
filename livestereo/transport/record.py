"""Record a livestereo stream to a file without processing it (``livestereo record``).

Connects a PULL (default) or SUB socket to a source, receives every multipart message with
``recv_multipart(copy=False)`` and appends its raw parts, with the receive time, to a
livestereo recording (``livestereo.recording.format``). Nothing is validated beyond reading
part 0's msgpack header to see the message type, run id and sequence number: a recorder
keeps everything, bad messages included, and counts them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Literal

import zmq

from livestereo.protocol.codec import ProtocolError, decode_header
from livestereo.recording.format import RecordingWriter

__all__ = ["RecordStats", "record"]

_log = logging.getLogger("livestereo.record")


@dataclasses.dataclass
class RecordStats:
    """What a recorder received and wrote. Times in seconds, sizes in bytes."""

    path: Path
    endpoint: str
    pattern: str
    messages: int = 0
    payload_bytes: int = 0
    """Bytes of message parts received."""
    file_bytes: int = 0
    """Bytes appended to the file (record headers, padding and checksums included)."""
    types: Counter = dataclasses.field(default_factory=Counter)
    """Messages per type: "start", "frames", "end"; "bad" (part 0 not a msgpack map),
    "unknown" (a map without a known "type")."""
    runs: list[str] = dataclasses.field(default_factory=list)
    """Run ids in order of first appearance."""
    frames: int = 0
    """Frames announced by frames headers (sum of their counts)."""
    seq_gaps: int = 0
    """Frames messages missing according to their per-run sequence numbers (dropped by a
    SUB socket, or never sent); duplicates / reordering count as 0."""
    ends: int = 0
    """End messages received."""
    duration_s: float = 0.0
    """From the start of recording to its stop."""
    stop_reason: str = ""
    """"end of run" / "timeout" / "idle timeout" / "stopped" / "interrupted"."""

    @property
    def rate_bytes_per_s(self) -> float:
        return self.payload_bytes / self.duration_s if self.duration_s > 0 else 0.0

    def __str__(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.types.items())) or "nothing"
        s = (
            f"recorded {self.messages} messages ({kinds}; {self.frames} frames, {self.payload_bytes / 1e6:.1f} MB) "
            f"from {self.endpoint} ({self.pattern}) to {self.path} in {self.duration_s:.3f} s "
            f"({self.rate_bytes_per_s / 1e9:.2f} GB/s); stopped: {self.stop_reason}"
        )
        if self.seq_gaps:
            s += f"; {self.seq_gaps} frames messages missing (sequence gaps)"
        return s


def record(
    endpoint: str,
    path: str | os.PathLike,
    *,
    pattern: Literal["pull", "sub"] = "pull",
    stop_after_end: bool = True,
    max_runs: int | None = 1,
    timeout_s: float | None = None,
    idle_timeout_s: float | None = None,
    append: bool = False,
    overwrite: bool = False,
    fsync_every_s: float | None = 1.0,
    rcvhwm: int | None = None,
    stop: threading.Event | None = None,
    on_connected: Callable[[], None] | None = None,
    log: logging.Logger | None = None,
) -> RecordStats:
    """Record the stream from ``endpoint`` (the source binds, we connect) into ``path``.

    ``pattern``: "pull" (default; lossless) or "sub" (subscribes to everything; messages the
    publisher drops show up as ``seq_gaps``).
    Stops at the first of: ``max_runs`` end messages received (with ``stop_after_end``;
    ``max_runs=None`` never stops on ends); ``timeout_s`` seconds since the call; no message
    for ``idle_timeout_s`` seconds after the first one; the ``stop`` event; Ctrl-C (the file is
    closed cleanly and the stats returned with stop_reason "interrupted").
    ``append`` / ``overwrite`` / ``fsync_every_s``: see ``RecordingWriter`` (an existing
    non-empty file is refused without one of them).
    ``on_connected``: called once the socket is connected, before the first receive.
    """
    log = log or _log
    if pattern not in ("pull", "sub"):
        raise ValueError(f"record pattern must be 'pull' or 'sub', got {pattern!r}")
    if max_runs is not None and max_runs < 1:
        raise ValueError(f"record max_runs must be >= 1 or None, got {max_runs!r}")
    writer = RecordingWriter(path, fsync_every_s=fsync_every_s, append=append, overwrite=overwrite)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PULL if pattern == "pull" else zmq.SUB)
    stats = RecordStats(path=writer.path, endpoint=endpoint, pattern=pattern)
    t_start = time.monotonic()
    try:
        if rcvhwm is not None:
            sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        if pattern == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise zmq.ZMQError(exc.errno, f"record to {writer.path}: cannot connect to {endpoint}: {exc.strerror}") from None
        log.info("recording %s (%s) to %s", endpoint, pattern, writer.path)
        if on_connected is not None:
            on_connected()
        stats.stop_reason = _receive_loop(sock, writer, stats, stop_after_end, max_runs, timeout_s,
                                          idle_timeout_s, stop, t_start)
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
    finally:
        sock.close(linger=0)
        writer.close()
        stats.duration_s = time.monotonic() - t_start
        stats.file_bytes = writer.bytes_written
    log.info("%s", stats)
    return stats


def _receive_loop(sock, writer, stats, stop_after_end, max_runs, timeout_s, idle_timeout_s, stop, t_start) -> str:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = None if timeout_s is None else t_start + timeout_s
    last_msg = None
    last_seq: dict[str, int] = {}
    known_runs: set[str] = set()
    recv = sock.recv_multipart
    write = writer.write
    while True:
        now = time.monotonic()
        if stop is not None and stop.is_set():
            return "stopped"
        if deadline is not None and now >= deadline:
            return "timeout"
        if idle_timeout_s is not None and last_msg is not None and now - last_msg >= idle_timeout_s:
            return "idle timeout"
        wait = 0.25
        if deadline is not None:
            wait = min(wait, deadline - now)
        if idle_timeout_s is not None and last_msg is not None:
            wait = min(wait, last_msg + idle_timeout_s - now)
        if not poller.poll(max(0, int(wait * 1000)) + 1):
            continue
        # drain what is there without polling between messages
        while True:
            try:
                frames = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            recv_time = time.time()
            buffers = [f.buffer for f in frames]
            write(buffers, recv_time)
            stats.messages += 1
            stats.payload_bytes += sum(b.nbytes for b in buffers)
            last_msg = time.monotonic()
            kind, run = _classify(buffers, stats, last_seq)
            if run is not None and run not in known_runs:
                known_runs.add(run)
                stats.runs.append(run)
            if kind == "end":
                stats.ends += 1
                if stop_after_end and max_runs is not None and stats.ends >= max_runs:
                    return "end of run"


def _classify(buffers, stats: RecordStats, last_seq: dict[str, int]) -> tuple[str, str | None]:
    """Count the message by its part-0 header; returns (type, run id or None)."""
    try:
        header = decode_header(buffers[0])
    except ProtocolError:
        stats.types["bad"] += 1
        return "bad", None
    kind = header.get("type")
    if kind not in ("start", "frames", "end"):
        stats.types["unknown"] += 1
        return "unknown", None
    stats.types[kind] += 1
    run = header.get("run_id")
    if not isinstance(run, str):
        return kind, None
    if kind == "frames":
        count, seq = header.get("count"), header.get("seq")
        if isinstance(count, int) and count > 0:
            stats.frames += count
        if isinstance(seq, int):
            prev = last_seq.get(run)
            if prev is not None and seq > prev + 1:
                stats.seq_gaps += seq - prev - 1
            if prev is None or seq > prev:
                last_seq[run] = seq
    elif kind == "start":
        last_seq.pop(run, None)
    return kind, run
