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
127.0.0.1; the daemon connects, accumulates the virtual stereo images live, runs the
dislocation networks on the partial images while each scan fills, reconstructs every
finished scan in 3D and tracks the dislocations from scan to scan, and publishes all of it
to the live window (its own process: a window on a display, PNG snapshots in
<out>/view/ without one). Per-scan results, the ground truth and a recording land in one
folder. It ends by itself and prints where everything is.
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="results folder (default %(default)s)")
    p.add_argument("--config", type=Path, default=None, help="simulation config (default configs/sim_tial_insitu.toml)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="override a simulation config key")
    p.add_argument("--no-record", action="store_true", help="do not keep a recording of the stream")
    p.add_argument("--no-view", action="store_true", help="no live window / snapshots")
    p.add_argument("--snapshots", action="store_true",
                   help="render the window headless to PNG files in <out>/view/ even when there is a display")


def _default_sim_config() -> Path | None:
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "configs" / "sim_tial_insitu.toml"
        if p.exists():
            return p
    return None


def run(args) -> int:
    from livestereo.commands.run import make_analyses
    from livestereo.daemon.config import DaemonConfig
    from livestereo.daemon.daemon import Daemon
    from livestereo.transport.zmq_source import ZmqStreamSource
    from livestereo.view.launch import launch_view, stop_view, wait_for_last_snapshot

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
                       record=None if args.no_record else out / "stream.lsrec",
                       publish=None if args.no_view else "tcp://127.0.0.1:*")
    if cfg.record is not None:
        cfg.record.unlink(missing_ok=True)
    daemon = Daemon(cfg, ZmqStreamSource(endpoint, "pull", rcvhwm=cfg.rcvhwm), analyses=make_analyses(cfg))
    view_dir = out / "view"
    viewer = None
    if daemon.publisher is not None:
        viewer = launch_view(daemon.publisher.endpoint, view_dir, log_path=out / "view.log",
                             snapshots="always" if args.snapshots else "auto")
        print(f"live window: pid {viewer.pid} on {daemon.publisher.endpoint} (log {out / 'view.log'})", flush=True)
    rc = daemon.run()
    sim_rc = sim.wait(timeout=120)
    if viewer is not None:
        wait_for_last_snapshot(viewer, view_dir, daemon.runs_ended)
        stop_view(viewer)
    print("\nlivestereo demo finished." + (" (simulator exit code %d)" % sim_rc if sim_rc else ""))
    print(f"results folder: {out.resolve()}")
    for path in sorted(set(daemon.writer.written)):
        print(f"  {path}")
    _print_tracks(daemon)
    if viewer is not None and view_dir.exists():
        pngs = sorted(view_dir.rglob("*.png"))
        if pngs:
            print(f"  live window snapshots: {view_dir} ({len(pngs)} PNG files, e.g. {pngs[-1].name})")
    if truth.exists():
        print(f"  ground truth: {truth}")
    if cfg.record is not None and cfg.record.exists():
        print(f"  recording: {cfg.record} (replay: livestereo replay {cfg.record} --speed max)")
    return rc or sim_rc


def _print_tracks(daemon) -> None:
    """The in-situ summary: each tracked dislocation's scans and mean speed."""
    from livestereo.commands._common import track_summary_lines

    for analysis in getattr(daemon, "analyses", []):
        summary_of = getattr(analysis, "run_summary", None)
        if summary_of is None:
            continue
        for run in daemon.runs_ended:
            summary = summary_of(run.get("run_id"))
            if not summary or not summary.get("tracks"):
                continue
            print("\n".join(track_summary_lines(run.get("run_id"), summary["tracks"])))
