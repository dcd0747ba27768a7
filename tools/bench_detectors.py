"""Real-detector ingest benchmark: livestereo's Merlin source + two stereo virtual detectors
against LiberTEM-live's live ApplyMasksUDF, on the same machine and the same simulated
Merlin (LiberTEM-live's ``libertem-live-mib-sim`` serving a 128x128 scan of 256x256 12-bit
frames from a .mib file), plus the simulator's own send rate into a bare socket reader
(blocking, and busy-polling as MerlinSource does by default).

    .venv/bin/python tools/bench_detectors.py                 # the issue's configuration
    .venv/bin/python tools/bench_detectors.py --scan 32 32    # quick
    .venv/bin/python tools/bench_detectors.py --busy-poll-us 0 --chunk-kb 2048   # the old reads

Every measurement is one acquisition: arm (CMD,STARTACQUISITION + CMD,SOFTTRIGGER on the
control port) to the last frame reduced. The images of both are compared with a numpy
float64 reference computed from the file. Without the optional ``peers`` extra
(libertem-live[sim], libertem-qd-mpx) the benchmark says so and measures livestereo's
source against livestereo's own Merlin simulator only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from livestereo.detectors.merlin import mib
from livestereo.detectors.merlin.sim import MerlinSimulator
from livestereo.detectors.merlin.source import MerlinControl, MerlinSource

_POW10 = 10 ** np.arange(5, -1, -1, dtype=np.int64)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_frames(k: int, size: int, seed: int = 0) -> np.ndarray:
    """k distinct 12-bit frames: a bright-field disc with Poisson noise and a dark field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5)
    lam = np.where(r < size / 4, 40.0, 0.5).astype(np.float64)
    frames = np.empty((k, size, size), dtype=np.uint16)
    for i in range(k):
        shift = (i % 7) - 3
        frames[i] = np.minimum(rng.poisson(np.roll(lam, shift, axis=1)), 4095)
    return frames


