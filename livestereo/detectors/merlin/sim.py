"""A Merlin simulator: serves frames on a TCP data port the way a Quantum Detectors Merlin
does (MPX-framed acquisition header, then MQ1 frames), with a control port that takes
GET / SET / CMD (STARTACQUISITION arms it when ``wait_for_arm`` is set).

    with MerlinSimulator(frames, scan_shape=(64, 64)) as sim:      # frames: (n, h, w) array
        src = MerlinSource("127.0.0.1", sim.port)

It serves an array (encoded as U08/U16/U32) or a recorded .mib file byte for byte (RAW
included). Frames are pre-encoded once; a long acquisition cycles through them and only
the sequence numbers are rewritten, so the simulator can send at several GB/s.

``python -m livestereo.detectors.merlin.sim FILE.mib|FILE.npy --port 6342`` serves a file.
"""

from __future__ import annotations

import argparse
import select
import socket
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from livestereo.detectors.merlin import mib

_POW10 = 10 ** np.arange(5, -1, -1, dtype=np.int64)


def frame_message(seq: int, frame: np.ndarray, pixel_type: str = "U16", *, depth: int | None = None,
                  n_chips: int = 1, layout: str = "1x1") -> bytes:
    """One MPX frame message (prefix + MQ1 header + big-endian pixels)."""
    body = mib.make_frame_header(seq, frame.shape, pixel_type, depth=depth, n_chips=n_chips, layout=layout) + \
        mib.encode_payload(frame, pixel_type)
    return mib.mpx_prefix(len(body)) + body


def header_message(hdr: bytes) -> bytes:
    """An MPX-framed acquisition header."""
    return mib.mpx_prefix(len(hdr)) + hdr


def pixel_type_for(dtype) -> str:
    dt = np.dtype(dtype)
    if dt.kind not in "ui" or dt.itemsize > 4:
        raise ValueError(f"a Merlin serves unsigned 8/16/32-bit pixels, not {dt}")
    return {1: "U08", 2: "U16", 4: "U32"}[dt.itemsize]


