"""livestereo recording files: an append-only, crash-safe, checksummed log of multipart messages.

A recording keeps every multipart ZeroMQ message exactly as it arrived (all parts, byte for
byte, bad messages included) with the time it was received. Replay re-emits them; export
turns them into an HDF5 4D array. This module is pure (no sockets): the socket sides live in
``livestereo.transport.record`` and ``livestereo.transport.replay``.

File format (livestereo recording v1)
-------------------------------------
All integers are unsigned little-endian, all floats IEEE-754 binary64 little-endian.
Offsets are in bytes from the start of the file.

File header (32 bytes, at offset 0)::

    offset  size  field
    0       8     magic           b"LSREC\\x00v1"
    8       4     format version  uint32, 1
    12      4     header size     uint32, 32: the first record starts at this offset
    16      8     created         float64, seconds since the Unix epoch (UTC)
    24      8     reserved        zero

Then records, back to back, until the end of the file. One record per multipart message::

    offset     size   field
    0          4      record magic    b"LSR1"
    4          4      n_parts         uint32, number of message parts (n)
    8          8      recv_time       float64, receive time, seconds since the Unix epoch
    16         8*n    part lengths    uint64 each: the exact byte length of part i
    16+8n      ...    payload         part 0, part 1, ... each followed by 0-7 zero bytes so
                                      that the next part (and the checksum) starts at a
                                      multiple of 8 bytes from the record start
    end-8      8      checksum        uint64, xxh3_64 (seed 0) of every byte of the record
                                      before it: record header, parts and padding

The file header and every record header are a multiple of 8 bytes long, so every part starts
8-byte aligned in the file (and in a memory map of it): frames can be viewed as numpy
arrays in place. Record size = 16 + 8n + sum(ceil8(len_i)) + 8 bytes.

Crash safety: the writer only ever appends. A file cut anywhere (a crash, a full disk, a
copy still in progress) replays every complete record before the cut; the reader stops at
the first record that is incomplete or does not verify, and says where and why
(``stop_offset``, ``stop_reason``) instead of raising:

- ``"end of file"``: every byte belongs to a complete, verified record;
- ``"truncated file header at byte 0 ..."``: the file is shorter than its 32-byte header;
- ``"truncated record header at byte N ..."``: the file ends inside the record header;
- ``"truncated payload at byte N ..."``: the file ends inside the parts;
- ``"truncated checksum at byte N ..."``: the file ends inside the checksum;
- ``"checksum mismatch at byte N ..."``: the record is complete but its bytes changed;
- ``"bad record magic at byte N ..."`` / ``"bad record header at byte N ..."``: garbage where a
  record should start (e.g. zeros left by a torn write).

N is always the offset of the record that could not be read (= ``stop_offset``); everything
before it is good. ``RecordingWriter(path, append=True)`` cuts such a tail off and continues.

Durability: small records are gathered in a 1 MiB user-space buffer and written with one
system call; records of 64 KiB or more go straight to the file with one ``writev``. With
``fsync_every_s`` set, a background thread writes the buffer out and ``fsync``s the file at
least that often, so a crash of the process or of the machine loses at most about that many
seconds of data, and never corrupts what was already written.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import xxhash

from livestereo.protocol.codec import ProtocolError, decode_header

__all__ = [
    "FILE_MAGIC", "FORMAT_VERSION", "FILE_HEADER_SIZE", "RECORD_MAGIC",
    "RecordingError", "RecordingWriter", "RecordingReader", "Record", "RecordingSummary",
    "scan_recording", "record_size",
]

FILE_MAGIC = b"LSREC\x00v1"
FORMAT_VERSION = 1
FILE_HEADER_SIZE = 32
RECORD_MAGIC = b"LSR1"

_FILE_HEADER = struct.Struct("<8sIIdQ")
_RECORD_HEAD = struct.Struct("<4sId")  # magic, n_parts, recv_time: 16 bytes
_CHECKSUM = struct.Struct("<Q")
assert _FILE_HEADER.size == FILE_HEADER_SIZE and _RECORD_HEAD.size == 16

#: More parts than this in one record is treated as a corrupt header (zmq messages have a few).
MAX_PARTS = 1 << 20
#: Records at least this large bypass the user-space buffer (one writev, no copy).
DIRECT_WRITE_BYTES = 64 * 1024
#: Size of the user-space buffer for small records (bytes).
BUFFER_BYTES = 1 << 20
try:
    _IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16
_ZEROS = bytes(8)


class RecordingError(ValueError):
    """A file that is not a livestereo recording, or one this reader cannot read."""


def _pad(n: int) -> int:
    """Zero bytes after a part of n bytes (0-7) so that the next item is 8-byte aligned."""
    return -n & 7


def record_size(part_lengths: Sequence[int]) -> int:
    """Bytes one record with parts of these lengths takes in a file."""
    return 16 + 8 * len(part_lengths) + sum(n + _pad(n) for n in part_lengths) + 8


def _as_bytes_view(part) -> memoryview:
    """A flat unsigned-byte view of a buffer (copied only if it is not C-contiguous)."""
    mv = part if isinstance(part, memoryview) else memoryview(part)
    if mv.ndim == 1 and mv.format in ("B", "b", "c") and mv.c_contiguous:
        return mv if mv.format == "B" else mv.cast("B")
    if mv.c_contiguous:
        try:
            return mv.cast("B")
        except (TypeError, ValueError):  # e.g. numpy's '<H' formats: cast via numpy, no copy
            import numpy as np

            return memoryview(np.asarray(mv).reshape(-1).view(np.uint8))
    return memoryview(mv.tobytes())


def _pack_file_header(created: float) -> bytes:
    return _FILE_HEADER.pack(FILE_MAGIC, FORMAT_VERSION, FILE_HEADER_SIZE, created, 0)


def _check_file_header(path: Path, head: bytes) -> int | None:
    """Header size (the first record's offset), None when the file is shorter than a header.

    Raises RecordingError naming the file when the bytes are not a livestereo recording header.
    """
    if len(head) < FILE_HEADER_SIZE:
        if FILE_MAGIC.startswith(head[: len(FILE_MAGIC)]):
            return None
        raise RecordingError(
            f"{path}: not a livestereo recording (starts with {head[:8]!r}, expected {FILE_MAGIC!r})"
        )
    magic, version, header_size, _created, _reserved = _FILE_HEADER.unpack_from(head)
    if magic != FILE_MAGIC:
        raise RecordingError(f"{path}: not a livestereo recording (starts with {magic!r}, expected {FILE_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise RecordingError(
            f"{path}: livestereo recording format version {version} is not supported (this reader reads {FORMAT_VERSION})"
        )
    if header_size < FILE_HEADER_SIZE or header_size % 8:
        raise RecordingError(f"{path}: corrupt livestereo recording header (header size {header_size} bytes)")
    return header_size


# --------------------------------------------------------------------------------------------
# writer


class RecordingWriter:
    """Appends multipart messages to a livestereo recording file (format: module docstring).

    ``path``: file to create. An existing non-empty file is refused (FileExistsError) unless
    ``append=True`` (keep its complete records, cut off a torn tail, continue after them) or
    ``overwrite=True`` (start it afresh).

    ``fsync_every_s``: seconds (> 0) between background flushes + ``fsync`` of the file; the
    bound on how much a crash can lose. None: no background thread and no fsync; buffered small
    records reach the operating system when the 1 MiB buffer fills, on ``flush()`` and on
    ``close()``.

    Thread-safe: ``write`` may be called from several threads (records are never interleaved).
    Attributes: ``records_written``, ``bytes_written`` (bytes of records written by this writer,
    headers, padding and checksums included), ``path``, ``start_offset`` (where this writer's
    first record went), ``discarded_tail`` (bytes of a torn tail cut off by ``append=True``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fsync_every_s: float | None = 1.0,
        append: bool = False,
        overwrite: bool = False,
    ):
        if append and overwrite:
            raise ValueError("RecordingWriter: append and overwrite exclude each other")
        if fsync_every_s is not None and not fsync_every_s > 0:
            raise ValueError(f"RecordingWriter: fsync_every_s must be > 0 seconds or None, got {fsync_every_s!r}")
        self.path = Path(path)
        self.fsync_every_s = fsync_every_s
        self.records_written = 0
        self.bytes_written = 0
        self.discarded_tail = 0
        self.discard_reason = ""
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._dirty = False  # written to the OS since the last fsync
        self._closed = False
        self._fd = -1
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()

        size = self.path.stat().st_size if self.path.exists() else None
        if size and not (append or overwrite):
            raise FileExistsError(
                f"{self.path}: recording already exists ({size} bytes); pass append=True to continue it "
                "or overwrite=True to replace it"
            )
        try:
            if size is None:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            elif overwrite or size == 0:
                fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
            else:
                fd = -1
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create recording: {exc.strerror}", str(self.path)) from None

        if fd >= 0:
            self._fd = fd
            self._write_all([_pack_file_header(time.time())], FILE_HEADER_SIZE)
            self.start_offset = FILE_HEADER_SIZE
        else:  # append to an existing recording: keep its valid prefix
            with RecordingReader(self.path) as reader:
                for _ in reader:
                    pass
                end, reason = reader.stop_offset, reader.stop_reason
            self._fd = os.open(self.path, os.O_WRONLY)
            if end < FILE_HEADER_SIZE:  # truncated file header: start afresh
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)
                self._write_all([_pack_file_header(time.time())], FILE_HEADER_SIZE)
                end = FILE_HEADER_SIZE
            elif end < size:
                self.discarded_tail = size - end
                self.discard_reason = reason
                os.ftruncate(self._fd, end)
            os.lseek(self._fd, end, os.SEEK_SET)
            self.start_offset = end
        if fsync_every_s is not None:
            os.fsync(self._fd)
            self._flusher = threading.Thread(target=self._flush_loop, name=f"recording-flush {self.path.name}", daemon=True)
            self._flusher.start()

    # -- writing -------------------------------------------------------------------------

    def write(self, parts: Sequence[bytes | bytearray | memoryview], recv_time: float) -> int:
        """Append one record: the message ``parts`` received at ``recv_time`` (s since epoch).

        Parts may be anything with the buffer protocol (bytes, memoryview, zmq.Frame, numpy
        arrays); they are not kept after the call returns. Returns the bytes the record takes
        in the file (headers, padding and checksum included).
        """
        n = len(parts)
        if n > MAX_PARTS:
            raise ValueError(f"{self.path}: a record holds at most {MAX_PARTS} parts, got {n}")
        views = []
        lengths = []
        for p in parts:
            v = p if type(p) is bytes else _as_bytes_view(p)
            views.append(v)
            lengths.append(len(v))  # len == nbytes for bytes and flat 'B' views
        header = _RECORD_HEAD.pack(RECORD_MAGIC, n, recv_time) + struct.pack(f"<{n}Q", *lengths)
        h = xxhash.xxh3_64(header)
        pieces: list = [header]
        total = len(header) + 8
        for v, ln in zip(views, lengths):
            h.update(v)
            pieces.append(v)
            pad = -ln & 7
            total += ln + pad
            if pad:
                pad_bytes = _ZEROS[:pad]
                h.update(pad_bytes)
                pieces.append(pad_bytes)
        pieces.append(_CHECKSUM.pack(h.intdigest()))
        with self._lock:
            if self._closed:
                raise ValueError(f"{self.path}: write to a closed recording")
            if total >= DIRECT_WRITE_BYTES and len(pieces) < _IOV_MAX:
                if self._buf:
                    pieces.insert(0, self._buf)
                    total_out = total + len(self._buf)
                    self._buf = bytearray()
                else:
                    total_out = total
                self._write_all(pieces, total_out)
            else:
                buf = self._buf
                for p in pieces:
                    buf += p
                if len(buf) >= BUFFER_BYTES:
                    self._buf = bytearray()
                    self._write_all([buf], len(buf))
            self.records_written += 1
            self.bytes_written += total
        return total

    def _write_all(self, pieces: list, nbytes: int) -> None:
        """writev all nbytes of pieces (retrying partial writes); OSError names the file."""
        try:
            written = os.writev(self._fd, pieces)
            if written != nbytes:
                views = [memoryview(p).cast("B") for p in pieces]
                while True:
                    while views and written >= views[0].nbytes:
                        written -= views[0].nbytes
                        views.pop(0)
                    if not views:
                        break
                    if written:
                        views[0] = views[0][written:]
                    written = os.writev(self._fd, views)
        except OSError as exc:
            raise OSError(exc.errno, f"writing recording failed: {exc.strerror}", str(self.path)) from None
        self._dirty = True

    def flush(self, fsync: bool = False) -> None:
        """Hand buffered records to the operating system; with ``fsync``, also to the disk."""
        with self._lock:
            if self._closed:
                return
            if self._buf:
                buf, self._buf = self._buf, bytearray()
                self._write_all([buf], len(buf))
            fd = self._fd
        if fsync and self._dirty:
            self._dirty = False
            os.fsync(fd)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.fsync_every_s):
            try:
                self.flush(fsync=True)
            except (OSError, ValueError):  # reported by the next write / close
                return

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Write out buffered records, fsync (unless ``fsync_every_s`` is None) and close."""
        if self._closed:
            return
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            self.flush(fsync=self.fsync_every_s is not None)
        finally:
            with self._lock:
                self._closed = True
                os.close(self._fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True) and getattr(self, "_fd", -1) >= 0:
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"RecordingWriter({str(self.path)!r}, records_written={self.records_written}, bytes_written={self.bytes_written})"


# --------------------------------------------------------------------------------------------
# reader


@dataclasses.dataclass(slots=True)
class Record:
    """One recorded message: its parts (read-only views of the file's memory map), the time
    it was received (s since epoch) and the byte offset of its record in the file."""

    parts: list[memoryview]
    recv_time: float
    offset: int

    @property
    def nbytes(self) -> int:
        """Bytes of message payload (the sum of the part lengths)."""
        return sum(p.nbytes for p in self.parts)


class RecordingReader:
    """Reads a livestereo recording (format: module docstring) through a read-only memory map.

    Iterating yields ``Record`` objects whose parts are zero-copy, read-only, 8-byte aligned
    memoryviews into the file; they stay valid while referenced (the map is released when the
    last view goes away). Iteration stops, without raising, at the end of the file or at the
    first record that is truncated or fails its checksum; afterwards ``stop_offset`` (bytes)
    and ``stop_reason`` say where and why (``"end of file"`` when the whole file is good),
    and ``n_records`` counts the records yielded. Each ``iter()`` starts again from the first
    record.

    ``verify``: check every record's xxh3_64 checksum (default; runs at memory speed).
    Raises RecordingError naming the file if it is missing or not a livestereo recording.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self.n_records = 0
        self.stop_offset = 0
        self.stop_reason = "not read yet"
        self._mm: mmap.mmap | None = None
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            raise RecordingError(f"{self.path}: no such recording file") from None
        except IsADirectoryError:
            raise RecordingError(f"{self.path}: is a directory, not a livestereo recording") from None
        with f:
            self.file_size = os.fstat(f.fileno()).st_size
            head = f.read(FILE_HEADER_SIZE)
            first = _check_file_header(self.path, head)
            if first is None or first > self.file_size:
                self._first = None
                self.stop_reason = (
                    f"truncated file header at byte 0 (the file has {self.file_size} of "
                    f"{first or FILE_HEADER_SIZE} header bytes)"
                )
                return
            self._first = first
            if self.file_size > 0:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                    try:
                        self._mm.madvise(mmap.MADV_SEQUENTIAL)
                    except OSError:
                        pass
        self.stop_offset = first

    @property
    def complete(self) -> bool:
        """True when the last iteration read the whole file without a problem."""
        return self.stop_reason == "end of file"

    def __iter__(self) -> Iterator[Record]:
        mm = self._mm
        if self._first is None:
            self.n_records = 0
            self.stop_offset = 0
            return
        if mm is None:
            raise ValueError(f"{self.path}: recording reader is closed")
        yield from self._records(memoryview(mm), len(mm))

    def _records(self, view: memoryview, size: int) -> Iterator[Record]:
        pos = self._first
        self.n_records = 0
        self.stop_offset = pos
        self.stop_reason = "reading"
        head_unpack = _RECORD_HEAD.unpack_from
        verify = self.verify
        structs: dict[int, struct.Struct] = {}
        xxh3 = xxhash.xxh3_64_intdigest
        while True:
            if pos == size:
                self.stop_reason = "end of file"
                return
            remaining = size - pos
            if remaining < 16:
                got = bytes(view[pos:size])
                if RECORD_MAGIC.startswith(got[:4]):
                    self.stop_reason = f"truncated record header at byte {pos} ({remaining} of at least 16 bytes present)"
                else:
                    self.stop_reason = f"bad record magic at byte {pos} (got {got[:4]!r}, expected {RECORD_MAGIC!r})"
                return
            magic, n, recv_time = head_unpack(view, pos)
            if magic != RECORD_MAGIC:
                self.stop_reason = f"bad record magic at byte {pos} (got {magic!r}, expected {RECORD_MAGIC!r})"
                return
            if n > MAX_PARTS:
                self.stop_reason = f"bad record header at byte {pos} (n_parts={n} > {MAX_PARTS})"
                return
            head_len = 16 + 8 * n
            if remaining < head_len:
                self.stop_reason = (
                    f"truncated record header at byte {pos} ({remaining} of {head_len} header bytes present)"
                )
                return
            st = structs.get(n)
            if st is None:
                st = structs[n] = struct.Struct(f"<{n}Q")
            lengths = st.unpack_from(view, pos + 16)
            body = head_len
            starts = []
            for ln in lengths:
                starts.append(pos + body)
                body += ln + (-ln & 7)
            if remaining < body:
                self.stop_reason = (
                    f"truncated payload at byte {pos} (the record needs {body + 8} bytes, "
                    f"the file ends {remaining} bytes after its start)"
                )
                return
            if remaining < body + 8:
                self.stop_reason = (
                    f"truncated checksum at byte {pos} ({remaining - body} of 8 checksum bytes present)"
                )
                return
            if verify:
                (stored,) = _CHECKSUM.unpack_from(view, pos + body)
                if xxh3(view[pos : pos + body]) != stored:
                    self.stop_reason = f"checksum mismatch at byte {pos} (record of {body + 8} bytes, {n} parts)"
                    return
            parts = [view[s : s + ln] for s, ln in zip(starts, lengths)]
            rec = Record(parts, recv_time, pos)
            pos += body + 8
            self.n_records += 1
            self.stop_offset = pos
            yield rec

    def close(self) -> None:
        """Release the memory map (views still referenced keep it alive until dropped)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # parts still referenced elsewhere (e.g. queued in zmq)
                pass

    def __enter__(self) -> "RecordingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RecordingReader({str(self.path)!r}, file_size={self.file_size})"


# --------------------------------------------------------------------------------------------
# summary


@dataclasses.dataclass
class RecordingSummary:
    """What a recording holds, from its records' part-0 headers (no pixel data decoded).

    Times are seconds since the epoch; sizes are bytes.
    """

    path: Path
    file_size: int
    n_records: int = 0
    payload_bytes: int = 0
    messages: Counter = dataclasses.field(default_factory=Counter)
    """Records per message type: "start", "frames", "end", or "bad" (part 0 is not a msgpack
    map), "unknown" (a map with an unknown or missing "type")."""
    runs: list[str] = dataclasses.field(default_factory=list)
    """Run ids in order of first appearance (start, frames or end)."""
    scans: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Per run: the scan numbers that frames messages carried, sorted."""
    frames: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per run: frames announced by frames headers (sum of their counts)."""
    end_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    """Per run that ended: the end message's reason ("complete" / "aborted")."""
    first_time: float | None = None
    last_time: float | None = None
    stop_offset: int = 0
    stop_reason: str = ""

    @property
    def complete(self) -> bool:
        """True when every byte of the file belongs to a complete, verified record."""
        return self.stop_reason == "end of file"

    @property
    def duration_s(self) -> float:
        """Receive time of the last record minus that of the first (s)."""
        if self.first_time is None or self.last_time is None:
            return 0.0
        return self.last_time - self.first_time

    @property
    def total_frames(self) -> int:
        return sum(self.frames.values())

    def __str__(self) -> str:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.messages.items())) or "no messages"
        lines = [
            f"{self.path}: {self.file_size} bytes, {self.n_records} records ({kinds}), "
            f"{self.payload_bytes} payload bytes over {self.duration_s:.3f} s",
        ]
        for run in self.runs:
            scans = self.scans.get(run, [])
            ended = self.end_reasons.get(run, "no end message")
            lines.append(
                f"  run {run!r}: {self.frames.get(run, 0)} frames in {len(scans)} scan(s) {_ranges(scans)}, end: {ended}"
            )
        lines.append(f"  stopped at byte {self.stop_offset}: {self.stop_reason}")
        return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    if not values:
        return "[]"
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return "[" + ", ".join(out) + "]"