def write_mib(path: Path, frames: np.ndarray, n: int, scan_shape) -> None:
    """A .mib of n frames cycling through ``frames`` (U16, 12-bit) and its .hdr."""
    k = frames.shape[0]
    block = bytearray()
    for i in range(k):
        block += mib.make_frame_header(i + 1, frames.shape[1:], "U16", depth=12) + mib.encode_payload(frames[i], "U16")
    fsize = len(block) // k
    digits = np.ndarray((k, 6), dtype=np.uint8, buffer=block, offset=4, strides=(fsize, 1))
    with open(path, "wb") as f:
        done = 0
        while done < n:
            m = min(k, n - done)
            seqs = np.arange(done + 1, done + 1 + m, dtype=np.int64)
            digits[:m] = ((seqs[:, None] // _POW10) % 10 + 48).astype(np.uint8)
            f.write(memoryview(block)[: m * fsize])
            done += m
    hdr = mib.make_acquisition_header(n, frames_per_trigger=scan_shape[1], depth=12, scan_shape=scan_shape)
    path.with_suffix(".hdr").write_bytes(hdr)


def stereo_weights(size: int) -> np.ndarray:
    """Two half discs of the bright-field disc (left / right): the simplest stereo pair."""
    yy, xx = np.mgrid[:size, :size]
    cy = cx = size / 2 - 0.5
    disc = np.hypot(yy - cy, xx - cx) < size / 4
    w = np.zeros((2, size, size), dtype=np.float32)
    w[0][disc & (xx < cx)] = 1.0
    w[1][disc & (xx > cx)] = 1.0
    return w.reshape(2, -1)


def reference_images(frames: np.ndarray, n: int, weights: np.ndarray) -> np.ndarray:
    """(2, n) float64 numpy reference (frames cycle through the distinct ones)."""
    per = weights.astype(np.float64) @ frames.reshape(frames.shape[0], -1).astype(np.float64).T  # (2, k)
    return per[:, np.arange(n) % frames.shape[0]]


# --------------------------------------------------------------------------- measurements


def settle() -> None:
    """LiberTEM-live's simulator serves one data connection at a time and notices a closed
    one only when it polls (every 0.1 s): arming before that would start the acquisition
    on the old, dead connection."""
    time.sleep(0.5)


def arm(host: str, control_port: int) -> None:
    with MerlinControl(host, control_port) as ctl:
        ctl.cmd("STARTACQUISITION")
        ctl.cmd("SOFTTRIGGER")


def bare_reader(host: str, data_port: int, control_port: int | None, expected_bytes: int, timeout_s: float = 300,
                busy: bool = False) -> float:
    """Bytes/s of a socket reader that only counts bytes (arm -> all bytes in): blocking
    reads of up to 16 MB, or (busy) non-blocking reads of up to 512 kB in a spin loop, as
    MerlinSource's busy polling does."""
    s = socket.create_connection((host, data_port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    buf = bytearray(16 << 20)
    mv = memoryview(buf)[: 512 << 10] if busy else memoryview(buf)
    flags = socket.MSG_DONTWAIT if busy else 0
    got = 0
    settle()
    t0 = time.perf_counter()
    if control_port is not None:
        arm(host, control_port)
    if not busy:
        s.settimeout(timeout_s)  # (a Python timeout would make every read wait in poll first)
    while got < expected_bytes:
        try:
            n = s.recv_into(mv, 0, flags)
        except BlockingIOError:
            if time.perf_counter() - t0 > timeout_s:
                break
            continue
        if n == 0:
            break
        got += n
    dt = time.perf_counter() - t0
    s.close()
    if got < expected_bytes:
        raise RuntimeError(f"bare reader got {got} of {expected_bytes} bytes")
    return got / dt


def livestereo_run(host: str, data_port: int, control_port: int | None, weights: np.ndarray, n: int, batch: int,
                   timeout_s: float = 300, threaded: bool | None = None, **source_kw):
    """(frames/s, images (2, n), errors) of MerlinSource (``source_kw``: more of its
    arguments) + Accumulator."""
    from livestereo.compute.accumulate import Accumulator

    acc = Accumulator(weights, n)
    acc.add(np.zeros((16, weights.shape[1]), np.uint16), 0)  # compile the kernels outside the timing
    acc = Accumulator(weights, n)
    settle()
    kw = dict(source_kw) if threaded is None else {**source_kw, "threaded": threaded}
    src = MerlinSource(host, data_port, control_port=control_port, arm=control_port is not None,
                       soft_trigger=control_port is not None, frames_per_message=batch, **kw)
    errors = []
    frames = 0
    t0 = time.perf_counter()
    try:
        while True:
            item = src.receive(1.0)
            if item is None:
                if time.perf_counter() - t0 > timeout_s:
                    raise TimeoutError(f"livestereo got {frames} of {n} frames")
                continue
            if item.error is not None:
                errors.append(str(item.error))
                continue
            m = item.message
            if hasattr(m, "data"):
                acc.add(m.data, m.first)
                frames += m.count
            elif type(m).__name__ == "EndMessage":
                break
    finally:
        src.close()
    dt = time.perf_counter() - t0
    return frames / dt, acc.images, errors, frames


def libertem_run(host: str, data_port: int, control_port: int, weights: np.ndarray, scan_shape, ctx=None):
    """(frames/s, images (2, n)) of LiberTEM-live's ApplyMasksUDF on a live Merlin acquisition."""
    from libertem.udf.masks import ApplyMasksUDF
    from libertem_live.api import Hooks, LiveContext

    size = int(np.sqrt(weights.shape[1]))
    masks = [weights[i].reshape(size, size).copy() for i in range(weights.shape[0])]

    class ArmHooks(Hooks):
        def on_ready_for_data(self, env):
            arm(host, control_port)

    own_ctx = ctx is None
    if own_ctx:
        ctx = LiveContext()
    try:
        with ctx.make_connection("merlin").open(api_host=host, api_port=control_port, data_host=host,
                                                data_port=data_port) as conn:
            settle()
            aq = ctx.make_acquisition(conn=conn, nav_shape=tuple(scan_shape), hooks=ArmHooks())
            udf = ApplyMasksUDF(mask_factories=[(lambda m=m: m) for m in masks])
            t0 = time.perf_counter()
            res = ctx.run_udf(dataset=aq, udf=udf)
            dt = time.perf_counter() - t0
        imgs = np.asarray(res["intensity"].data).reshape(-1, weights.shape[0]).T
    finally:
        if own_ctx:
            ctx.close()
    n = scan_shape[0] * scan_shape[1]
    return n / dt, imgs


def start_libertem_sim(hdr: Path, host: str, dp: int, cp: int, tp: int, log: Path):
    exe = Path(sys.executable).parent / "libertem-live-mib-sim"
    cmd = [str(exe), str(hdr), "--host", host, "--data-port", str(dp), "--control-port", str(cp), "--trigger-port", str(tp),
           "--cached", "mem", "--wait-trigger"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    t0 = time.time()
    while True:
        try:
            socket.create_connection((host, cp), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 120:
                proc.kill()
                raise RuntimeError(f"LiberTEM-live simulator did not start; see {log}")
            time.sleep(0.2)


def compare(name: str, imgs: np.ndarray, ref: np.ndarray) -> str:
    err = float(np.max(np.abs(imgs - ref)))
    rel = err / float(np.max(np.abs(ref)) or 1.0)
    return f"{name}: max |diff| vs numpy reference {err:.3g} (relative {rel:.2e})"


def dectris_run(scan=(64, 64), size: int = 192, batch: int = 64):
    """(frames/s, send rate) of DectrisSource (stream v2, bslz4) + Accumulator on livestereo's
    DECTRIS simulator (ARINA-sized frames, 64 distinct ones cycled)."""
    from livestereo.compute.accumulate import Accumulator
    from livestereo.detectors.dectris.sim import DectrisSimulator
    from livestereo.detectors.dectris.source import DectrisSource

    rng = np.random.default_rng(2)
    n = scan[0] * scan[1]
    frames = rng.poisson(0.3, size=(64, size, size)).astype(np.uint16)
    w = stereo_weights(size)
    acc = Accumulator(w, n)
    acc.add(np.zeros((16, size * size), np.uint16), 0)
    acc = Accumulator(w, n)
    with DectrisSimulator(frames, repeat=n // 64, wait_for_peer_s=0.3) as sim:
        src = DectrisSource(sim.endpoint, scan_shape=scan, frames_per_message=batch)
        got = 0
        t0 = None
        try:
            while True:
                item = src.receive(1.0)
                if item is None:
                    continue
                m = item.message
                if hasattr(m, "data"):
                    if t0 is None:
                        t0 = time.perf_counter() - m.count / 1e6
                    acc.add(m.data, m.first)
                    got += m.count
                elif type(m).__name__ == "EndMessage":
                    break
        finally:
            src.close()
        dt = time.perf_counter() - t0
    ref = reference_images(frames, n, w)
    return got / dt, sim.images_sent / max(sim.send_seconds, 1e-9), float(np.max(np.abs(acc.images - ref)))


def peers_available() -> str | None:
    try:
        import libertem_live  # noqa: F401
        import libertem_qd_mpx  # noqa: F401
        from libertem.udf.masks import ApplyMasksUDF  # noqa: F401
    except ImportError as exc:
        return f"LiberTEM-live peers not installed ({exc}); install the optional extra: pip install -e '.[peers]'"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, nargs=2, default=(128, 128), metavar=("NY", "NX"))
    ap.add_argument("--frame", type=int, default=256, help="frame size (square), default 256")
    ap.add_argument("--distinct", type=int, default=64, help="distinct frames cycled through the scan")
    ap.add_argument("--batch", type=int, default=64, help="livestereo frames per message")
    ap.add_argument("--repeat", type=int, default=1, help="measure each side this many times (best kept)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-libertem", action="store_true", help="skip LiberTEM-live even when installed")
    ap.add_argument("--reader", choices=("default", "thread", "caller"), default="default",
                    help="MerlinSource(threaded=...): its default, a reader thread, or the caller's thread")
    ap.add_argument("--busy-poll-us", type=float, default=None,
                    help="MerlinSource(busy_poll_s=...) in microseconds (0: blocking reads); default: the source's")
    ap.add_argument("--chunk-kb", type=int, default=None,
                    help="MerlinSource(recv_chunk_bytes=...) in kB; default: the source's")
    args = ap.parse_args(argv)
    source_kw = {}
    if args.busy_poll_us is not None:
        source_kw["busy_poll_s"] = args.busy_poll_us * 1e-6
    if args.chunk_kb is not None:
        source_kw["recv_chunk_bytes"] = args.chunk_kb << 10

    ny, nx = args.scan
    n = ny * nx
    threaded = {"default": None, "thread": True, "caller": False}[args.reader]
    size = args.frame
    host = "127.0.0.1"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_detectors_"))
    work.mkdir(parents=True, exist_ok=True)
    frames = make_frames(args.distinct, size)
    weights = stereo_weights(size)
    ref = reference_images(frames, n, weights)
    frame_bytes = size * size * 2
    msg_bytes = 15 + 384 + frame_bytes
    print(f"scan {ny}x{nx} of {size}x{size} 12-bit frames (U16), {n * frame_bytes / 1e9:.2f} GB of pixels; "
          f"2 virtual detectors (half discs); {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")
    results: dict[str, float] = {}
    lines: list[str] = []
    try:
        missing = None if not args.no_libertem else "skipped (--no-libertem)"
        missing = missing or peers_available()
        if missing is None:
            mib_path = work / "bench.mib"
            t0 = time.time()
            write_mib(mib_path, frames, n, (ny, nx))
            print(f"wrote {mib_path} ({mib_path.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.1f} s")
            dp, cp, tp = free_port(), free_port(), free_port()
            proc = start_libertem_sim(mib_path.with_suffix(".hdr"), host, dp, cp, tp, work / "libertem_sim.log")
            try:
                hdr_len = len(mib_path.with_suffix(".hdr").read_bytes())
                expected = 15 + hdr_len + n * msg_bytes
                bare_reader(host, dp, cp, expected)  # warm-up: fills the simulator's cache
                rates = [bare_reader(host, dp, cp, expected) for _ in range(args.repeat)]
                sim_bps = max(rates)
                results["sim_fps"] = sim_bps / msg_bytes
                busy_bps = max(bare_reader(host, dp, cp, expected, busy=True) for _ in range(args.repeat))
                results["sim_busy_fps"] = busy_bps / msg_bytes
                lines.append(f"LiberTEM-live simulator -> bare socket reader: {results['sim_fps']:,.0f} frames/s "
                             f"({sim_bps / 1e9:.2f} GB/s) blocking; {results['sim_busy_fps']:,.0f} frames/s "
                             f"({busy_bps / 1e9:.2f} GB/s) busy-polling")
                best_ls = (0.0, None)
                for _ in range(args.repeat):
                    fps, imgs, errors, got = livestereo_run(host, dp, cp, weights, n, args.batch, threaded=threaded, **source_kw)
                    if errors:
                        lines.append(f"livestereo errors: {errors[:3]}")
                    if got != n:
                        lines.append(f"livestereo got {got} of {n} frames")
                    best_ls = max(best_ls, (fps, imgs), key=lambda t: t[0])
                results["livestereo_fps"] = best_ls[0]
                from libertem_live.api import LiveContext

                ctx = LiveContext()
                try:
                    best_lt = (0.0, None)
                    for _ in range(args.repeat):
                        fps, limgs = libertem_run(host, dp, cp, weights, (ny, nx), ctx)
                        best_lt = max(best_lt, (fps, limgs), key=lambda t: t[0])
                finally:
                    ctx.close()
                results["libertem_fps"] = best_lt[0]
                lines.append(f"livestereo MerlinSource + Accumulator (2 detectors): {results['livestereo_fps']:,.0f} frames/s")
                lines.append(f"LiberTEM-live ApplyMasksUDF (2 masks):              {results['libertem_fps']:,.0f} frames/s")
                ratio = results["livestereo_fps"] / results["libertem_fps"]
                sim_ratio = results["livestereo_fps"] / results["sim_fps"]
                lines.append(f"ratio livestereo / LiberTEM-live: {ratio:.2f}x (target >= 2x); "
                             f"livestereo / simulator send rate: {sim_ratio:.2f} into the blocking reader, "
                             f"{results['livestereo_fps'] / results['sim_busy_fps']:.2f} into the busy-polling one "
                             f"(target >= 0.9 where the simulator is the limit)")
                lines.append(compare("livestereo", best_ls[1], ref))
                lines.append(compare("LiberTEM-live", best_lt[1], ref))
                lines.append(f"max |livestereo - LiberTEM-live| = {float(np.max(np.abs(best_ls[1] - best_lt[1]))):.3g}")
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        else:
            lines.append(f"LiberTEM-live: {missing}")
        # livestereo's own simulator (always)
        with MerlinSimulator(frames, scan_shape=(ny, nx), n_frames=n, control_port=0, wait_for_arm=True,
                             acquisitions=None, max_connections=None) as sim:
            expected = len(mib.mpx_prefix(2048)) + len(sim.acquisition_header()) + n * msg_bytes
            own_bps = max(bare_reader(host, sim.port, sim.control_port, expected) for _ in range(args.repeat))
            results["own_sim_fps"] = own_bps / msg_bytes
            best = (0.0, None)
            for _ in range(args.repeat):
                fps, imgs, errors, got = livestereo_run(host, sim.port, sim.control_port, weights, n, args.batch,
                                                        threaded=threaded, **source_kw)
                if errors:
                    lines.append(f"livestereo (own simulator) errors: {errors[:3]}")
                best = max(best, (fps, imgs), key=lambda t: t[0])
            results["livestereo_own_fps"] = best[0]
        lines.append(f"livestereo simulator -> bare socket reader: {results['own_sim_fps']:,.0f} frames/s "
                     f"({own_bps / 1e9:.2f} GB/s)")
        lines.append(f"livestereo MerlinSource + Accumulator on livestereo's simulator: {results['livestereo_own_fps']:,.0f} frames/s "
                     f"({results['livestereo_own_fps'] / results['own_sim_fps']:.2f} of its send rate)")
        lines.append(compare("livestereo (own simulator)", best[1], ref))
        fps, send, err = dectris_run()
        lines.append(f"livestereo DectrisSource (stream v2, bslz4, 192x192) + Accumulator: {fps:,.0f} frames/s "
                     f"(simulator encodes/sends {send:,.0f} frames/s); max |diff| vs numpy reference {err:.3g}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
