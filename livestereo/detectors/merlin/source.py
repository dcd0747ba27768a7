"""A Quantum Detectors Merlin on TCP as a livestereo frame source.

The Merlin software serves frames on its data port (default 6342) as MPX messages (see
:mod:`livestereo.detectors.merlin.mib`): an acquisition header, then one message per frame.
Its control port (default 6341) takes ``MPX,<len>,GET|SET|CMD,...`` commands
(:class:`MerlinControl`): livestereo can read the parameters and arm it
(``CMD,STARTACQUISITION``, optionally ``CMD,SOFTTRIGGER``).

:class:`MerlinSource` connects to the data port, reads it in chunks, checks each chunk's
run of equal-sized frame messages in one compiled pass over their headers, and hands out
livestereo start / frames / end messages; U16 / U32 frames stay in the chunk as big-endian
views (no copy), the rest are decoded into reused native batches. Bad input (a prefix that
is not ``MPX,``, a frame whose header disagrees with its length, an unknown pixel type, a
frame cut short, a connection closed mid-frame, lost frames, an acquisition restarted
mid-scan) gives a ProtocolError item; the source resynchronises on the next ``MPX,`` and
goes on.
"""

from __future__ import annotations

import collections
import os
import queue
import socket
import struct
import sys
import threading
import time
from typing import Iterable

import numpy as np

from livestereo.detectors.common import BatchPool, PixelMask, RunBuilder, bad, ok, sanitize_run_id
from livestereo.detectors.merlin import mib
from livestereo.protocol.codec import ProtocolError
from livestereo.protocol.messages import Calibration
from livestereo.protocol.source import Received

MAX_MESSAGE_BYTES = 256 << 20


class MerlinControlError(RuntimeError):
    """The Merlin answered a control command with an error code."""


