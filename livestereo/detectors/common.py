"""Pieces every detector adapter shares: turning a detector's frames into livestereo
start / frames / end messages, pixel masks, and the Received items a Source hands out.

No sockets here: the Merlin, DECTRIS and file sources all build on this.
"""

from __future__ import annotations

import collections
import re
import sys
import time
from typing import Any, Iterable, Iterator

import numpy as np

from livestereo.protocol.codec import ProtocolError
from livestereo.protocol.messages import (
    FRAME_DTYPES,
    Calibration,
    EndMessage,
    FramesMessage,
    StartMessage,
)
from livestereo.protocol.source import Received

PLACEHOLDER_CALIBRATION = Calibration(convergence_semiangle_mrad=10.0, scan_step_nm=1.0)
"""Used when the caller gives no calibration: detectors do not know the probe's
convergence angle or the scan step. The start message then says
``metadata["calibration_placeholder"] = True`` so the daemon can warn."""


def sanitize_run_id(text: str) -> str:
    """A run id made of safe characters (letters, digits, - _ . :), at most 200 long."""
    s = re.sub(r"[^A-Za-z0-9_.:-]+", "-", str(text)).strip("-")
    return (s or "run")[:200]


def time_run_id(prefix: str, when: float | None = None) -> str:
    """``prefix-YYYYmmddTHHMMSS.mmm`` (UTC)."""
    when = time.time() if when is None else when
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f".{int((when % 1) * 1000):03d}"
    return sanitize_run_id(f"{prefix}-{stamp}")


def as_frame_dtype(dtype) -> np.dtype:
    """The little-endian livestereo dtype frames of ``dtype`` travel as; ValueError if none fits."""
    dt = np.dtype(dtype)
    name = dt.newbyteorder("=").name if dt.byteorder not in ("|", "=") else dt.name
    if name in FRAME_DTYPES:
        return np.dtype(name).newbyteorder("<")
    widen = {"bool": "uint8", "int8": "int16", "float16": "float32", "float64": "float32"}
    if name in widen:
        return np.dtype(widen[name]).newbyteorder("<")
    raise ValueError(f"pixel dtype {dt} has no livestereo equivalent (supported: {', '.join(FRAME_DTYPES)})")


