"""The results publisher: a ZeroMQ PUB socket carrying snapshots and results to any client.

Message layout: :mod:`livestereo.protocol.live` and README.md "Live results stream".

It never slows ingest.  Producers (the ingest thread, the inference workers, the results
writer) hand items over with :meth:`ResultsPublisher.offer`, which only stores a reference
and returns: ``snapshot``, ``dislocations``, ``particles`` and ``status`` go through
latest-wins slots (an item replaced before it was sent is counted as ``skipped``),
``scan_done`` and the final result of each scan through a bounded queue (kept unless
more than ``max_pending`` pile up).  The
publisher's own thread turns items into messages (binning images etc. happens there) and
sends them without blocking.  A subscriber that does not keep up loses messages inside
libzmq once its queue (``sndhwm`` messages) is full; it sees jumps in ``pub_seq``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

import zmq

from livestereo.priority import lower_thread_priority
from livestereo.protocol.live import encode_live

log = logging.getLogger("livestereo.publisher")

LATEST_TOPICS = ("status", "dislocations", "particles", "snapshot")
"""Latest-wins topics, in the order they are served when several are waiting."""

Builder = Callable[[], "tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None"]
"""Returns (data, arrays, ids) with ids = {run_id, scan, seq}; None: nothing to send."""


class ResultsPublisher(threading.Thread):
    """PUB socket bound to ``endpoint`` (e.g. ``tcp://127.0.0.1:5556``; port ``*`` picks one,
    see :attr:`endpoint`), fed through :meth:`offer`."""

    def __init__(self, endpoint: str, *, sndhwm: int = 4, max_pending: int = 256, context: zmq.Context | None = None,
                 idle: bool = False):
        super().__init__(name="livestereo-publisher", daemon=True)
        self.idle = bool(idle)
        """Build and send messages in the SCHED_IDLE class (Linux, :mod:`livestereo.priority`)."""
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.sndhwm = int(sndhwm)
        self.sock.linger = 0
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            if self._own_ctx:
                self.ctx.term()
            raise OSError(f"cannot publish on {endpoint}: {exc}") from None
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._cond = threading.Condition()
        self._slots: dict[str, Builder | None] = {t: None for t in LATEST_TOPICS}
        self._queue: collections.deque = collections.deque()
        self._max_pending = int(max_pending)
        self._halt = False
        self.pub_seq = 0
        self.sent = 0
        """Messages handed to the socket."""
        self.skipped = 0
        """Items replaced in their latest-wins slot before they were sent."""
        self.dropped = 0
        """Messages the socket would not take (zmq.Again) or scan_done items over max_pending."""
        self.errors = 0
        """Items whose message could not be built (logged)."""
        self.sent_by_topic: collections.Counter = collections.Counter()
        self.bytes_sent = 0

    # ------------------------------------------------------------------ producers
    def offer(self, topic: str, build: Builder, *, keep: bool = False) -> None:
        """Hand over one item (never blocks, never raises for a full queue).

        ``keep``: send it even if newer items of the topic follow (the final result of a
        scan); it goes through the bounded queue like ``scan_done``."""
        with self._cond:
            if topic in self._slots and not keep:
                if self._slots[topic] is not None:
                    self.skipped += 1
                self._slots[topic] = build
            elif topic == "scan_done" or topic in self._slots:
                if len(self._queue) >= self._max_pending:
                    self.dropped += 1
                    return
                self._queue.append((topic, build))
            else:
                raise ValueError(f"unknown topic {topic!r}")
            self._cond.notify()

    def counters(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "sent": self.sent, "skipped": self.skipped, "dropped": self.dropped,
                "errors": self.errors, "pub_seq": self.pub_seq, "bytes": self.bytes_sent}

    # ------------------------------------------------------------------ thread
    def _next(self) -> tuple[str, Builder] | None:
        with self._cond:
            while True:
                if self._queue:
                    return self._queue.popleft()
                for t in LATEST_TOPICS:
                    b = self._slots[t]
                    if b is not None:
                        self._slots[t] = None
                        return t, b
                if self._halt:
                    return None
                self._cond.wait(0.5)

    def run(self) -> None:
        lower_thread_priority(0, idle=self.idle)
        try:
            while True:
                item = self._next()
                if item is None:
                    return
                self._send(*item)
        finally:
            self.sock.close(0)
            if self._own_ctx:
                self.ctx.term()

    def _send(self, topic: str, build: Builder) -> None:
        try:
            built = build()
            if built is None:
                return
            data, arrays, ids = built
            parts = encode_live(topic, self.pub_seq, data, arrays, run_id=ids.get("run_id"), scan=ids.get("scan"),
                                seq=ids.get("seq"))
        except Exception:  # a bad result must not stop publishing
            self.errors += 1
            if self.errors <= 5:
                log.exception("could not build the %s message", topic)
            return
        try:
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return
        except zmq.ZMQError as exc:
            self.errors += 1
            log.warning("publishing %s failed: %s", topic, exc)
            return
        self.pub_seq += 1
        self.sent += 1
        self.sent_by_topic[topic] += 1
        self.bytes_sent += sum(len(p) if isinstance(p, bytes) else memoryview(p).nbytes for p in parts)

    def stop(self, drain_s: float = 1.0) -> None:
        """Send what is waiting (up to ``drain_s`` s), then close the socket."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < drain_s:
            with self._cond:
                if not self._queue and all(v is None for v in self._slots.values()):
                    break
            time.sleep(0.01)
        with self._cond:
            self._halt = True
            self._cond.notify_all()
        if self.ident is not None:
            self.join(5)
        else:  # never started: close the socket here
            self.sock.close(0)
            if self._own_ctx:
                self.ctx.term()
