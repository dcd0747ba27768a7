"""Sending livestereo stream v1 on a bound ZeroMQ socket (simulator, replay of files)."""

from __future__ import annotations

import logging
import time
from typing import Iterable

import numpy as np
import zmq

from livestereo.protocol.codec import encode, encode_end, encode_start, iter_frames_parts
from livestereo.protocol.messages import EndMessage, FramesMessage, Message, StartMessage

log = logging.getLogger("livestereo.sender")


class StreamSender:
    """A bound PUSH (lossless; blocks while no receiver takes frames) or PUB socket.

    ``endpoint`` may end in ``:*`` for a random port; ``self.endpoint`` is then the bound one.
    """

    def __init__(self, endpoint: str, pattern: str = "push", *, sndhwm: int = 64, linger_s: float = 30.0,
                 context: zmq.Context | None = None):
        if pattern not in ("push", "pub"):
            raise ValueError(f"pattern must be 'push' or 'pub', not {pattern!r}")
        # Our own context, terminated on close: that waits (up to the linger) until libzmq has
        # sent every zero-copy frame, so no buffer is freed while its IO thread still reads it.
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH if pattern == "push" else zmq.PUB)
        self._sock.sndhwm = sndhwm
        self._sock.linger = int(linger_s * 1000)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(linger=0)
            if self._own_ctx:
                self._ctx.term()
            raise ValueError(f"cannot bind {endpoint!r}: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pattern = pattern
        self.messages_sent = 0
        self.bytes_sent = 0

    def send_parts(self, parts) -> None:
        self._sock.send_multipart(parts, copy=False)
        self.messages_sent += 1
        self.bytes_sent += sum(memoryview(p).nbytes for p in parts)

    def send(self, msg: Message) -> None:
        self.send_parts(encode(msg))

    def close(self) -> None:
        """Close the socket; blocks until queued messages are sent or the linger expires."""
        self._sock.close()
        if self._own_ctx:
            self._ctx.term()


def stream_scans(
    sender: StreamSender,
    start: StartMessage,
    scans: Iterable[tuple[int, Iterable[tuple[int, np.ndarray]]]],
    *,
    rate_hz: float | None = None,
    frames_per_message: int | None = None,
    on_scan_sent=None,
) -> EndMessage:
    """Send start, then every (scan, [(first, frames), ...]), then end.

    rate_hz: frames per second to pace at (None: as fast as the receiver takes them).
    frames_per_message: re-batch the frames (1 gives one frame per message).
    Returns the end message sent ('aborted' if interrupted).
    """
    sender.send_parts(encode_start(start))
    frames_sent = 0
    t0 = None  # pacing starts at the first frames message (generating scan 0 may take a while)
    reason = "complete"
    current = None
    try:
        for scan, count, parts in iter_frames_parts(start, scans, frames_per_message):
            if scan != current:
                if current is not None and on_scan_sent is not None:
                    on_scan_sent(current, frames_sent)
                current = scan
            if t0 is None:
                t0 = time.perf_counter()
            if rate_hz:
                delay = t0 + frames_sent / rate_hz - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sender.send_parts(parts)
            frames_sent += count
        if current is not None and on_scan_sent is not None:
            on_scan_sent(current, frames_sent)
    except KeyboardInterrupt:
        reason = "aborted"
        raise
    finally:
        end = EndMessage(start.run_id, frames_sent, reason)
        sender.send_parts(encode_end(end))
    return end
