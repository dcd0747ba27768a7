"""Replay a livestereo recording: re-emit its messages on a ZeroMQ socket, as a detector would.

The replay binds (a source binds, the daemon connects, design.md section 3) a PUSH socket
(default; lossless, back-pressure) or a PUB socket (several consumers, drops acceptable), and
sends every record's parts unchanged (``send_multipart(copy=False)`` straight from the
file's memory map) at the recorded pace, a multiple of it, or as fast as the receiver takes
them. Bad messages in the recording are re-emitted too: the replay is the recorded stream,
byte for byte.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Literal

import zmq

from livestereo.recording.format import RecordingReader

__all__ = ["ReplayStats", "replay"]

_log = logging.getLogger("livestereo.replay")


@dataclasses.dataclass
class ReplayStats:
    """What a replay sent. Times in seconds, sizes in bytes."""

    path: Path
    endpoint: str
    """The endpoint actually bound (a '*' port resolved to the real one)."""
    pattern: str
    speed: float | None
    records_sent: int = 0
    parts_sent: int = 0
    bytes_sent: int = 0
    """Message payload bytes sent (sum of part lengths)."""
    waited_for_peer_s: float = 0.0
    """Time from bind until the first receiver was there."""
    duration_s: float = 0.0
    """Time from the first send to the last send (excludes the peer wait and the linger)."""
    recorded_duration_s: float = 0.0
    """Span of the receive times of the records sent, as recorded."""
    linger_s: float = 0.0
    """Time spent at the end letting queued messages go out."""
    linger_expired: bool = False
    """True when closing took the whole linger time: queued messages may not have been delivered."""
    stop_offset: int = 0
    stop_reason: str = ""
    """Where and why the file stopped ("end of file", "truncated payload at byte N ...", ...)."""
    interrupted: bool = False
    """True when the ``stop`` event (or Ctrl-C) ended the replay early."""

    @property
    def complete(self) -> bool:
        """True when every record of an intact file was sent and delivery was not cut short."""
        return self.stop_reason == "end of file" and not self.interrupted and not self.linger_expired

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes_sent / self.duration_s if self.duration_s > 0 else 0.0

    def __str__(self) -> str:
        speed = "max" if self.speed is None else f"x{self.speed:g}"
        s = (
            f"replayed {self.records_sent} records ({self.bytes_sent / 1e6:.1f} MB) of {self.path} on "
            f"{self.endpoint} ({self.pattern}, speed {speed}) in {self.duration_s:.3f} s "
            f"({self.rate_bytes_per_s / 1e9:.2f} GB/s; recorded span {self.recorded_duration_s:.3f} s); "
            f"file stopped at byte {self.stop_offset}: {self.stop_reason}"
        )
        if self.interrupted:
            s += "; interrupted"
        if self.linger_expired:
            s += f"; linger of {self.linger_s:.1f} s expired: the last messages may not have been delivered"
        return s


def replay(
    path: str | os.PathLike,
    endpoint: str,
    *,
    speed: float | None = 1.0,
    pattern: Literal["push", "pub"] = "push",
    linger_s: float = 30.0,
    wait_for_peer_s: float | None = 10.0,
    slow_joiner_s: float = 0.2,
    max_gap_s: float | None = 10.0,
    sndhwm: int | None = None,
    verify: bool = True,
    on_bound: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    log: logging.Logger | None = None,
) -> ReplayStats:
    """Send every record of the recording at ``path`` on a socket bound at ``endpoint``.

    ``endpoint``: e.g. ``tcp://127.0.0.1:5555``, ``tcp://127.0.0.1:*`` (a free port; the
    bound endpoint goes to ``on_bound`` and ``ReplayStats.endpoint``) or ``ipc:///tmp/x``.
    ``speed``: 1.0 = recorded pace (differences of receive times), 4.0 = four times faster,
    None = as fast as the receiver takes them (PUSH back-pressure; with PUB, as fast as the
    slowest subscriber: no drops).
    ``pattern``: "push" (default; lossless) or "pub" (an XPUB socket, so the replay knows
    when a subscriber arrived; at a paced speed, a subscriber that falls more than the high
    water mark behind loses messages, as with a live PUB source).
    ``linger_s``: at the end, how long to wait (s) for queued messages to leave before the
    socket closes; PUSH messages are never dropped before that.
    ``wait_for_peer_s``: how long to wait (s) for the first receiver (PUSH) or subscriber
    (PUB) before the first message; TimeoutError naming the endpoint after that; None = wait
    forever. The pace clock starts when the peer is there.
    ``slow_joiner_s``: PUB only: extra wait (s) after the first subscription, so that other
    subscribers starting at the same time are there too.
    ``max_gap_s``: pauses longer than this between recorded messages (e.g. between runs
    appended hours apart) are shortened to it (recorded seconds); None keeps them.
    ``sndhwm``: send high water mark (messages); default zmq's.
    ``stop``: an event that ends the replay early (checked at least every 0.1 s).

    Never raises on a truncated or corrupt recording: it sends every good record and reports
    where and why the file stopped. Raises RecordingError (missing file / not a recording),
    TimeoutError (no peer), zmq.ZMQError naming the endpoint (bind failed).
    """
    log = log or _log
    if speed is not None and not speed > 0:
        raise ValueError(f"replay speed must be > 0 (a multiple of the recorded pace) or None (max), got {speed!r}")
    if pattern not in ("push", "pub"):
        raise ValueError(f"replay pattern must be 'push' or 'pub', got {pattern!r}")
    reader = RecordingReader(path, verify=verify)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH if pattern == "push" else zmq.XPUB)
    stats = ReplayStats(path=reader.path, endpoint=endpoint, pattern=pattern, speed=speed)
    try:
        if sndhwm is not None:
            sock.setsockopt(zmq.SNDHWM, int(sndhwm))
        if pattern == "pub" and speed is None:
            sock.setsockopt(zmq.XPUB_NODROP, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise zmq.ZMQError(exc.errno, f"replay of {reader.path}: cannot bind {endpoint}: {exc.strerror}") from None
        bound = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        stats.endpoint = bound
        if on_bound is not None:
            on_bound(bound)
        log.info("replay of %s: bound %s (%s), waiting for a %s", reader.path, bound, pattern,
                 "receiver" if pattern == "push" else "subscriber")

        t_bind = time.monotonic()
        if not _wait_for_peer(sock, pattern, wait_for_peer_s, stop):
            if stop is not None and stop.is_set():
                stats.interrupted = True
                stats.stop_reason = "stopped before a peer connected"
                return stats
            raise TimeoutError(
                f"replay of {reader.path}: no {'receiver' if pattern == 'push' else 'subscriber'} "
                f"connected to {bound} within {wait_for_peer_s} s"
            )
        if pattern == "pub" and slow_joiner_s > 0:
            time.sleep(slow_joiner_s)
        stats.waited_for_peer_s = time.monotonic() - t_bind

        try:
            _send_all(reader, sock, stats, speed, max_gap_s, stop)
        except KeyboardInterrupt:
            stats.interrupted = True
        stats.stop_offset, stats.stop_reason = reader.stop_offset, reader.stop_reason
        if stats.interrupted and not reader.stop_reason.startswith(("end of file", "truncated", "checksum", "bad")):
            stats.stop_reason = f"interrupted at byte {reader.stop_offset}"
    finally:
        t_close = time.monotonic()
        sock.close(linger=max(0, int(linger_s * 1000)))
        ctx.term()  # blocks until queued messages are out or the linger expired
        stats.linger_s = time.monotonic() - t_close
        stats.linger_expired = linger_s > 0 and stats.linger_s >= 0.95 * linger_s
        reader.close()
    (log.warning if not stats.complete else log.info)("%s", stats)
    return stats


def _wait_for_peer(sock: zmq.Socket, pattern: str, wait_s: float | None, stop: threading.Event | None) -> bool:
    """True once a PUSH peer can take a message / an XPUB subscription arrived."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLOUT if pattern == "push" else zmq.POLLIN)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        if stop is not None and stop.is_set():
            return False
        left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
        if left < 0:
            return False
        if poller.poll(int(left * 1000) + 1):
            if pattern == "pub":
                msg = sock.recv()  # b"\x01" + topic: a subscription
                if not msg or msg[0] != 1:
                    continue
            return True


