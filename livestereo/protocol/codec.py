"""Encode and decode livestereo stream v1 multipart messages (msgpack header + raw parts).

Wire format (also in README.md, "Stream protocol v1"):

- part 0: a msgpack map with a ``"type"`` key: ``"start"``, ``"frames"`` or ``"end"``;
- ``frames`` messages carry exactly one more part: ``count`` frames back to back, C order,
  little-endian ``dtype``, each of ``shape``.

Decoding never copies pixel data: the array returned is a read-only view on the buffer it
was given (a ``zmq.Frame.buffer``, a memoryview of a recording, bytes ...).
"""

from __future__ import annotations

from typing import Sequence

import msgpack
import numpy as np
from pydantic import ValidationError

from livestereo.protocol.messages import (
    FRAME_DTYPES,
    EndMessage,
    FramesMessage,
    Message,
    StartMessage,
)

Buffer = bytes | bytearray | memoryview

_FRAMES_FIELDS = {"run_id": str, "seq": int, "scan": int, "first": int, "count": int, "dtype": str, "shape": list}
_END_FIELDS = {"run_id": str, "frames_sent": int, "reason": str}
_LE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in FRAME_DTYPES}


class ProtocolError(ValueError):
    """A message that breaks the protocol. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode_start(start: StartMessage) -> list[bytes]:
    """Parts of a start message."""
    return [msgpack.packb(start.model_dump(mode="json"), use_bin_type=True)]


def encode_frames_header(run_id: str, seq: int, scan: int, first: int, count: int, dtype: str, shape: Sequence[int]) -> bytes:
    """Part 0 of a frames message."""
    return msgpack.packb(
        {"type": "frames", "run_id": run_id, "seq": int(seq), "scan": int(scan), "first": int(first),
         "count": int(count), "dtype": str(dtype), "shape": [int(s) for s in shape]},
        use_bin_type=True,
    )


def iter_frames_parts(start: StartMessage, scans, frames_per_message: int | None = None):
    """(scan, count, parts) of every frames message carrying ``scans``.

    scans: (scan number, [(first flat index, frames (count, *item_shape)), ...]) pairs.
    Frames are re-batched to ``frames_per_message`` (None: as given); seq runs 0, 1, 2, ...
    Part 1 is the frames' own memory where they are contiguous.
    """
    seq = 0
    for scan, chunks in scans:
        for first, frames in chunks:
            step = frames_per_message or len(frames)
            for i in range(0, len(frames), step):
                batch = np.ascontiguousarray(frames[i:i + step])
                header = encode_frames_header(start.run_id, seq, scan, first + i, len(batch), start.dtype, start.item_shape)
                yield scan, len(batch), [header, memoryview(batch).cast("B")]
                seq += 1


def encode_frames(msg: FramesMessage) -> list[Buffer]:
    """Parts of a frames message; part 1 is the array's own memory when it is contiguous."""
    data = np.ascontiguousarray(msg.data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    header = encode_frames_header(msg.run_id, msg.seq, msg.scan, msg.first, data.shape[0], data.dtype.name, data.shape[1:])
    return [header, memoryview(data).cast("B")]


def encode_end(end: EndMessage) -> list[bytes]:
    """Parts of an end message."""
    return [msgpack.packb({"type": "end", "run_id": end.run_id, "frames_sent": int(end.frames_sent), "reason": end.reason}, use_bin_type=True)]


def encode(msg: Message) -> list[Buffer]:
    """Parts of any message."""
    if isinstance(msg, StartMessage):
        return encode_start(msg)
    if isinstance(msg, FramesMessage):
        return encode_frames(msg)
    if isinstance(msg, EndMessage):
        return encode_end(msg)
    raise TypeError(f"not a livestereo message: {type(msg).__name__}")


def decode_header(part0: Buffer) -> dict:
    """The msgpack map of part 0, or ProtocolError('not_msgpack' / 'bad_header')."""
    try:
        header = msgpack.unpackb(part0, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("not_msgpack", f"part 0 is not a msgpack map ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", f"part 0 is a msgpack {type(header).__name__}, not a map")
    return header


def _check_fields(header: dict, fields: dict, kind: str) -> None:
    for name, typ in fields.items():
        if name not in header:
            raise ProtocolError("missing_field", f"{kind} message has no '{name}'")
        value = header[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ProtocolError(
                "bad_field", f"{kind} message field '{name}' should be {typ.__name__}, got {type(value).__name__} {value!r:.60}"
            )


def decode(parts: Sequence[Buffer]) -> Message:
    """Decode one multipart message. Raises ProtocolError naming what is wrong."""
    if len(parts) == 0:
        raise ProtocolError("empty", "message has no parts")
    header = decode_header(parts[0])
    kind = header.get("type")
    if kind == "frames":
        return decode_frames(header, parts)
    if kind == "start":
        if len(parts) != 1:
            raise ProtocolError("bad_parts", f"start message has {len(parts)} parts, expected 1")
        version = header.get("version")
        if version != 1:
            raise ProtocolError("bad_version", f"protocol version {version!r} is not supported (this daemon speaks 1)")
        try:
            return StartMessage.model_validate(header)
        except ValidationError as exc:
            raise ProtocolError("bad_start", format_validation_error(exc, "start message")) from None
    if kind == "end":
        _check_fields(header, _END_FIELDS, "end")
        if header["reason"] not in ("complete", "aborted"):
            raise ProtocolError("bad_field", f"end message reason {header['reason']!r} is not 'complete' or 'aborted'")
        return EndMessage(header["run_id"], header["frames_sent"], header["reason"])
    raise ProtocolError("unknown_type", f"unknown message type {kind!r}")


def decode_frames(header: dict, parts: Sequence[Buffer]) -> FramesMessage:
    """Decode a frames message whose header is already unpacked."""
    # Fast path for well-formed headers (this runs per message at tens of kHz); anything
    # unusual goes through the field-by-field checks that name the problem.
    try:
        run_id, seq, scan, first, count = header["run_id"], header["seq"], header["scan"], header["first"], header["count"]
        dtype, shape = _LE_DTYPES[header["dtype"]], header["shape"]
        ok = (type(run_id) is str and type(seq) is int and type(scan) is int and type(first) is int
              and type(count) is int and type(shape) is list and count >= 1 and first >= 0 and seq >= 0 and scan >= 0
              and len(parts) == 2)
        if ok:
            expected = count * dtype.itemsize
            if len(shape) == 2:
                ny, nx = shape
                ok = type(ny) is int and type(nx) is int and ny > 0 and nx > 0
                expected *= ny * nx
            elif len(shape) == 1:
                (nseg,) = shape
                ok = type(nseg) is int and nseg > 0
                expected *= nseg
            else:
                ok = False
    except (KeyError, TypeError):
        ok = False
    if not ok:
        _diagnose_frames(header, parts)
        raise ProtocolError("bad_field", f"malformed frames header {header!r:.200}")  # pragma: no cover
    payload = parts[1]
    nbytes = payload.nbytes if type(payload) is memoryview else memoryview(payload).nbytes
    if nbytes != expected:
        raise ProtocolError(
            "bad_payload",
            f"frames payload is {nbytes} bytes but count x shape x dtype = {count} x {tuple(shape)} x {dtype.name} = {expected}",
        )
    data = np.frombuffer(payload, dtype=dtype).reshape(count, *shape)
    return FramesMessage(run_id, seq, scan, first, data)


def _diagnose_frames(header: dict, parts: Sequence[Buffer]) -> None:
    """Raise the ProtocolError that names what is wrong with a frames message."""
    _check_fields(header, _FRAMES_FIELDS, "frames")
    if len(parts) != 2:
        raise ProtocolError("bad_parts", f"frames message has {len(parts)} parts, expected 2 (header, data)")
    if header["dtype"] not in _LE_DTYPES:
        raise ProtocolError("bad_field", f"frames dtype {header['dtype']!r} is not one of {', '.join(FRAME_DTYPES)}")
    shape = header["shape"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape) or not 1 <= len(shape) <= 2:
        raise ProtocolError("bad_field", f"frames shape {shape!r} must be 1 or 2 positive integers")
    if header["count"] < 1 or header["first"] < 0 or header["seq"] < 0 or header["scan"] < 0:
        raise ProtocolError("bad_field", "frames count must be >= 1 and first, seq, scan >= 0")


def format_validation_error(exc: ValidationError, what: str) -> str:
    """One line per problem: 'what: field.path: message (got value)'."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        got_s = f" (got {got!r:.60})" if err["type"] not in ("missing",) else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"{what}: unknown key '{loc}'")
        else:
            lines.append(f"{what}: {loc}: {err['msg']}{got_s}")
    return "; ".join(lines)