def to_wire(frames: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``frames`` as a C-contiguous little-endian array of ``dtype`` (one vectorised op;
    no copy when it already is one)."""
    if frames.dtype == dtype and frames.flags.c_contiguous:
        return frames
    return np.ascontiguousarray(frames, dtype=dtype)


class PixelMask:
    """Pixels to zero in every emitted frame (DECTRIS pixel_mask, Merlin hot pixels)."""

    def __init__(self, frame_shape: tuple[int, int], masked: np.ndarray | None = None,
                 pixels: Iterable[tuple[int, int]] = ()):
        bad = np.zeros(frame_shape, dtype=bool)
        if masked is not None:
            masked = np.asarray(masked)
            if masked.shape != tuple(frame_shape):
                raise ValueError(f"pixel mask shape {masked.shape} does not match frame shape {tuple(frame_shape)}")
            bad |= masked.astype(bool)
        for r, c in pixels:
            if 0 <= r < frame_shape[0] and 0 <= c < frame_shape[1]:
                bad[int(r), int(c)] = True
        self.shape = tuple(frame_shape)
        self.flat_index = np.flatnonzero(bad)
        self.count = int(self.flat_index.size)
        self._rc: tuple[np.ndarray, np.ndarray] | None = None

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Zero the masked pixels in place (frames: (count, rows, cols), writeable, any
        strides or byte order) and return frames."""
        if self.count:
            if self._rc is None:
                self._rc = np.unravel_index(self.flat_index, self.shape)
            frames[:, self._rc[0], self._rc[1]] = 0
        return frames


class BatchPool:
    """Reusable frame batches for a source that decodes into arrays of its own.

    A batch is handed out again only when nothing else holds it or a view of it (numpy
    views keep their base alive, so its reference count says so): a consumer that keeps
    frames (a recorder queue, a test) never sees them overwritten, it only makes the pool
    allocate. Reused batches are memory already mapped and warm; a fresh ``np.empty`` of a
    few MB per batch costs a page fault per 4 KiB touched (~25 us per 128 KiB frame).
    """

    def __init__(self, max_batches: int = 4):
        self.max_batches = max(1, int(max_batches))
        self._batches: list[np.ndarray] = []
        self.allocated = 0

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        for i in range(len(self._batches)):
            # references: the list, ``a`` and getrefcount's argument; any more is a user
            a = self._batches[i]
            if a.shape == shape and a.dtype == dtype and sys.getrefcount(a) == 3:
                return a
            del a
        a = np.empty(shape, dtype=dtype)
        self.allocated += 1
        self._batches.append(a)
        del self._batches[:-self.max_batches]  # the oldest is left to whoever still holds it
        return a


class RunBuilder:
    """One detector run: its start message, frames messages split at scan boundaries,
    and its end message.

    ``index`` given to :meth:`frames` is the frame's position in the acquisition (0, 1, ...);
    scan = index // n_positions, first = index % n_positions.
    """

    def __init__(self, *, run_id: str, scan_shape: tuple[int, int], frame_shape: tuple[int, int], dtype: str,
                 calibration: Calibration | None, metadata: dict[str, Any] | None = None, repeat: int = 1,
                 disc_center_hint: tuple[float, float] | None = None):
        md = dict(metadata or {})
        if calibration is None:
            calibration = PLACEHOLDER_CALIBRATION
            md["calibration_placeholder"] = True
        if disc_center_hint is not None and calibration.disc_center_px is None:
            calibration = calibration.model_copy(update={"disc_center_px": (float(disc_center_hint[0]), float(disc_center_hint[1]))})
            md["disc_center_from_detector"] = True
        self.start = StartMessage(
            version=1, run_id=sanitize_run_id(run_id), detector="pixelated", scan_shape=tuple(int(s) for s in scan_shape),
            frame_shape=tuple(int(s) for s in frame_shape), dtype=dtype, repeat=int(repeat), calibration=calibration,
            metadata=_jsonable(md),
        )
        self.run_id = self.start.run_id
        self.n_positions = self.start.n_positions
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.seq = 0
        self.frames_sent = 0
        self.next_index = 0
        self.ended = False

    @property
    def expected_frames(self) -> int | None:
        """Frames of the whole series, None when it runs until stopped."""
        return None if self.start.repeat == 0 else self.start.repeat * self.n_positions

    @property
    def complete(self) -> bool:
        exp = self.expected_frames
        return exp is not None and self.next_index >= exp

    def frames(self, data: np.ndarray, index: int | None = None, *, keep_byte_order: bool = False) -> list[FramesMessage]:
        """Frames messages for ``data`` (count, h, w) starting at acquisition index ``index``
        (default: right after the previous frames). Split at scan boundaries.

        keep_byte_order: frames of the run's dtype in big-endian byte order, with each
        frame's pixels contiguous, travel as they are (views of a receive buffer: the
        accumulator reads them in place) instead of as a little-endian copy."""
        if index is None:
            index = self.next_index
        if not (keep_byte_order and data.dtype.byteorder == ">" and data.dtype.newbyteorder("<") == self.dtype):
            data = to_wire(data, self.dtype)
        out: list[FramesMessage] = []
        i = 0
        n = data.shape[0]
        exp = self.expected_frames
        if exp is not None:
            n = min(n, max(0, exp - index))
        while i < n:
            scan, first = divmod(index + i, self.n_positions)
            k = min(n - i, self.n_positions - first)
            out.append(FramesMessage(self.run_id, self.seq, scan, first, data[i:i + k]))
            self.seq += 1
            i += k
        self.frames_sent += n
        self.next_index = index + n
        return out

    def end(self, reason: str | None = None) -> EndMessage:
        """The end message; reason defaults to complete when every expected frame came."""
        self.ended = True
        if reason is None:
            exp = self.expected_frames
            reason = "complete" if exp is not None and self.frames_sent >= exp else "aborted"
        return EndMessage(self.run_id, self.frames_sent, reason)  # type: ignore[arg-type]


def _jsonable(obj):
    """Metadata values msgpack can carry."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.size <= 64 else f"<array {obj.shape} {obj.dtype}>"
    if isinstance(obj, bytes):
        return obj.decode("latin1")
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def ok(message, nbytes: int = 0) -> Received:
    """A Received carrying a message."""
    if nbytes == 0 and isinstance(message, FramesMessage):
        nbytes = message.data.nbytes
    return Received(message=message, error=None, parts=None, recv_time=time.time(), nbytes=nbytes)


def bad(reason: str, detail: str, nbytes: int = 0) -> Received:
    """A Received carrying a ProtocolError."""
    return Received(message=None, error=ProtocolError(reason, detail), parts=None, recv_time=time.time(), nbytes=nbytes)


class IteratorSource:
    """A finite Source fed by an iterator of Received items (files)."""

    def __init__(self, name: str, items: Iterator[Received], on_close=None):
        self.name = name
        self._items = items
        self._on_close = on_close
        self._pending: collections.deque[Received] = collections.deque()
        self._done = False

    def receive(self, timeout_s: float) -> Received | None:
        if self._pending:
            return self._pending.popleft()
        if self._done:
            raise EOFError(f"{self.name}: no more data")
        try:
            return next(self._items)
        except StopIteration:
            self._done = True
            raise EOFError(f"{self.name}: no more data") from None

    def close(self) -> None:
        self._done = True
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        """All items until EOF (tests, tools)."""
        while True:
            try:
                item = self.receive(0.0)
            except EOFError:
                return
            if item is not None:
                yield item