def _send_all(reader: RecordingReader, sock: zmq.Socket, stats: ReplayStats, speed: float | None,
              max_gap_s: float | None, stop: threading.Event | None) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLOUT)
    t0 = None  # monotonic time of the first send
    rec_first = rec_prev = None  # recorded times
    rec_elapsed = 0.0  # recorded seconds since the first record, gaps shortened
    last_check = time.monotonic()
    try:
        for rec in reader:
            if rec_first is None:
                rec_first = rec_prev = rec.recv_time
            step = rec.recv_time - rec_prev
            if step > 0:
                rec_elapsed += step if max_gap_s is None else min(step, max_gap_s)
            rec_prev = max(rec_prev, rec.recv_time)
            now = time.monotonic()
            if t0 is None:
                t0 = now
            elif speed is not None:
                due = t0 + rec_elapsed / speed
                while due - now > 0.0005:
                    time.sleep(min(due - now, 0.1))
                    now = time.monotonic()
                    if stop is not None and stop.is_set():
                        stats.interrupted = True
                        return
            if stop is not None and now - last_check > 0.1:
                last_check = now
                if stop.is_set():
                    stats.interrupted = True
                    return
            parts = rec.parts
            if not parts:  # a zmq message has at least one part
                parts = [b""]
            while True:
                try:
                    sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    poller.poll(100)
                    if stop is not None and stop.is_set():
                        stats.interrupted = True
                        return
            stats.records_sent += 1
            stats.parts_sent += len(parts)
            stats.bytes_sent += rec.nbytes
    finally:
        if t0 is not None:
            stats.duration_s = time.monotonic() - t0
            stats.recorded_duration_s = rec_prev - rec_first
