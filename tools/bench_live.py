#!/usr/bin/env python
"""Live benchmark (issue: rolling inference, the window, in-situ series). Prints in one run,
for 256x256 scans of 64x64 frames (configs/sim_live_bench.toml) on this machine:

(a) latency from the last frame of a scan (the daemon's ``finished`` time of the scan) to its
    3D result published (the final ``dislocations`` message's send time) and to the window
    updated (that result drawn by the live window, rendered headless in this process), with
    the simulator streaming at a steady frame rate;
(b) ingest frames/s at the simulator's full speed with live inference, the results publisher
    and a live window running, against the same daemon with none of them (alternating runs,
    medians);
(c) the daemon's RSS over an in-situ series of 28 scans of 65.5 s acquisition time each
    (30.6 min of acquisition at a 1 ms frame time) streamed at full speed, with inference,
    publisher and window: flat means the mean of the last third within 10 % of the first
    third (after two warm-up scans).

Processes: the simulator (precomputes scan 0 and cycles it, so physics is never the limit),
the daemon (this script with --daemon, built as ``livestereo run`` builds it), and the
window (this script with --window: the live window's model and canvas, rendered headless as
soon as something changes, at most 20 times a second, as ``livestereo.view.app`` paces it;
started like ``livestereo run --view`` starts it). Not a test.

    .venv/bin/python tools/bench_live.py            # ~6 minutes
    .venv/bin/python tools/bench_live.py --quick    # ~3 minutes (fewer runs, 10-scan RSS series)
    .venv/bin/python tools/bench_live.py --only a --scans 12 --set final_idle=false   # more scans, a daemon setting
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "configs" / "sim_live_bench.toml"
sys.path.insert(0, str(ROOT))
from livestereo.priority import lower_process_priority  # noqa: E402  (the window's priority, as the daemon launches it)


# ---------------------------------------------------------------------------- the daemon process
def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def daemon_main(endpoint: str, out: Path, live: bool, publish: str | None, publish_file: Path | None,
                settings: dict | None = None) -> None:
    """Run the daemon as `livestereo run` builds it; print its figures as JSON on the last line."""
    from livestereo.commands.run import make_analyses
    from livestereo.daemon.config import DaemonConfig
    from livestereo.daemon.daemon import Daemon

    from bench_ingest import timed_source  # tools/ is this script's folder

    marks: dict = {}
    cfg = DaemonConfig(endpoint=endpoint, output_dir=out, max_runs=1, idle_timeout_s=120.0, inference=live,
                       publish=publish, **(settings or {}))
    daemon = Daemon(cfg, timed_source(endpoint, cfg.rcvhwm, marks), analyses=make_analyses(cfg))
    if publish_file is not None and daemon.publisher is not None:
        publish_file.write_text(daemon.publisher.endpoint)
    samples: list[tuple[float, float, int, int]] = []  # (s, RSS MB, scans done, scans waiting for the writer)
    halt = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not halt.wait(0.5):
            samples.append((time.perf_counter() - t0, rss_mb(), daemon.ingest.counters.scans_done,
                            daemon.writer.queue.qsize() + daemon.writer.backlog))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    daemon.run()
    halt.set()
    c = daemon.ingest.counters
    workers = {w.name: {"done": w.done, "skipped": w.skipped, "errors": w.errors} for w in daemon.workers}
    print(json.dumps({"frames": c.frames, "seconds": marks["end"] - marks["first"], "scans": c.scans_done,
                      "rejected": c.rejected_total, "rss": samples, "workers": workers,
                      "analysis_errors": daemon.writer.analysis_errors}))


# ---------------------------------------------------------------------------- the window
class WindowProbe:
    """A subscriber feeding the live window's model (headless, in this process) that records,
    per scan, when its final 3D result arrived and when the window had drawn it."""

    def __init__(self, endpoint: str):
        import zmq

        from livestereo.view.app import use_backend
        from livestereo.view.model import ViewState

        use_backend(headless=True)
        from livestereo.view.window import LiveWindow

        self.state = ViewState()
        self.win = LiveWindow(self.state, size=(1280, 800))
        self.win.render()
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.rcvhwm = 8
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.final: dict[int, dict] = {}      # scan -> {"published", "received", "drawn"}
        self.finished: dict[int, float] = {}  # scan -> daemon's finished time (scan_done)
        self.renders = 0
        self.messages = 0
        self._pending: list = []
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._rx = threading.Thread(target=self._receive, daemon=True)
        self._rx.start()

    def _receive(self) -> None:
        import zmq

        from livestereo.protocol.live import decode_live

        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not self._halt.is_set():
            if not poller.poll(50):
                continue
            batch = []
            while True:
                try:
                    batch.append(decode_live(self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)))
                except zmq.Again:
                    break
            now = time.time()
            for m in batch:
                self.messages += 1
                if m.topic == "dislocations" and m.data.get("final") and m.scan is not None:
                    self.final.setdefault(m.scan, {"published": m.header["time"], "received": now,
                                                   "seconds": dict(m.data.get("seconds") or {})})
                elif m.topic == "scan_done" and m.scan is not None and m.data.get("finished"):
                    self.finished[m.scan] = float(m.data["finished"])
            self.state.feed_batch(batch)

    def tick(self) -> None:
        """What the window does when its pacer says so: upload what changed and redraw."""
        if self.win.update():
            self.win.render()
            self.renders += 1
            now = time.time()
            shown = self.state.latest.get("dislocations")
            if shown is not None and shown.data.get("final") and shown.scan in self.final:
                self.final[shown.scan].setdefault("drawn", now)

    def results(self) -> dict:
        return {"final": self.final, "finished": self.finished, "renders": self.renders,
                "window_messages": self.messages, "window_dropped": self.state.dropped}

    def run_until(self, done, rate_hz: float = 20.0) -> None:
        """The window's loop (livestereo.view.app.run_headless): update as soon as something
        arrives, at most rate_hz times a second."""
        from livestereo.view.app import RedrawPacer

        pacer = RedrawPacer(self.state, rate_hz, idle_s=0.25)
        while not done():
            pacer.wait()
            self.tick()
        for _ in range(3):  # the last results
            self.tick()
            time.sleep(1.0 / rate_hz)

    def close(self) -> None:
        self._halt.set()
        self._rx.join(2)
        self.sock.close(0)
        self.win.close()


# ---------------------------------------------------------------------------- orchestration
def _wait_file(path: Path, proc: subprocess.Popen, what: str, timeout: float = 300) -> str:
    t0 = time.monotonic()
    while not (path.exists() and path.read_text().strip()):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{what} did not start: {err[-2000:]}")
        time.sleep(0.05)
    return path.read_text().strip()


def window_main(endpoint: str, stop_file: Path, out_file: Path) -> None:
    """The window as its own process (as `livestereo run --view` starts it), until stop_file exists."""
    probe = WindowProbe(endpoint)
    try:
        probe.run_until(stop_file.exists)
    finally:
        probe.close()
    out_file.write_text(json.dumps(probe.results()))


#: daemon settings from --set (DaemonConfig fields), for every daemon of the run
SETTINGS: dict = {}


def session(scans: int, rate: str, live: bool, window: bool) -> dict:
    """Simulator -> daemon (-> publisher -> window here); the daemon's figures (+ the window's)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim = subprocess.Popen(
            [sys.executable, "-m", "livestereo", "simulate", "--config", str(SIM_CONFIG), "--cycle", str(scans),
             "--rate", rate, "--endpoint", "tcp://127.0.0.1:*", "--endpoint-file", str(tmp / "sim"), "--run-id", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        endpoint = _wait_file(tmp / "sim", sim, "the simulator")
        cmd = [sys.executable, __file__, "--daemon", endpoint, "--out", str(tmp / "out")]
        if SETTINGS:
            cmd += ["--settings", json.dumps(SETTINGS)]
        if live:
            cmd += ["--live"]
        if window:
            cmd += ["--publish", "tcp://127.0.0.1:*", "--publish-file", str(tmp / "pub")]
        daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        win = None
        try:
            if window:
                pub = _wait_file(tmp / "pub", daemon, "the daemon")
                # the window runs as `livestereo run --view` starts it: its own process, idle class
                win = subprocess.Popen([sys.executable, __file__, "--window", pub, "--out", str(tmp)],
                                       stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                       preexec_fn=lower_process_priority)
            out, err = daemon.communicate(timeout=1800)
        finally:
            if win is not None:
                (tmp / "stop").touch()
                win.wait(60)
            sim.wait(60)
        if daemon.returncode:
            raise RuntimeError(f"daemon failed: {err[-3000:]}")
        res = json.loads(out.strip().splitlines()[-1])
        if win is not None:
            if win.returncode:
                raise RuntimeError(f"window failed: {win.stderr.read()[-3000:]}")
            w = json.loads((tmp / "window.json").read_text())
            w["final"] = {int(k): v for k, v in w["final"].items()}
            w["finished"] = {int(k): v for k, v in w["finished"].items()}
            res.update(w)
        return res


def _fps(r: dict) -> float:
    return r["frames"] / r["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("a", "b", "c"), action="append", help="run only these parts")
    ap.add_argument("--scans", type=int, help="scans in (a) (default 6, --quick 4)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a daemon setting (DaemonConfig field, VALUE as JSON or a string), e.g. final_idle=false")
    ap.add_argument("--daemon", metavar="ENDPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--publish", help=argparse.SUPPRESS)
    ap.add_argument("--publish-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--window", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.window:
        window_main(args.window, args.out / "stop", args.out / "window.json")
        return
    if args.daemon:
        daemon_main(args.daemon, args.out, args.live, args.publish, args.publish_file,
                    json.loads(args.settings) if args.settings else None)
        return
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: KEY=VALUE expected")
        try:
            SETTINGS[key] = json.loads(value)
        except json.JSONDecodeError:
            SETTINGS[key] = value

    print(f"machine: {os.cpu_count()} CPU(s); 256x256 scans of 64x64 uint16 frames ({SIM_CONFIG.name}); "
          "simulator, daemon and window all on this machine"
          + (f"; daemon settings {SETTINGS}" if SETTINGS else ""), flush=True)

    parts = set(args.only or "abc")
    if "a" in parts:
        latency(args)
    if "b" in parts:
        ingest_ratio(args)
    if "c" in parts:
        rss_series(args)


def latency(args) -> None:
    """(a) latency at a steady rate."""
    rate = "20000"
    r = session(scans=args.scans or (4 if args.quick else 6), rate=rate, live=True, window=True)
    pub, drawn = [], []
    for scan in sorted(r["final"]):
        fin = r["finished"].get(scan)
        f = r["final"][scan]
        if fin is None:
            continue
        pub.append((scan, f["published"] - fin))
        if "drawn" in f:
            drawn.append((scan, f["drawn"] - fin))
    print(f"\n(a) latency, last frame of a scan -> 3D result, simulator at {rate} frames/s "
          f"({65536 / float(rate):.1f} s per scan), {r['scans']} scans:")
    for name, xs in (("published", pub), ("window updated", drawn)):
        later = [x for s, x in xs if s > 0] or [x for _, x in xs]
        print(f"  {name:15s} " + "  ".join(f"scan {s}: {1e3 * x:.0f} ms" for s, x in xs)
              + (f"  | median (scans 1+) {1e3 * statistics.median(later):.0f} ms "
                 f"({1e3 * min(later):.0f}-{1e3 * max(later):.0f})" if later else "  | none"))
    rx = [f["received"] - f["published"] for s, f in r["final"].items() if s > 0]
    dr = [f["drawn"] - f["received"] for s, f in r["final"].items() if s > 0 and "drawn" in f]
    if rx and dr:
        print(f"  published -> received by the window: median {1e3 * statistics.median(rx):.0f} ms; "
              f"received -> drawn: median {1e3 * statistics.median(dr):.0f} ms "
              f"({1e3 * min(dr):.0f}-{1e3 * max(dr):.0f})")
    stages = {}
    for s_, f in r["final"].items():
        if s_ > 0:
            for k, v in f.get("seconds", {}).items():
                stages.setdefault(k, []).append(v)
    if stages:
        print("  in the daemon, per finished scan (median): " + ", ".join(
            f"{k} {1e3 * statistics.median(v):.0f} ms" for k, v in stages.items()))
    print(f"  window: {r['renders']} redraws, {r['window_messages']} messages, {r['window_dropped']} dropped; "
          f"live analyses {r['workers']}")



def ingest_ratio(args) -> None:
    """(b) ingest with and without the live stack, alternating."""
    reps = 2 if args.quick else 3
    base, full = [], []
    for _ in range(reps):
        base.append(_fps(session(scans=6, rate="max", live=False, window=False)))
        full.append(_fps(session(scans=6, rate="max", live=True, window=True)))
    mb, mf = statistics.median(base), statistics.median(full)
    print(f"\n(b) ingest at full speed, 6 scans, {reps} alternating runs each:")
    print(f"  daemon alone:                         {', '.join(f'{x / 1e3:.1f}' for x in base)} k frames/s (median {mb / 1e3:.1f} k)")
    print(f"  + live inference, publisher, window:  {', '.join(f'{x / 1e3:.1f}' for x in full)} k frames/s (median {mf / 1e3:.1f} k)")
    print(f"  ratio {mf / mb:.2f}x (target >= 0.9x)")



def rss_series(args) -> None:
    """(c) RSS over a long series."""
    n = 10 if args.quick else 28
    r = session(scans=n, rate="max", live=True, window=True)
    samples = [(t, m, s, q) for t, m, s, q in r["rss"] if s >= 2]
    third = max(1, len(samples) // 3)
    first = statistics.mean(x[1] for x in samples[:third])
    last = statistics.mean(x[1] for x in samples[-third:])
    peak = max(x[1] for x in r["rss"])
    acq_min = n * 65536 * 1e-3 / 60
    print(f"\n(c) daemon RSS over {n} scans ({acq_min:.1f} min of acquisition at 1 ms/frame) streamed in "
          f"{r['seconds']:.0f} s with inference, publisher and window:")
    print(f"  after scan 2: first third {first:.0f} MB, last third {last:.0f} MB ({100 * (last - first) / first:+.1f} %), "
          f"peak {peak:.0f} MB; ingest {_fps(r) / 1e3:.1f} k frames/s; live analyses {r['workers']}")
    print("  timeline (s: MB, scans done, scans waiting for the results writer): "
          + ", ".join(f"{t:.0f}: {m:.0f}/{s}/{q}" for t, m, s, q in r["rss"][::max(1, len(r["rss"]) // 16)]))
    print("  target: flat within 10 %")


if __name__ == "__main__":
    main()