class MerlinControl:
    """Client of the Merlin control port (TCP 6341): GET / SET parameters, CMD commands.

    >>> with MerlinControl("127.0.0.1") as ctl:
    ...     ctl.set("NUMFRAMESTOACQUIRE", 16384)
    ...     ctl.cmd("STARTACQUISITION")
    """

    ERRORS = {1: "busy", 2: "command not recognised", 3: "parameter out of range"}
    DEFAULT_PARAMETERS = ("SOFTWAREVERSION", "COUNTERDEPTH", "NUMFRAMESTOACQUIRE", "NUMFRAMESPERTRIGGER",
                          "ACQUISITIONTIME", "CONTINUOUSRW", "RUNHEADLESS", "FILEENABLE", "TRIGGERSTART")

    def __init__(self, host: str = "127.0.0.1", port: int = 6341, timeout_s: float = 5.0):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._sock: socket.socket | None = None

    def connect(self) -> "MerlinControl":
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        self._sock.settimeout(self.timeout_s)
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc):
        self.close()

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n > 0:
            c = self._sock.recv(n)  # type: ignore[union-attr]
            if not c:
                raise ConnectionError(f"Merlin control {self.host}:{self.port} closed the connection")
            chunks.append(c)
            n -= len(c)
        return b"".join(chunks)

    def request(self, *parts) -> list[str]:
        """Send ``MPX,<len>,p0,p1,...``; return the reply's fields after the length."""
        if self._sock is None:
            self.connect()
        body = ",".join(str(p) for p in parts).encode("ascii")
        self._sock.sendall(mib.mpx_prefix(len(body)) + body)  # type: ignore[union-attr]
        head = self._recv_exact(15)
        length = mib.parse_mpx_prefix(head)
        data = self._recv_exact(max(0, length - 1))
        # some servers count the length without the comma: take whatever else is waiting
        self._sock.setblocking(False)  # type: ignore[union-attr]
        try:
            data += self._sock.recv(4096)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self._sock.settimeout(self.timeout_s)  # type: ignore[union-attr]
        return [p.strip() for p in data.decode("ascii", "replace").strip(",\r\n\0 ").split(",")]

    def _check(self, reply: list[str], what: str) -> None:
        try:
            code = int(reply[-1])
        except (IndexError, ValueError):
            raise MerlinControlError(f"{what}: unreadable reply {reply!r}") from None
        if code != 0:
            raise MerlinControlError(f"{what}: error {code} ({self.ERRORS.get(code, 'unknown')})")

    def get(self, name: str) -> str:
        reply = self.request("GET", name)
        self._check(reply, f"GET {name}")
        return reply[2] if len(reply) >= 4 else ""

    def set(self, name: str, value) -> None:
        self._check(self.request("SET", name, value), f"SET {name}")

    def cmd(self, name: str) -> None:
        self._check(self.request("CMD", name), f"CMD {name}")

    def read_parameters(self, names: Iterable[str] = DEFAULT_PARAMETERS) -> dict[str, str]:
        """The parameters that answer (errors are skipped)."""
        out = {}
        for n in names:
            try:
                out[n] = self.get(n)
            except (MerlinControlError, ProtocolError):
                continue
        return out


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Reader(threading.Thread):
    """Reads the data socket in chunks, on its own thread (``start()``: recv releases the
    GIL, so the kernel's copy of the next bytes overlaps the consumer's work on the
    previous ones; chunks queue in ``ready``) or on the caller's (``fill_one``).

    Hands over (buffer, start, end) chunks; each buffer keeps ``reserve`` bytes free in
    front of ``start`` so the consumer can put the unparsed tail of the previous chunk
    there (at most a couple of messages) instead of moving whole chunks. A chunk is
    handed over when ``chunk`` bytes came or after ``idle_s`` (s) with fewer. Buffers come back through ``free``; one
    is filled again only when no frames handed downstream still view it (its reference
    count says so), otherwise it is left to them and a new one takes its place. With
    ``n_buffers`` chunks waiting for the consumer the reader waits, the socket fills and
    TCP holds the sender back: nothing is dropped."""

    def __init__(self, sock: socket.socket, chunk: int, reserve: int, n_buffers: int = 4, idle_s: float = 0.02,
                 busy_poll_s: float = 0.0, busy_poll_min_bps: float = 0.0):
        super().__init__(name="merlin-reader", daemon=True)
        self.sock = sock
        self.chunk = chunk
        self.reserve = reserve
        self.idle_s = idle_s
        self.busy_poll_s = busy_poll_s
        self.busy_poll_min_bps = busy_poll_min_bps
        self.rate_bps = 0.0  # how fast the last chunk filled (bytes/s; 0 after a short one)
        self.polled_chunks = 0  # chunks read by busy polling
        self.ready: queue.Queue = queue.Queue()
        self.free: collections.deque[bytearray] = collections.deque()  # append / popleft are atomic
        self.stop = threading.Event()
        self._spare: list[bytearray] = []
        self._n_max = n_buffers
        self.allocated = 0
        self._timeout: float | None = None
        sock.settimeout(None)  # blocking; fill_one sets a kernel receive timeout

    def _collect(self) -> None:
        while True:
            try:
                self._spare.append(self.free.popleft())
            except IndexError:
                return

    def _buffer(self, need: int) -> bytearray | None:
        while not self.stop.is_set():
            self._collect()
            for i in range(len(self._spare)):
                # references: the list and getrefcount's argument; more are frame views
                if sys.getrefcount(self._spare[i]) == 2 and len(self._spare[i]) >= need:
                    return self._spare.pop(i)
            if self.ready.qsize() < self._n_max:
                # views still hold the spares (or they are too small): leave those to them
                if len(self._spare) >= self._n_max:
                    self._spare.pop(0)
                self.allocated += 1
                return bytearray(need)
            time.sleep(0.0005)  # the consumer is behind: wait for it
        return None

    def fill_one(self, timeout_s: float | None = None):
        """Receive one chunk: (buffer, start, end); ("eof", None, None) when the peer closed
        the connection; None when nothing came within the timeout (``idle_s``, or less).

        With ``busy_poll_s`` > 0, while the stream runs at ``busy_poll_min_bps`` or faster
        (the last chunk filled at that rate), the chunk is first filled by non-blocking
        reads, spinning while bytes keep coming and for up to ``busy_poll_s`` after the
        last ones: a thread that sleeps in recv must be woken when bytes arrive, and on
        virtual machines a woken (halted) CPU takes long enough to halve the rate the
        sender can keep up. A slower stream would keep the spin going between its frames
        for little gain, so it is read by blocking reads only.
        Then (or without busy polling) one blocking recv for the rest (MSG_WAITALL)
        with a kernel receive timeout: the caller takes the GIL once per chunk, not once
        per batch of TCP segments, so a busy consumer thread cannot hold the socket back.
        A chunk comes back short, with what did come, when the stream pauses for the
        timeout."""
        start, chunk = self.reserve, self.chunk  # read once: the consumer may grow them
        buf = self._buffer(start + chunk)
        if buf is None:
            return None
        mv = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        try:
            if self.busy_poll_s > 0 and self.rate_bps >= self.busy_poll_min_bps:
                self.polled_chunks += 1
                got = self._poll_into(mv[start:start + chunk])
            if 0 <= got < chunk:
                t = self.idle_s if timeout_s is None else max(0.0005, min(self.idle_s, timeout_s))
                if t != self._timeout:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                         struct.pack("ll", int(t), int(t % 1 * 1e6)))
                    self._timeout = t
                try:
                    n = self.sock.recv_into(mv[start + got:start + chunk], chunk - got, socket.MSG_WAITALL)
                    got = got + n if n > 0 else (got or -2)  # -2: the peer closed the connection
                except (BlockingIOError, socket.timeout):
                    pass
        finally:
            mv.release()
        self.rate_bps = got / max(time.perf_counter() - t0, 1e-9) if got == chunk else 0.0
        if got > 0:
            return buf, start, start + got
        self._spare.append(buf)
        return ("eof", None, None) if got == -2 else None

    def _poll_into(self, view: memoryview) -> int:
        """Non-blocking reads into ``view`` until it is full or no byte came for
        ``busy_poll_s``: bytes read, or -2 when the peer closed the connection."""
        recv_into, flag, clock = self.sock.recv_into, socket.MSG_DONTWAIT, time.perf_counter
        want = len(view)
        got = 0
        until = clock() + self.busy_poll_s
        while got < want:
            try:
                n = recv_into(view[got:], want - got, flag)
            except (BlockingIOError, InterruptedError):
                # no sched_yield here: it would hand the core to a runnable idle-class
                # analysis until the next tick (the GIL is free during each recv anyway)
                if clock() > until:
                    break
                continue
            if n == 0:
                return got or -2
            got += n
            until = clock() + self.busy_poll_s
        return got

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                item = self.fill_one()
                if item is not None:
                    self.ready.put(item)
                    if item[0] == "eof":
                        return
        except OSError as exc:
            self.ready.put(("error", exc, None))


