"""Helpers shared by the detector-source tests: free ports and draining a source."""

from __future__ import annotations

import socket
import time

import numpy as np

from livestereo.protocol.messages import EndMessage, FramesMessage


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (also: one nobody listens on)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def collect(src, n_ends: int = 1, timeout_s: float = 10.0, poll_s: float = 0.2, max_items: int = 100_000) -> list:
    """Received items from ``src`` until ``n_ends`` end messages came (n_ends=0: until
    EOF or the timeout), the timeout passed, or ``max_items``."""
    items = []
    ends = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s and len(items) < max_items:
        try:
            it = src.receive(poll_s)
        except EOFError:
            break
        if it is None:
            continue
        items.append(it)
        if isinstance(it.message, EndMessage):
            ends += 1
            if n_ends and ends >= n_ends:
                break
    return items


def frames_of(items) -> np.ndarray:
    """The frames of every frames message among ``items``, concatenated."""
    return np.concatenate([i.message.data for i in items if isinstance(i.message, FramesMessage)])


def errors_of(items) -> list:
    """The errors among ``items``."""
    return [i.error for i in items if i.error is not None]
