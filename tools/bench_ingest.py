#!/usr/bin/env python
"""Ingest benchmark (issue: the streaming spine). Prints, in one run on this machine:

(a) accumulation frames/s and GB/s for 256x256 uint16 frames with 2 and 8 virtual detectors,
    against the read bandwidth of the same buffer (numpy uint64-view sum);
(b) end-to-end frames/s from a simulator process over tcp loopback into the daemon, against
    a bare pyzmq PULL loop receiving the same stream, batched and one frame per message;
(c) peak RSS of the daemon process.

Every figure is a ratio against a baseline measured in the same run. Not a test.

    .venv/bin/python tools/bench_ingest.py            # ~2-3 minutes
    .venv/bin/python tools/bench_ingest.py --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- receivers
def _cpu() -> float:
    """CPU seconds of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """VmHWM of this process (MB). ru_maxrss would carry the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _threads() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, keyed
    "name:tid" (Python's thread name where it knows the thread, else the OS one)."""
    import threading

    names = {th.native_id: th.name for th in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for t in Path("/proc/self/task").iterdir():
        try:
            st = (t / "stat").read_text()
        except OSError:  # the thread ended
            continue
        f = st[st.rindex(")") + 2:].split()
        name = names.get(int(t.name), st[st.index("(") + 1:st.rindex(")")])
        out[f"{name}:{t.name}"] = (int(f[11]) + int(f[12])) / tick
    return out


def _thread_cpu(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def receive_bare(endpoint: str, rcvhwm: int) -> dict:
    """The baseline: a bare PULL loop, zero-copy, that only looks for the end message.

    It imports neither livestereo nor numpy: numpy starts OpenBLAS's thread pool, whose
    threads spin for a while after start-up, on the CPU this loop is measured on."""
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.rcvhwm = rcvhwm  # the same queue bound as the daemon
    sock.connect(endpoint)
    nbytes = frames_msgs = 0
    t_first = None
    while True:
        parts = sock.recv_multipart(copy=False)
        if len(parts) == 2:
            if t_first is None:
                t_first = time.perf_counter()
                cpu0 = _cpu()
                thr0 = _threads()
            frames_msgs += 1
            nbytes += parts[1].buffer.nbytes
        elif msgpack.unpackb(parts[0].buffer).get("type") == "end":
            t_end = time.perf_counter()
            cpu1 = _cpu()
            frames = msgpack.unpackb(parts[0].buffer)["frames_sent"]
            thr1 = _threads()
            break
    return {"frames": frames, "bytes": nbytes, "seconds": t_end - t_first, "messages": frames_msgs, "cpu_s": cpu1 - cpu0,
            "threads": _thread_cpu(thr0, thr1),
            "maxrss_mb": peak_rss_mb()}


def timed_source(endpoint: str, rcvhwm: int, marks: dict):
    """The daemon's PULL source, noting in ``marks`` when the first frames message
    ("first", "cpu0") and the end message ("end", "cpu1") were received (perf_counter, CPU s)."""
    from livestereo.protocol.messages import EndMessage, FramesMessage
    from livestereo.transport.zmq_source import ZmqStreamSource

    class TimedSource(ZmqStreamSource):
        def receive(self, timeout_s):
            item = super().receive(timeout_s)
            if item is not None and item.message is not None:
                if "first" not in marks and isinstance(item.message, FramesMessage):
                    marks["first"] = time.perf_counter()
                    marks["cpu0"] = _cpu()
                    marks["thr0"] = _threads()
                elif isinstance(item.message, EndMessage):
                    marks["end"] = time.perf_counter()
                    marks["cpu1"] = _cpu()
                    marks["thr1"] = _threads()
            return item

    return TimedSource(endpoint, "pull", rcvhwm=rcvhwm)


def receive_daemon(endpoint: str, layout: str) -> dict:
    """The daemon as `livestereo run` builds it, timed from the first frames to the run's end."""
    from livestereo.daemon.config import DaemonConfig
    from livestereo.daemon.daemon import Daemon

    marks: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DaemonConfig(endpoint=endpoint, output_dir=Path(tmp), max_runs=1, layout={"kind": layout, "k": 8},
                           idle_timeout_s=60.0)
        daemon = Daemon(cfg, timed_source(endpoint, cfg.rcvhwm, marks))
        daemon.run()
        c = daemon.ingest.counters
    return {"frames": c.frames, "bytes": c.bytes, "seconds": marks["end"] - marks["first"], "rejected": c.rejected_total,
            "cpu_s": marks["cpu1"] - marks["cpu0"], "threads": _thread_cpu(marks["thr0"], marks["thr1"]),
            "maxrss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------- orchestration
def run_pair(receiver: list[str], scans: int, fpm: int, sim_config: Path) -> dict:
    """One simulator process streaming into one receiver process; returns the receiver's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        ep_file = Path(tmp) / "endpoint"
        sim = subprocess.Popen(
            [sys.executable, "-m", "livestereo", "simulate", "--config", str(sim_config), "--cycle", str(scans),
             "--rate", "max", "--frames-per-message", str(fpm), "--endpoint", "tcp://127.0.0.1:*",
             "--endpoint-file", str(ep_file), "--run-id", "bench"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        t0 = time.monotonic()
        while not (ep_file.exists() and ep_file.read_text()):
            if sim.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"simulator failed: {sim.stderr.read()}")
            time.sleep(0.05)
        endpoint = ep_file.read_text()
        out = subprocess.run([sys.executable, __file__, "--receive", *receiver, endpoint], capture_output=True, text=True, cwd=ROOT)
        sim.wait(60)
        if out.returncode:
            raise RuntimeError(f"receiver failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--skip-kernels", action="store_true", help="skip part (a)")
    ap.add_argument("--reps", type=int, default=None, help="alternating runs per receiver in (b) (default 3; --quick 1)")
    ap.add_argument("--scans", type=int, default=None,
                    help="32 x 32 scans streamed per batched run in (b) (default 24, ~1 s; --quick 8; a third of that one frame per message)")
    ap.add_argument("--receive", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receive:
        kind, *rest = args.receive
        result = receive_bare(rest[-1], int(rest[0])) if kind == "bare" else receive_daemon(rest[-1], rest[0])
        print(json.dumps(result))
        return

    sim_config = ROOT / "configs" / "sim_bench.toml"
    from livestereo.daemon.config import DaemonConfig

    rcvhwm = DaemonConfig().rcvhwm
    print(f"livestereo ingest benchmark on {os.cpu_count()} CPU(s), {time.strftime('%Y-%m-%d %H:%M')}\n")

    if not args.skip_kernels:
        print("(a) accumulation kernels, 256x256 uint16 frames, batches of 256")
        from livestereo.compute.accumulate_bench import bench_accumulation, format_rows

        print(format_rows(bench_accumulation(4.0 if args.quick else 10.0)), flush=True)

    print("\n(b) end to end: simulator process -> tcp loopback -> receiver process (256x256 uint16)", flush=True)
    scans = args.scans or (8 if args.quick else 24)
    reps = args.reps or (1 if args.quick else 3)
    rows = []
    paired: dict[tuple[int, str], list[float]] = {}
    for fpm in (64, 1):
        n_scans = scans if fpm > 1 else max(1, scans // 3)
        runs: dict[str, list[dict]] = {"bare": [], "stereo": [], "multiview": []}
        for _ in range(reps):  # alternate, so slow phases of a shared machine hit every receiver alike
            runs["bare"].append(run_pair(["bare", str(rcvhwm)], n_scans, fpm, sim_config))
            for layout in ("stereo", "multiview"):
                runs[layout].append(run_pair(["daemon", layout], n_scans, fpm, sim_config))
        med = {k: sorted(v, key=lambda r: r["frames"] / r["seconds"])[len(v) // 2] for k, v in runs.items()}
        for layout in ("stereo", "multiview"):
            rows.append((fpm, layout, med["bare"], med[layout]))
            # each daemon run against the bare run just before it: drifts of a shared machine cancel
            paired[fpm, layout] = [(d["frames"] / d["seconds"]) / (b["frames"] / b["seconds"])
                                   for b, d in zip(runs["bare"], runs[layout])]
    print(f"median of {reps} alternating run(s) each")
    print(f"{'frames/msg':>10} {'layout':>10} {'bare frames/s':>14} {'GB/s':>6} {'daemon frames/s':>16} {'GB/s':>6} {'ratio':>6} "
          f"{'CPU us/frame bare':>18} {'daemon':>7} {'daemon RSS MB':>14}")
    for fpm, layout, bare, d in rows:
        bf, df = bare["frames"] / bare["seconds"], d["frames"] / d["seconds"]
        print(f"{fpm:>10} {layout:>10} {bf:>14.0f} {bare['bytes'] / bare['seconds'] / 1e9:>6.2f} {df:>16.0f} "
              f"{d['bytes'] / d['seconds'] / 1e9:>6.2f} {df / bf:>6.2f} {1e6 * bare['cpu_s'] / bare['frames']:>18.1f} "
              f"{1e6 * d['cpu_s'] / d['frames']:>7.1f} {d['maxrss_mb']:>14.0f}")
    print("\nCPU us/frame by thread (the median runs above):")
    for fpm, layout, bare, d in rows:
        for who, r in (("bare", bare), (layout, d)):
            if who == "bare" and layout != "stereo":
                continue
            per = sorted(((v / r["frames"] * 1e6, k.rsplit(":", 1)[0]) for k, v in r["threads"].items()), reverse=True)
            print(f"{fpm:>10} {who:>10}  " + ", ".join(f"{name} {us:.1f}" for us, name in per if us >= 0.05))
    if reps > 1:
        print("\npaired ratios (each daemon run / the bare run of the same round):")
        for (fpm, layout), rs in paired.items():
            print(f"{fpm:>10} {layout:>10}  " + " ".join(f"{r:.2f}" for r in rs)
                  + f"   median {sorted(rs)[len(rs) // 2]:.2f}, min {min(rs):.2f}")
    print("\ntarget: daemon >= 0.9x the bare PULL loop; (c) peak RSS is the daemon process's VmHWM "
          f"(bare loop: {rows[0][2]['maxrss_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