class _Block:
    """Pre-encoded frame messages served in a cycle, with seq numbers rewritten."""

    def __init__(self, messages: bytes | bytearray, msg_total: int, seq_offset: int, n_src: int):
        self.buf = bytearray(messages)
        self.msg_total = msg_total
        self.seq_offset = seq_offset  # offset of the 6 seq digits inside one message
        self.n_src = n_src
        self.digits = np.ndarray((n_src, 6), dtype=np.uint8, buffer=self.buf, offset=seq_offset, strides=(msg_total, 1))

    def patch(self, a: int, b: int, seq_first: int) -> memoryview:
        """Messages for source frames a..b-1 numbered from seq_first."""
        seqs = np.arange(seq_first, seq_first + (b - a), dtype=np.int64) % 1000000
        self.digits[a:b] = ((seqs[:, None] // _POW10) % 10 + 48).astype(np.uint8)
        return memoryview(self.buf)[a * self.msg_total:b * self.msg_total]


class MerlinSimulator:
    """A Merlin data port (and control port) on ``host``.

    frames: (n, h, w) or (ny, nx, h, w) array of unsigned pixels; or mib_path: a .mib file
    served byte for byte (with its .hdr). n_frames: frames per acquisition (default: one
    pass over the data, times ``repeat``). scan_shape goes into the header as ScanX/ScanY
    (``scan_in_header=False`` leaves it out, like older firmware). port=0 / control_port=0
    pick free ports; control_port=None: no control port. wait_for_arm: each acquisition
    waits for CMD,STARTACQUISITION. acquisitions: how many acquisitions one connection gets
    (None: until stopped when wait_for_arm, else 1). close_after: close the data connection
    after the acquisitions (a real Merlin keeps it open). max_connections: data connections
    served (None: any number; each gets its acquisitions).
    """

    def __init__(self, frames: np.ndarray | None = None, *, mib_path: str | Path | None = None,
                 scan_shape: tuple[int, int] | None = None, pixel_type: str | None = None, depth: int | None = None,
                 n_frames: int | None = None, repeat: int = 1, host: str = "127.0.0.1", port: int = 0,
                 control_port: int | None = 0, wait_for_arm: bool = False, acquisitions: int | None = None,
                 close_after: bool = True, scan_in_header: bool = True, send_header: bool = True,
                 frames_per_send: int = 64, max_frames_per_s: float | None = None,
                 max_connections: int | None = 1):
        if (frames is None) == (mib_path is None):
            raise ValueError("give frames or mib_path")
        if mib_path is not None:
            self._load_mib(Path(mib_path))
        else:
            arr = np.asarray(frames)
            if arr.ndim == 4:
                scan_shape = scan_shape or arr.shape[:2]
                arr = arr.reshape(-1, *arr.shape[2:])
            if arr.ndim != 3:
                raise ValueError(f"frames must be (n, h, w) or (ny, nx, h, w), got {arr.shape}")
            pixel_type = pixel_type or pixel_type_for(arr.dtype)
            depth = depth or {"U08": 6, "U16": 12, "U32": 24}[pixel_type]
            msgs = bytearray()
            for i, fr in enumerate(arr):
                msgs += frame_message(i + 1, fr, pixel_type, depth=depth)
            total = len(msgs) // arr.shape[0]
            self._block = _Block(msgs, total, 15 + 4, arr.shape[0])
            self._hdr_info = {"depth": depth, "layout": "1x1"}
            self._file_hdr = None
            self.frame_shape = arr.shape[1:]
        self.n_src = self._block.n_src
        self.scan_shape = tuple(scan_shape) if scan_shape else None
        self.n_frames = int(n_frames) if n_frames is not None else self.n_src * int(repeat)
        self.host = host
        self.wait_for_arm = wait_for_arm
        self.acquisitions = acquisitions
        self.close_after = close_after
        self.scan_in_header = scan_in_header
        self.send_header = send_header
        self.frames_per_send = max(1, frames_per_send)
        self.max_frames_per_s = max_frames_per_s
        self.max_connections = max_connections
        self.connections = 0
        rows, cols = self.frame_shape
        self.params: dict[str, str] = {
            "NUMFRAMESTOACQUIRE": str(self.n_frames), "COUNTERDEPTH": str(self._hdr_info["depth"]),
            "SOFTWAREVERSION": "livestereo-sim", "NUMFRAMESPERTRIGGER": "1", "IMAGEX": str(cols), "IMAGEY": str(rows),
            "ACQUISITIONTIME": "1", "ACQUISITIONPERIOD": "1", "CONTINUOUSRW": "0", "RUNHEADLESS": "1", "FILEENABLE": "0",
            "TRIGGERSTART": "0", "TRIGGERSTOP": "0", "DETECTORSTATUS": "0",
        }
        self.arm_event = threading.Event()
        self.trigger_event = threading.Event()
        self.done_event = threading.Event()
        self._stop = threading.Event()
        self.frames_sent = 0
        self.bytes_sent = 0
        self.send_seconds = 0.0
        self.errors: list[str] = []
        self._data_srv = socket.create_server((host, port))
        self._data_srv.settimeout(0.2)
        self.port = self._data_srv.getsockname()[1]
        self._ctl_srv = None
        self.control_port = None
        if control_port is not None:
            self._ctl_srv = socket.create_server((host, control_port))
            self._ctl_srv.settimeout(0.2)
            self.control_port = self._ctl_srv.getsockname()[1]
        self._threads: list[threading.Thread] = []

    def _load_mib(self, path: Path) -> None:
        from livestereo.detectors.files import read_mib_header_file

        raw = path.read_bytes()
        hdr = read_mib_header_file(path)
        info = mib.acquisition_info(hdr) if hdr else {}
        h = mib.parse_frame_header(raw, 0, info.get("depth"))
        n = len(raw) // h.frame_nbytes
        if n == 0:
            raise ValueError(f"{path}: no complete frame")
        prefix = mib.mpx_prefix(h.frame_nbytes)
        msgs = bytearray()
        for i in range(n):
            msgs += prefix + raw[i * h.frame_nbytes:(i + 1) * h.frame_nbytes]
        self._block = _Block(msgs, 15 + h.frame_nbytes, 15 + 4, n)
        self._hdr_info = {"depth": h.depth, "layout": h.layout}
        hdr_path = path.with_suffix(".hdr")
        self._file_hdr = hdr_path.read_bytes() if hdr_path.exists() else None
        self.frame_shape = h.frame_shape

    # ------------------------------------------------------------------ serving

    def acquisition_header(self) -> bytes:
        if self._file_hdr is not None:
            return self._file_hdr
        scan = self.scan_shape if self.scan_in_header else None
        fpt = self.scan_shape[1] if self.scan_shape else 1
        return mib.make_acquisition_header(self.n_frames, frames_per_trigger=fpt, depth=self._hdr_info["depth"],
                                           scan_shape=scan, layout=self._hdr_info["layout"])

    def start(self) -> "MerlinSimulator":
        t = threading.Thread(target=self._serve_data, name="merlin-sim-data", daemon=True)
        t.start()
        self._threads.append(t)
        if self._ctl_srv is not None:
            t = threading.Thread(target=self._serve_control, name="merlin-sim-control", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._data_srv.close()
        if self._ctl_srv is not None:
            self._ctl_srv.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _serve_data(self) -> None:
        while not self._stop.is_set():
            if self.max_connections is not None and self.connections >= self.max_connections:
                self._stop.wait(0.1)
                continue
            try:
                conn, _ = self._data_srv.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
                try:
                    self._serve_connection(conn)
                except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                    self.errors.append(f"data connection: {exc}")
            self.done_event.set()

    def _serve_connection(self, conn: socket.socket) -> None:
        count = 0
        while not self._stop.is_set():
            if self.acquisitions is not None and count >= self.acquisitions:
                break
            if not self.wait_for_arm and self.acquisitions is None and count >= 1:
                break
            if self.wait_for_arm:
                while not self.arm_event.wait(0.05):
                    if self._stop.is_set() or _peer_closed(conn):
                        return
                self.arm_event.clear()
            self.send_acquisition(conn)
            count += 1
        if not self.close_after:
            while not self._stop.wait(0.1):
                pass

    def send_acquisition(self, conn: socket.socket) -> None:
        """Header, then n_frames frames, as fast as the reader takes them (or the rate limit)."""
        if self.send_header:
            conn.sendall(header_message(self.acquisition_header()))
        t0 = time.perf_counter()
        sent = 0
        seq = 1
        while sent < self.n_frames and not self._stop.is_set():
            a = sent % self.n_src
            b = min(self.n_src, a + self.frames_per_send, a + (self.n_frames - sent))
            view = self._block.patch(a, b, seq)
            conn.sendall(view)
            view.release()
            n = b - a
            sent += n
            seq += n
            self.frames_sent += n
            self.bytes_sent += n * self._block.msg_total
            if self.max_frames_per_s:
                ahead = sent / self.max_frames_per_s - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        self.send_seconds += time.perf_counter() - t0

    def _serve_control(self) -> None:
        assert self._ctl_srv is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._ctl_srv.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._control_conn, args=(conn,), daemon=True).start()

    def _control_conn(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 15:
                    try:
                        length = mib.parse_mpx_prefix(buf)
                    except Exception:
                        buf = b""
                        break
                    if len(buf) < 14 + length:
                        break
                    body, buf = buf[15:14 + length].decode("ascii", "replace"), buf[14 + length:]
                    reply = self._control_reply(body.split(","))
                    conn.sendall(mib.mpx_prefix(len(reply)) + reply)

    def _control_reply(self, parts: Sequence[str]) -> bytes:
        method = parts[0].upper() if parts else ""
        name = parts[1].upper() if len(parts) > 1 else ""
        if method == "GET":
            if name not in self.params:
                return f"GET,{name},,2".encode()
            return f"GET,{name},{self.params[name]},0".encode()
        if method == "SET" and len(parts) > 2:
            self.params[name] = parts[2]
            if name == "NUMFRAMESTOACQUIRE":
                try:
                    self.n_frames = int(parts[2])
                except ValueError:
                    return f"SET,{name},3".encode()
            return f"SET,{name},0".encode()
        if method == "CMD":
            if name == "STARTACQUISITION":
                self.arm_event.set()
            elif name == "SOFTTRIGGER":
                self.trigger_event.set()
            elif name in ("STOPACQUISITION", "ABORT", "RESET"):
                pass
            else:
                return f"CMD,{name},2".encode()
            return f"CMD,{name},0".encode()
        return f"{method},{name},2".encode()

    @property
    def send_rate_fps(self) -> float:
        return self.frames_sent / self.send_seconds if self.send_seconds else 0.0


def _peer_closed(conn: socket.socket) -> bool:
    """The client hung up (readable with nothing to read)."""
    r, _, _ = select.select([conn], [], [], 0)
    if not r:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class RawTcpServer:
    """Serves fixed byte chunks to the first client (bad-input tests), then closes
    (``close=False``: keeps the connection open, like a detector that went silent).
    ``pause_s`` waits between chunks."""

    def __init__(self, chunks: Iterable[bytes], *, host: str = "127.0.0.1", close: bool = True, pause_s: float = 0.0):
        self.chunks = [bytes(c) for c in chunks]
        self.close_after = close
        self.pause_s = pause_s
        self._srv = socket.create_server((host, 0))
        self._srv.settimeout(0.2)
        self.port = self._srv.getsockname()[1]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                try:
                    for c in self.chunks:
                        conn.sendall(c)
                        if self.pause_s:
                            time.sleep(self.pause_s)
                    if not self.close_after:
                        while not self._stop.wait(0.1):
                            pass
                except OSError:
                    pass
            return

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)
        self._srv.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Serve a .mib or .npy file like a Merlin data port.")
    ap.add_argument("path")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=6342)
    ap.add_argument("--control-port", type=int, default=6341)
    ap.add_argument("--scan-shape", type=int, nargs=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--wait-for-arm", action="store_true")
    args = ap.parse_args(argv)
    p = Path(args.path)
    kw = dict(scan_shape=tuple(args.scan_shape) if args.scan_shape else None, repeat=args.repeat, host=args.host,
              port=args.port, control_port=args.control_port, wait_for_arm=args.wait_for_arm,
              acquisitions=None if args.wait_for_arm else 1)
    sim = MerlinSimulator(mib_path=p, **kw) if p.suffix == ".mib" else MerlinSimulator(np.load(p, mmap_mode="r"), **kw)
    with sim:
        print(f"Merlin simulator: data port {sim.host}:{sim.port}, control port {sim.control_port}, {sim.n_frames} frames")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
