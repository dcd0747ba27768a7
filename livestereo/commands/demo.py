"""``livestereo demo``: the main job, end to end, on this machine."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

NAME = "demo"
HELP = "simulator -> ZeroMQ -> daemon: an in-situ series of a gamma-TiAl foil, results in one folder"
DESCRIPTION = """\
Starts the built-in simulator as its own process, streaming an in-situ series (repeated
scans of a gamma-TiAl foil whose dislocations glide) over a real ZeroMQ socket on
127.0.0.1; the daemon connects, accumulates the virtual stereo images live, prints
progress and writes per-scan results, the ground truth and a recording into one folder.
It ends by itself and prints where everything is.
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="results folder (default %(default)s)")
    p.add_argument("--config", type=Path, default=None, help="simulation config (default configs/sim_tial_insitu.toml)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override a simulation config key")
    p.add_argument("--no-record", action="store_true", help="do not keep a recording of the stream")


def _default_sim_config() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "configs" / "sim_tial_insitu.toml"
        if p.exists():
            return p
    return None


def run(args) -> int:
    from livestereo.daemon.config import DaemonConfig
    from livestereo.daemon.daemon import Daemon
    from livestereo.transport.zmq_source import ZmqStreamSource

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    endpoint_file = out / "endpoint.txt"
    endpoint_file.unlink(missing_ok=True)
    truth = out / "truth.h5"
    cfg_path = args.config or _default_sim_config()
    cmd = [sys.executable, "-m", "livestereo", "simulate", "--endpoint", "tcp://127.0.0.1:*",
           "--endpoint-file", str(endpoint_file), "--truth", str(truth), "--run-id", "demo"]
    if cfg_path:
        cmd += ["--config", str(cfg_path)]
    for s in args.set:
        cmd += ["--set", s]
    print(f"starting the simulator: {' '.join(cmd[2:])}", flush=True)
    sim = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    t0 = time.monotonic()
    while not endpoint_file.exists() or not endpoint_file.read_text().strip():
        if sim.poll() is not None:
            print(f"livestereo demo: the simulator exited with code {sim.returncode}", file=sys.stderr)
            return 1
        if time.monotonic() - t0 > 600:
            sim.kill()
            print("livestereo demo: the simulator did not start within 10 min", file=sys.stderr)
            return 1
        time.sleep(0.1)
    endpoint = endpoint_file.read_text().strip()
    cfg = DaemonConfig(endpoint=endpoint, output_dir=out, max_runs=1, idle_timeout_s=120.0,
                       record=None if args.no_record else out / "stream.lsrec")
    if cfg.record is not None:
        cfg.record.unlink(missing_ok=True)
    daemon = Daemon(cfg, ZmqStreamSource(endpoint, "pull", rcvhwm=cfg.rcvhwm))
    rc = daemon.run()
    sim_rc = sim.wait(timeout=120)
    print("\nlivestereo demo finished." + (" (simulator exit code %d)" % sim_rc if sim_rc else ""))
    print(f"results folder: {out.resolve()}")
    for path in sorted(set(daemon.writer.written)):
        print(f"  {path}")
    if truth.exists():
        print(f"  ground truth: {truth}")
    if cfg.record is not None and cfg.record.exists():
        print(f"  recording: {cfg.record} (replay: livestereo replay {cfg.record} --speed max)")
    return rc or sim_rc
