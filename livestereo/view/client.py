"""The live window's receiver: a thread with a SUB socket feeding a :class:`ViewState`.

The socket's receive queue is kept short (``rcvhwm``): when the window cannot keep up, the
publisher drops messages for it (they show as "dropped" through the ``pub_seq`` gaps)
instead of this process falling ever further behind. ``ZMQ_CONFLATE`` does not work with
multipart messages, so the thread drains whatever is queued, decodes every header (to count
what was missed) and folds only the newest message of each topic into the model; the
expensive part (contrast stretch, overlays, depth colours) runs here, never in the draw.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from livestereo.protocol.live import LiveMessage, LiveProtocolError, decode_live
from livestereo.view.launch import DEFAULT_ENDPOINT  # noqa: F401  (re-exported)
from livestereo.view.model import ViewState

log = logging.getLogger("livestereo.view")


class LiveClient:
    """Receive the live results stream at ``endpoint`` into ``state`` until :meth:`stop`."""

    def __init__(self, endpoint: str, state: ViewState, *, rcvhwm: int = 8, max_batch: int = 256,
                 context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.state = state
        self.rcvhwm = rcvhwm
        self.max_batch = max_batch
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livestereo-view-client", daemon=True)
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self.batches = 0

    def start(self) -> "LiveClient":
        self._thread.start()
        self._ready.wait(5.0)
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(self.endpoint)
        except Exception as exc:  # bad endpoint: reported by start()
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                batch: list[LiveMessage] = []
                while len(batch) < self.max_batch:
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        batch.append(decode_live(parts))
                    except LiveProtocolError as exc:
                        log.warning("live stream: %s", exc)
                        self.state.note_error()
                if batch:
                    t0 = time.perf_counter()
                    self.state.feed_batch(batch)
                    self.batches += 1
                    log.debug("folded %d message(s) in %.1f ms", len(batch), 1e3 * (time.perf_counter() - t0))
        finally:
            sock.close(0)
