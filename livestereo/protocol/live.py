"""Encode and decode the live results stream (``livestereo.live`` v1) the daemon publishes.

The daemon's results publisher (a ZeroMQ PUB socket, ``livestereo run --publish ENDPOINT``)
sends what it has computed so any client (the live window, a notebook, another program)
can watch.  Every message is a multipart message:

- part 0: the topic, ASCII bytes: ``snapshot``, ``dislocations``, ``particles``, ``scan_done``
  or ``status`` (subscribe to a prefix to get only some);
- part 1: a msgpack map, the header (below);
- parts 2...: one raw buffer per entry of ``header["arrays"]``, in the same order, each
  C-contiguous with the little-endian dtype and shape given there.

Header keys (all messages):

``protocol`` (``"livestereo.live"``), ``version`` (1), ``topic`` (= part 0), ``pub_seq``
(int, increases by one for every message the publisher sends, all topics together: a
subscriber that sees a jump missed messages, e.g. because it was too slow and its queue
was full), ``time`` (float, s since the epoch, when the message was sent), ``run_id``
(str or None), ``scan`` (int or None), ``seq`` (int or None, the frames message the
content is based on), ``arrays`` (list of ``{"name", "dtype", "shape"}``) and ``data`` (a map,
the topic's own fields, documented in README.md "Live results stream").

Decoding never copies: the arrays are read-only views on the received buffers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

PROTOCOL = "livestereo.live"
VERSION = 1
TOPICS = ("snapshot", "dislocations", "particles", "scan_done", "status")

_ALLOWED_DTYPES = frozenset(np.dtype(x).str for x in (
    "u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8", "?"))
_MAX_ARRAY_BYTES = 2**31


class LiveProtocolError(ValueError):
    """A live-stream message that cannot be decoded; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class LiveMessage:
    """One decoded message of the live results stream."""

    topic: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    """name -> read-only array (views on the received buffers)."""

    @property
    def data(self) -> dict[str, Any]:
        return self.header.get("data", {})

    @property
    def pub_seq(self) -> int:
        return int(self.header["pub_seq"])

    @property
    def run_id(self) -> str | None:
        return self.header.get("run_id")

    @property
    def scan(self) -> int | None:
        return self.header.get("scan")


def _plain(x: Any) -> Any:
    """numpy scalars / arrays / tuples -> msgpack-able Python objects (NaN stays float)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def encode_live(topic: str, pub_seq: int, data: Mapping[str, Any] | None = None, arrays: Mapping[str, np.ndarray] | None = None,
                *, run_id: str | None = None, scan: int | None = None, seq: int | None = None,
                sent_time: float | None = None) -> list[bytes | memoryview]:
    """Parts of one live-stream message (topic, header, raw array buffers).

    Arrays are converted to little-endian and C order when they are not already (a copy
    only in that case); bool arrays travel as ``|b1``.
    """
    if topic not in TOPICS:
        raise ValueError(f"unknown live topic {topic!r} (known: {', '.join(TOPICS)})")
    specs, buffers = [], []
    for name, arr in (arrays or {}).items():
        a = np.asarray(arr)
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
            a = a.astype(a.dtype.newbyteorder("<"))
        a = np.ascontiguousarray(a)
        dt = a.dtype.str
        if dt not in _ALLOWED_DTYPES:
            raise ValueError(f"array {name!r}: dtype {a.dtype} cannot be published")
        specs.append({"name": str(name), "dtype": dt, "shape": [int(s) for s in a.shape]})
        buffers.append(memoryview(a).cast("B") if a.size else b"")
    header = {
        "protocol": PROTOCOL, "version": VERSION, "topic": topic, "pub_seq": int(pub_seq),
        "time": time.time() if sent_time is None else float(sent_time),
        "run_id": run_id, "scan": None if scan is None else int(scan), "seq": None if seq is None else int(seq),
        "arrays": specs, "data": _plain(dict(data or {})),
    }
    return [topic.encode("ascii"), msgpack.packb(header, use_bin_type=True), *buffers]


def decode_live(parts: Sequence[Any]) -> LiveMessage:
    """One received multipart message (bytes, memoryviews or zmq.Frame objects) -> LiveMessage.

    Raises:
        LiveProtocolError: wrong part count, not msgpack, unknown protocol / version / topic,
            bad array specs, or a buffer whose size does not match its spec.
    """
    bufs = [p.buffer if hasattr(p, "buffer") else p for p in parts]
    if len(bufs) < 2:
        raise LiveProtocolError(f"expected at least 2 parts (topic, header), got {len(bufs)}")
    try:
        topic = bytes(bufs[0]).decode("ascii")
    except UnicodeDecodeError:
        raise LiveProtocolError("topic (part 0) is not ASCII") from None
    if topic not in TOPICS:
        raise LiveProtocolError(f"unknown topic {topic!r} (known: {', '.join(TOPICS)})")
    try:
        header = msgpack.unpackb(bufs[1], raw=False)
    except Exception as exc:
        raise LiveProtocolError(f"header (part 1) is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise LiveProtocolError(f"header must be a map, got {type(header).__name__}")
    if header.get("protocol") != PROTOCOL:
        raise LiveProtocolError(f"protocol {header.get('protocol')!r} is not {PROTOCOL!r}")
    if header.get("version") != VERSION:
        raise LiveProtocolError(f"version {header.get('version')!r} is not supported (this reader knows {VERSION})")
    if header.get("topic") != topic:
        raise LiveProtocolError(f"header topic {header.get('topic')!r} does not match part 0 {topic!r}")
    if not isinstance(header.get("pub_seq"), int):
        raise LiveProtocolError("pub_seq missing or not an integer")
    specs = header.get("arrays")
    if not isinstance(specs, list):
        raise LiveProtocolError("arrays missing or not a list")
    if len(specs) != len(bufs) - 2:
        raise LiveProtocolError(f"header lists {len(specs)} array(s) but {len(bufs) - 2} buffer part(s) follow")
    arrays: dict[str, np.ndarray] = {}
    for spec, buf in zip(specs, bufs[2:]):
        try:
            name, dt, shape = str(spec["name"]), str(spec["dtype"]), tuple(int(s) for s in spec["shape"])
        except (KeyError, TypeError, ValueError):
            raise LiveProtocolError(f"bad array spec {spec!r} (needs name, dtype, shape)") from None
        if dt not in _ALLOWED_DTYPES:
            raise LiveProtocolError(f"array {name!r}: dtype {dt!r} not allowed")
        if any(s < 0 or s > _MAX_ARRAY_BYTES for s in shape):
            raise LiveProtocolError(f"array {name!r}: shape {shape} has a negative or impossibly large dimension")
        dtype = np.dtype(dt)
        n = dtype.itemsize * math.prod(shape)  # Python ints: no int64 wrap-around
        if n > _MAX_ARRAY_BYTES:
            raise LiveProtocolError(f"array {name!r}: {n} bytes is too large")
        mv = memoryview(buf)
        if mv.nbytes != n:
            raise LiveProtocolError(f"array {name!r}: {mv.nbytes} bytes, expected {n} for {dt} {list(shape)}")
        arrays[name] = np.frombuffer(mv, dtype=dtype).reshape(shape) if n else np.zeros(shape, dtype)
    if not isinstance(header.get("data", {}), dict):
        raise LiveProtocolError("data must be a map")
    return LiveMessage(topic, header, arrays)
