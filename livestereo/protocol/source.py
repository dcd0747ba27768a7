"""What every frame source hands to the daemon: decoded messages, or the reason they were bad.

A source is anything that yields livestereo messages: the livestereo ZeroMQ stream, a
recording, a Merlin on TCP, a DECTRIS stream, a 4D file. The daemon polls it with
``receive(timeout_s)`` so it can print status and notice a sender that went silent.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from livestereo.protocol.codec import Buffer, ProtocolError
from livestereo.protocol.messages import Message


@dataclasses.dataclass(slots=True)
class Received:
    """One item from a source: exactly one of ``message`` and ``error`` is set."""

    message: Message | None
    error: ProtocolError | None
    parts: Sequence[Buffer] | None
    """The raw wire parts where the source speaks livestereo stream v1 (recorded as they
    came); None for adapters, whose messages are encoded when recorded."""
    recv_time: float
    """Receive time (s since the epoch)."""
    nbytes: int = 0
    """Bytes received for this item (status line GB/s)."""


class Source(Protocol):
    """A frame source polled by the daemon."""

    name: str
    """Human-readable description, e.g. 'livestereo stream tcp://127.0.0.1:5555 (pull)'."""

    def receive(self, timeout_s: float) -> Received | None:
        """The next item, or None if nothing came within ``timeout_s`` seconds.

        Raises EOFError when a finite source (a file) has nothing more to give.
        """
        ...

    def close(self) -> None:
        """Release sockets and files."""
        ...