def scan_recording(path: str | os.PathLike, *, verify: bool = True) -> RecordingSummary:
    """Summarise a recording: records and messages per type, runs, scans, frames, stop reason.

    Decodes only part 0 of each record (``livestereo.protocol.codec.decode_header``); never
    raises on bad messages or a truncated tail (they are counted / reported). Raises
    RecordingError naming the file if it is missing or not a recording.
    """
    with RecordingReader(path, verify=verify) as reader:
        s = RecordingSummary(path=reader.path, file_size=reader.file_size)
        scans: dict[str, set[int]] = {}
        for rec in reader:
            s.n_records += 1
            s.payload_bytes += rec.nbytes
            if s.first_time is None:
                s.first_time = rec.recv_time
            s.last_time = rec.recv_time
            if not rec.parts:
                s.messages["bad"] += 1
                continue
            try:
                header = decode_header(rec.parts[0])
            except ProtocolError:
                s.messages["bad"] += 1
                continue
            kind = header.get("type")
            if kind not in ("start", "frames", "end"):
                s.messages["unknown"] += 1
                continue
            s.messages[kind] += 1
            run = header.get("run_id")
            if not isinstance(run, str):
                continue
            if run not in scans:
                scans[run] = set()
                s.runs.append(run)
                s.frames[run] = 0
            if kind == "frames":
                scan, count = header.get("scan"), header.get("count")
                if isinstance(scan, int):
                    scans[run].add(scan)
                if isinstance(count, int) and count > 0:
                    s.frames[run] += count
            elif kind == "end":
                s.end_reasons[run] = str(header.get("reason"))
        s.scans = {run: sorted(v) for run, v in scans.items()}
        s.stop_offset, s.stop_reason = reader.stop_offset, reader.stop_reason
    return s