class _Geometry:
    """What every frame message of the current acquisition looks like."""

    def __init__(self, header: mib.FrameHeader, msg_total: int, first_bytes: bytes):
        self.header = header
        self.msg_total = msg_total
        self.prefix_bytes = bytes(first_bytes[:15])
        self.prefix = np.frombuffer(self.prefix_bytes, np.uint8).copy()
        # header bytes after the 6-digit sequence number: ',00384,01,0256,0256,U16,   1x1,'
        self.fixed = np.frombuffer(first_bytes[15 + 10:15 + 41], np.uint8).copy()
        self.payload_offset = 15 + header.header_nbytes
        dt = np.dtype(header.dtype)
        #: the wire dtype of frames that can travel as views of the receive buffer, else None
        self.big_endian = dt.newbyteorder(">") if not header.raw and dt.itemsize in (2, 4) else None


class MerlinSource:
    """Frames from a Merlin's data port as livestereo messages.

    host, port: the data port. control_port: if given, the control port is used to read
    the detector's parameters (metadata) and, with ``arm=True``, to start the acquisition
    once the data port is connected (``soft_trigger=True`` also sends CMD,SOFTTRIGGER).
    scan_shape: (ny, nx) when the acquisition header has no ScanX/ScanY.
    hot_pixels: (row, col) pixels to zero; mask: boolean frame-shaped mask of pixels to zero.
    depth: counter depth for RAW frames from firmware whose headers do not say it.
    frames_per_message: batch size; a partial batch goes out after ``max_batch_wait_s``.
    reconnect: connect again after the detector closed the data connection (``arm`` then
    arms again). threaded: read the socket on a helper thread (False: on the caller's
    thread, between its parsing), in chunks of ``recv_chunk_bytes`` bytes (at least two
    frames). Small chunks keep the detector sending: the socket is drained every few
    frames, so its buffer never fills while a chunk is reduced, and the chunk is still in
    the cache when it is (512 kB chunks with busy polling: 1.3x the rate of 2 MB chunks
    read by blocking reads, on 2 cores). Default: a
    helper thread only with 4 or more usable CPUs; with fewer it competes with the
    consumer for a core (measured slower on 2). busy_poll_s (s): after each chunk, read
    the socket without blocking, spinning while bytes come and for up to this long after
    the last ones, before a blocking read; a reader that sleeps must be woken by the
    kernel for every burst of bytes, which costs the sender its pace (0: always block).
    Only while the stream runs at ``busy_poll_min_bps`` (bytes/s) or faster: a slower one
    (1 GB/s is ~8 k frames/s of 256x256 U16) would keep the spin going between frames for
    little gain, and an idle connection costs no CPU either way.

    U16 / U32 frames go downstream without a copy, as big-endian views of the chunk they
    were received in (the daemon's accumulator reads them in place); a chunk's memory is
    reused only once no such view is left.

    Frame positions come from the frames' own sequence numbers (1 = first frame of the
    acquisition): lost frames leave gaps (reported) instead of shifting the image.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 6342, *, control_port: int | None = None,
                 arm: bool = False, soft_trigger: bool = False, scan_shape: tuple[int, int] | None = None,
                 calibration: Calibration | None = None, frames_per_message: int = 64,
                 hot_pixels: Iterable[tuple[int, int]] = (), mask: np.ndarray | None = None,
                 depth: int | None = None, run_prefix: str = "merlin", max_batch_wait_s: float = 0.05,
                 reconnect: bool = True, recv_chunk_bytes: int = 512 << 10, threaded: bool | None = None,
                 busy_poll_s: float = 0.001, busy_poll_min_bps: float = 1e9):
        self.host, self.port = host, int(port)
        self.name = f"Merlin tcp://{host}:{port}"
        self.control_port = control_port
        self.arm, self.soft_trigger = arm, soft_trigger
        self.scan_shape = tuple(scan_shape) if scan_shape else None
        self.calibration = calibration
        self.frames_per_message = max(1, int(frames_per_message))
        self.hot_pixels = list(hot_pixels)
        self.mask = mask
        self.depth = depth
        self.run_prefix = run_prefix
        self.max_batch_wait_s = max_batch_wait_s
        self.reconnect = reconnect
        self.recv_chunk_bytes = recv_chunk_bytes
        self.busy_poll_s = max(0.0, float(busy_poll_s))
        self.busy_poll_min_bps = max(0.0, float(busy_poll_min_bps))
        self.threaded = bool(threaded) if threaded is not None else _usable_cpus() >= 4
        self._reader: _Reader | None = None
        self._reserve = 4 << 20
        self.control_parameters: dict[str, str] = {}
        self.counters: collections.Counter[str] = collections.Counter()

        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._lo = 0
        self._hi = 0
        self._stream_offset = 0  # stream offset of _buf[0]
        self._pending: collections.deque[Received] = collections.deque()
        self._acq: dict | None = None
        self._acq_hdr: dict[str, str] | None = None
        self._geom: _Geometry | None = None
        self._run: RunBuilder | None = None
        self._run_geom_key = None
        self._run_count = 0
        self._seq_base = 0
        self._last_seq = 0
        self._mask: PixelMask | None = None
        self._wait_t0: float | None = None  # a complete frame waits for the next message's first bytes
        self._out: np.ndarray | None = None  # the batch being filled
        self._batches = BatchPool()
        self._out_seqs = np.empty(0, dtype=np.int64)
        self._seqs = np.empty(0, dtype=np.int64)  # sequence numbers of the frames being checked
        self._out_n = 0
        self._out_t0: float | None = None
        self._out_geom: _Geometry | None = None
        self._closed = False
        self._ever_connected = False

    # ---------------------------------------------------------------- connection

    def _connect(self, timeout_s: float) -> bool:
        try:
            s = socket.create_connection((self.host, self.port), timeout=max(0.01, min(timeout_s, 2.0)))
        except OSError:
            return False
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = s
        self._lo = self._hi = 0
        self._stream_offset = 0
        self._geom = None
        self._ever_connected = True
        self._reader = _Reader(s, self.recv_chunk_bytes, self._reserve, busy_poll_s=self.busy_poll_s,
                               busy_poll_min_bps=self.busy_poll_min_bps)
        if self.threaded:
            self._reader.start()
        self._seq_base = 0
        self._last_seq = 0
        self.counters["connections"] += 1
        if self.control_port is not None:
            try:
                with MerlinControl(self.host, self.control_port) as ctl:
                    self.control_parameters = ctl.read_parameters()
                    if self.arm:
                        ctl.cmd("STARTACQUISITION")
                        if self.soft_trigger:
                            ctl.cmd("SOFTTRIGGER")
            except (OSError, MerlinControlError, ProtocolError) as exc:
                self._pending.append(bad("control_error", f"{self.name}: control port {self.control_port}: {exc}"))
        return True

    def _stop_reader(self) -> None:
        r = self._reader
        if r is not None:
            r.stop.set()
            if r.ident is not None:
                r.join(timeout=2)
            self._reader = None

    def _disconnect(self, why: str | None) -> None:
        self._deliver_out()
        self._stop_reader()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        avail = self._hi - self._lo
        if avail and why is not None:
            self._pending.append(bad("truncated", f"{self.name}: {why} with {avail} bytes of an incomplete message "
                                     f"at stream byte offset {self._stream_offset + self._lo}"))
        if self._run is not None and not self._run.ended and not self._run.complete:
            if why is not None:
                self._pending.append(bad("disconnected", f"{self.name}: {why} after {self._run.frames_sent} of "
                                         f"{self._run.expected_frames or 'unbounded'} frames of run {self._run.run_id}"))
            self._end_run("aborted")
        self._lo = self._hi = 0
        self._geom = None
        self._acq = None

    def close(self) -> None:
        self._closed = True
        self._stop_reader()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- receive

    def receive(self, timeout_s: float) -> Received | None:
        if self._pending:
            return self._pending.popleft()
        if self._closed:
            raise EOFError(f"{self.name}: closed")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._sock is None:
                if self._ever_connected and not self.reconnect:
                    raise EOFError(f"{self.name}: connection closed")
                if not self._connect(deadline - time.monotonic()):
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        time.sleep(min(0.05, remaining))
                        continue
                    return self._pending.popleft() if self._pending else None
            now = time.monotonic()
            t0 = min(t for t in (self._wait_t0, self._out_t0, now + 1e9) if t is not None)
            flush = now >= deadline or now - t0 >= self.max_batch_wait_s
            self._parse(flush)
            if flush:
                self._deliver_out()
            if self._pending:
                return self._pending.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._parse(True)
                self._deliver_out()
                return self._pending.popleft() if self._pending else None
            wait = remaining
            t0 = min(t for t in (self._wait_t0, self._out_t0, now + 1e9) if t is not None)
            if t0 < now + 1e8:
                wait = max(0.0005, min(wait, self.max_batch_wait_s - (time.monotonic() - t0)))
            self._take(wait)

    def _take(self, wait_s: float) -> None:
        """Switch to the reader's next chunk, carrying the unparsed tail over."""
        r = self._reader
        assert r is not None
        if self.threaded:
            try:
                item = r.ready.get(timeout=max(0.0005, wait_s))
            except queue.Empty:
                return
        else:
            g = self._geom
            if g is not None:
                # end the chunk 4 bytes into a frame message ('MPX,'): the last whole frame
                # can then be checked and handed on at once, and only those 4 bytes carry over
                tail = self._hi - self._lo
                k = max(2, self.recv_chunk_bytes // g.msg_total)
                r.chunk = k * g.msg_total + 4 - tail if tail < g.msg_total else max(self.recv_chunk_bytes, 2 * g.msg_total)
            try:
                item = r.fill_one(wait_s)
            except OSError as exc:
                item = ("error", exc, None)
            if item is None:
                return
        buf, start, end = item
        if isinstance(buf, str):  # "eof" or "error"
            self._parse(True)
            self._deliver_out()
            self._disconnect("connection closed" if buf == "eof" else f"connection error ({start})")
            return
        tail = self._hi - self._lo
        old = self._buf
        if tail > start:  # more left over than the reserve holds: one bigger buffer
            nb = bytearray(tail + (end - start))
            nb[:tail] = old[self._lo:self._hi]
            nb[tail:] = buf[start:end]
            r.free.append(buf)
            new_lo, new_hi, new_buf = 0, len(nb), nb
        else:
            if tail:
                buf[start - tail:start] = old[self._lo:self._hi]
            new_lo, new_hi, new_buf = start - tail, end, buf
        self._stream_offset = self._stream_offset + self._lo - new_lo  # keeps offset(lo) continuous
        if old is not new_buf and len(old):
            r.free.append(old)
        self._buf, self._lo, self._hi = new_buf, new_lo, new_hi
        self.counters["bytes"] += end - start

    # ---------------------------------------------------------------- parsing

    def _resync(self, reason: str, detail: str) -> None:
        """Drop bytes up to the next 'MPX,' after the current position."""
        start = self._lo + 1
        pos = self._buf.find(b"MPX,", start, self._hi)
        dropped_to = pos if pos >= 0 else max(start, self._hi - 3)
        self._pending.append(bad(reason, f"{self.name}: {detail}; skipped {dropped_to - self._lo} bytes to resynchronise"))
        self.counters["resyncs"] += 1
        self._lo = dropped_to

    def _parse(self, flush: bool) -> None:
        buf = self._buf
        while True:
            lo, hi = self._lo, self._hi
            avail = hi - lo
            if avail < 4:
                break
            g = self._geom
            if g is not None and buf.startswith(g.prefix_bytes, lo) and buf.startswith(b"MQ1,", lo + 15):
                # the next frame of the current geometry (its length field is the same)
                if not self._frames(flush, g.msg_total):
                    break
                continue
            if buf[lo:lo + 4] != b"MPX,":
                self._resync("bad_mpx_prefix", f"expected 'MPX,' at stream byte offset {self._stream_offset + lo}, "
                             f"got {bytes(buf[lo:lo + 16])!r}")
                continue
            if avail < 19:
                break
            try:
                length = mib.parse_mpx_prefix(buf, lo)
            except ProtocolError as exc:
                self._resync(exc.reason, f"stream byte offset {self._stream_offset + lo}: {exc.detail}")
                continue
            if length - 1 > MAX_MESSAGE_BYTES:
                self._resync("bad_mpx_prefix", f"MPX length {length} at stream byte offset {self._stream_offset + lo} is too large")
                continue
            total = 14 + length
            kind = bytes(buf[lo + 15:lo + 19])
            if kind == b"MQ1,":
                if not self._frames(flush, total):
                    break
                continue
            if avail < total:
                if total > len(buf):
                    self._grow(total)
                break
            body = bytes(buf[lo + 15:lo + total])
            if kind == b"HDR,":
                self._acquisition_header(body)
            else:
                self._pending.append(bad("unknown_message", f"{self.name}: MPX message of kind {kind!r} at stream byte "
                                         f"offset {self._stream_offset + lo} ({length - 1} bytes) ignored"))
            self._lo = lo + total

    def _grow(self, need: int) -> None:
        # frames handed downstream may view the current buffer: move the tail to a new one
        lo, hi = self._lo, self._hi
        nb = bytearray(max(need, hi - lo) + (1 << 20))
        nb[:hi - lo] = self._buf[lo:hi]
        old = self._buf
        self._stream_offset += lo
        self._buf, self._lo, self._hi = nb, 0, hi - lo
        if self._reader is not None and len(old):
            self._reader.free.append(old)

    def _next_ok(self, pos: int, final: bool) -> bool | None:
        """Whether a message ending at ``pos`` is followed by a new MPX message: True if so,
        False if we must wait for more bytes, None if something else follows (bad length)."""
        if self._hi - pos >= 4:
            return True if self._buf[pos:pos + 4] == b"MPX," else None
        if self._hi - pos > 0:
            return True if final and b"MPX,".startswith(bytes(self._buf[pos:self._hi])) else False
        return True if final else False

    def _acquisition_header(self, body: bytes) -> None:
        try:
            hdr = mib.parse_acquisition_header(body)
        except ProtocolError as exc:
            self._pending.append(bad(exc.reason, f"{self.name}: {exc.detail}"))
            return
        self.counters["acquisitions"] += 1
        self._deliver_out()
        if self._run is not None and not self._run.ended:
            if not self._run.complete:
                self._pending.append(bad("restarted", f"{self.name}: new acquisition header after {self._run.frames_sent} of "
                                         f"{self._run.expected_frames} frames of run {self._run.run_id}: run aborted"))
            self._end_run(None)
        self._acq_hdr = hdr
        self._acq = mib.acquisition_info(hdr)
        self._geom = None
        self._seq_base = 0
        self._last_seq = 0

    def _frame_geometry(self, lo: int, total: int) -> bool | None:
        """Parse the full header of the frame at ``lo``; set self._geom. None: waiting for
        bytes; False: the frame was bad and skipped."""
        buf = self._buf
        avail = self._hi - lo
        if avail < min(total, 15 + mib.MAX_HEADER_BYTES) and avail < 15 + 64:
            return None
        try:
            h = mib.parse_frame_header(buf, lo + 15, self.depth or (self._acq or {}).get("depth"))
        except ProtocolError as exc:
            if exc.reason == "truncated":
                return None
            return self._skip_frame(lo, total, exc.reason, exc.detail)
        if h.frame_nbytes != total - 15:
            return self._skip_frame(lo, total, "size_mismatch",
                                    f"MPX length says {total - 15} bytes but the MQ1 header ({h.pixel_type} {h.x}x{h.y}, "
                                    f"depth {h.depth}, {h.header_nbytes} header bytes) needs {h.frame_nbytes}")
        self._geom = _Geometry(h, total, bytes(buf[lo:lo + 15 + 41]))
        self._reserve = max(self._reserve, 2 * total + 64)
        if self._reader is not None:
            self._reader.reserve = self._reserve
            self._reader.chunk = max(self.recv_chunk_bytes, 2 * total)
        return True

    def _skip_frame(self, lo: int, total: int, reason: str, detail: str) -> bool | None:
        if self._hi - lo < total:
            if total > len(self._buf):
                self._grow(total)
            return None  # skip it whole once it is all here
        self._pending.append(bad(reason, f"{self.name}: frame at stream byte offset {self._stream_offset + lo}: {detail}; frame skipped"))
        self.counters["frames_skipped"] += 1
        self._lo = lo + total
        return False

    def _frames(self, flush: bool, total: int) -> bool:
        """Handle frame messages at _lo: check them, decode them into the current batch.
        Returns False when waiting for more bytes."""
        lo = self._lo
        g = self._geom
        if g is None or g.msg_total != total:
            r = self._frame_geometry(lo, total)
            if r is None:
                if total > len(self._buf) - lo:
                    self._grow(total)
                return False
            if r is False:
                return True
            g = self._geom
            assert g is not None
        avail = self._hi - lo
        k = avail // total
        if k == 0:
            if total > len(self._buf):
                self._grow(total)
            return False
        k = min(k, max(self.frames_per_message, 1))
        if self._seqs.shape[0] < k:
            self._seqs = np.empty(k, dtype=np.int64)
        # one compiled pass over the k headers; it stops at a header that differs and at a
        # jump in the sequence numbers, so the frames staged below are always consecutive
        nb = mib.scan_frame_messages(np.frombuffer(self._buf, np.uint8), lo, total, k, g.prefix, g.fixed, self._seqs)
        if nb == 0:
            # the first frame differs from the geometry: read its header again
            self._geom = None
            return self._frame_geometry(lo, total) is not None
        seqs = self._seqs[:nb]
        n_acq = (self._acq or {}).get("n_frames")
        is_last = bool(n_acq) and int(seqs[-1]) >= n_acq
        # the last accepted frame must be followed by an MPX message (catches frames cut short)
        nxt = self._next_ok(lo + nb * total, final=flush or is_last)
        if nxt is False:
            nb -= 1
            if self._wait_t0 is None:
                self._wait_t0 = time.monotonic()
            if nb == 0:
                return False
            self._stage(lo, nb, seqs)
            self._lo = lo + nb * total
            return True
        if nxt is None:
            # whatever follows frame nb-1 is not an MPX message. If an 'MPX,' starts inside
            # that frame, the frame was cut short: drop it and resynchronise there.
            # Otherwise the frame is whole and garbage follows it: keep the frame.
            last = lo + (nb - 1) * total
            inner = self._buf.find(b"MPX,", last + 15, last + total)
            if inner < 0:
                self._stage(lo, nb, seqs)
                self._lo = lo + nb * total
                return True
            if nb > 1:
                self._stage(lo, nb - 1, seqs)
            self._lo = last
            self._resync("truncated", f"frame message at stream byte offset {self._stream_offset + last} is cut short: "
                         f"a new MPX message starts {inner - last} bytes into it (its length says {total - 14}); frame dropped")
            self.counters["frames_skipped"] += 1
            return True
        self._stage(lo, nb, seqs)
        self._lo = lo + nb * total
        if is_last:
            self._deliver_out()
        return True

    def _stage(self, lo: int, nb: int, seqs: np.ndarray) -> None:
        """Decode nb frames at lo into the batch being filled; deliver it when full."""
        g = self._geom
        assert g is not None
        self._wait_t0 = None
        if g.big_endian is not None:
            # zero copy: the frames stay where they were received, as a big-endian view
            # (the accumulator reads them in place); the reader reuses this buffer only
            # once nothing downstream still holds such a view
            self._deliver_out()
            h = g.header
            isz = g.big_endian.itemsize
            data = np.ndarray((nb, h.y, h.x), dtype=g.big_endian, buffer=self._buf, offset=lo + g.payload_offset,
                              strides=(g.msg_total, h.x * isz, isz))
            self.counters["frames"] += nb
            self._deliver(data, int(seqs[0]), nb * g.msg_total)  # consecutive (scan_frame_messages)
            return
        i = 0
        while i < nb:
            if self._out is not None and self._out_geom is not g:
                self._deliver_out()
            if self._out is None:
                self._out = self._batches.get((self.frames_per_message, *g.header.frame_shape), g.header.dtype)
                self._out_seqs = np.empty(self.frames_per_message, dtype=np.int64)
                self._out_geom = g
                self._out_n = 0
            n0 = self._out_n
            k = min(nb - i, self.frames_per_message - n0)
            mib.decode_payloads(self._buf, lo + i * g.msg_total + g.payload_offset, g.msg_total, k, g.header,
                                out=self._out[n0:n0 + k])
            self._out_seqs[n0:n0 + k] = seqs[i:i + k]
            if n0 == 0:
                self._out_t0 = time.monotonic()
            self._out_n = n0 + k
            i += k
            self.counters["frames"] += k
            if self._out_n == self.frames_per_message:
                self._deliver_out()

    def _deliver_out(self) -> None:
        """Hand the frames decoded so far to the run (split at sequence jumps)."""
        n = self._out_n
        if self._out is None or n == 0:
            return
        g = self._out_geom
        data, seqs = self._out[:n], self._out_seqs[:n]
        self._out = None
        self._out_n = 0
        self._out_t0 = None
        geom, self._geom = self._geom, g
        try:
            breaks = np.flatnonzero(np.diff(seqs) != 1) + 1
            starts = [0, *breaks.tolist()]
            ends = [*breaks.tolist(), n]
            for a, b in zip(starts, ends):
                self._deliver(data[a:b], int(seqs[a]), (b - a) * g.msg_total)
        finally:
            self._geom = geom

    def _deliver(self, data: np.ndarray, seq0: int, nbytes: int) -> None:
        g = self._geom
        assert g is not None
        per_frame = nbytes // max(1, data.shape[0])
        key = g.header.layout_key()
        run = self._run
        if run is not None and not run.ended:
            why = None
            if key != self._run_geom_key:
                why = "the frame layout changed"
            elif seq0 <= self._last_seq:
                why = f"frame numbers restarted at {seq0}"
            if why is not None:
                if not run.complete:
                    self._pending.append(bad("restarted", f"{self.name}: {why} after {run.frames_sent} frames of run "
                                             f"{run.run_id}: run aborted"))
                self._end_run(None)
        while data.shape[0]:
            run = self._run
            if run is None or run.ended:
                if self._last_seq > 0:
                    self._seq_base = seq0 - 1  # a new series without a new acquisition header
                self._start_run(g.header)
                run = self._run
                assert run is not None
            index = seq0 - 1 - self._seq_base
            if index < run.next_index:
                skip = min(run.next_index - index, data.shape[0])
                self._pending.append(bad("frames_repeated", f"{self.name}: frames {seq0}..{seq0 + skip - 1} came again; ignored"))
                data, seq0 = data[skip:], seq0 + skip
                continue
            if index > run.next_index:
                self._pending.append(bad("frames_lost", f"{self.name}: frames {run.next_index + 1 + self._seq_base}.."
                                         f"{index + self._seq_base} of run {run.run_id} never came"))
                self.counters["frames_lost"] += index - run.next_index
            exp = run.expected_frames
            take = data.shape[0] if exp is None else min(data.shape[0], max(0, exp - index))
            if take == 0:
                self._end_run(None)
                self._last_seq = max(self._last_seq, 1)
                continue
            chunk = data[:take]
            assert self._mask is not None
            self._mask.apply(chunk)
            for msg in run.frames(chunk, index, keep_byte_order=True):
                self._pending.append(ok(msg, nbytes=msg.count * per_frame))
            self._last_seq = seq0 + take - 1
            data, seq0 = data[take:], seq0 + take
            if run.complete:
                self._end_run(None)

    def _start_run(self, h: mib.FrameHeader) -> None:
        acq = self._acq or {}
        n_frames = acq.get("n_frames")
        guessed = False
        scan = acq.get("scan_shape") or self.scan_shape
        if scan is None:
            scan = mib.guess_scan_shape(acq, n_frames)
        if scan is None:
            guessed = True
            scan = (1, n_frames) if n_frames else (1, 1)
            self._pending.append(bad("no_scan_shape", f"{self.name}: the acquisition header gives no scan shape and none was "
                                     f"configured; using {scan}"))
        n_pos = scan[0] * scan[1]
        if n_frames == 0:
            repeat = 0  # continuous
        elif n_frames and n_frames >= n_pos:
            repeat = max(1, n_frames // n_pos)
        else:
            repeat = 1
        self._run_count += 1
        stamp = h.fields[9] if len(h.fields) > 9 else ""
        md = {"source": self.name, **h.metadata()}
        if self._acq_hdr:
            md["merlin_acquisition_header"] = self._acq_hdr
        if self.control_parameters:
            md["merlin_control_parameters"] = self.control_parameters
        if guessed:
            md["scan_shape_guessed"] = True
        self._mask = PixelMask(h.frame_shape, self.mask, self.hot_pixels)
        if self._mask.count:
            md["masked_pixels"] = self._mask.count
        run_id = sanitize_run_id(f"{self.run_prefix}-{stamp.replace(' ', 'T')}-{self._run_count}")
        self._run = RunBuilder(run_id=run_id, scan_shape=scan, frame_shape=h.frame_shape, dtype=h.dtype,
                               calibration=self.calibration, metadata=md, repeat=repeat)
        self._run_geom_key = h.layout_key()
        self._pending.append(ok(self._run.start))

    def _end_run(self, reason: str | None) -> None:
        run = self._run
        if run is None or run.ended:
            return
        self._pending.append(ok(run.end(reason)))
