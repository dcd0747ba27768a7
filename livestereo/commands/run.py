"""``livestereo run``: the daemon."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from livestereo.commands._common import add_set_argument, parse_set_values

NAME = "run"
HELP = "the daemon: receive a frame stream, accumulate virtual stereo images per scan, write results"
DESCRIPTION = """\
Connects to a detector stream (livestereo protocol v1 over ZeroMQ by default; the source
binds, the daemon connects), accumulates one value per virtual detector and scan position
as frames arrive, and writes each finished scan to <output-dir>/<run id>/scan_NNNN.h5.
A status line (frames/s, GB/s, rejected, gaps, scans done) is printed every second.

The virtual detectors (the layout) are two counterpart regions of the bright-field disc by
default (the stereo pair). When the stream's start message does not give the disc centre
and radius, they are found from the first frames.

examples:
  livestereo run                                   (tcp://127.0.0.1:5555, stereo pair)
  livestereo run --layout multiview --k 6 --output-dir results/
  livestereo run --config configs/daemon.toml --record today.lsrec
  livestereo run --source recording.lsrec          (offline, no socket)
  livestereo run --source merlin://127.0.0.1:6342 --set layout.radius_mrad=8
"""

log = logging.getLogger("livestereo.run")


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="daemon config (TOML); see configs/daemon.toml")
    add_set_argument(p)
    p.add_argument("--endpoint", help="stream endpoint to connect to (default tcp://127.0.0.1:5555)")
    p.add_argument("--pattern", choices=("pull", "sub"), help="pull (lossless, default) or sub (watch a PUB stream)")
    p.add_argument("--source", help="another source instead of --endpoint: a file (recording, .npy, .h5, .mib), merlin://HOST:PORT or dectris://HOST:PORT")
    p.add_argument("--layout", choices=("stereo", "multiview", "bf_adf", "segments"), help="virtual detector layout (default stereo)")
    p.add_argument("--k", type=int, help="number of views for --layout multiview")
    p.add_argument("--radius-mrad", type=float, help="radius of each view region in the BF disc (mrad)")
    p.add_argument("--offset-mrad", type=float, help="distance of each region centre from the disc centre (mrad)")
    p.add_argument("--output-dir", type=Path, help="results folder (default results/)")
    p.add_argument("--record", type=Path, help="also record the raw stream to this file")
    p.add_argument("--max-runs", type=int, help="exit after this many runs have ended")
    p.add_argument("--idle-timeout", type=float, metavar="S", help="close a run silent for S seconds as sender_lost (default 10)")
    p.add_argument("--calibration", type=Path, help="calibration TOML for file or detector sources that carry none")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("NY", "NX"), help="scan shape for sources that do not carry it")


def build_config(args):
    from livestereo.config import load_toml, parse_config, set_dotted
    from livestereo.daemon.config import DaemonConfig

    overrides = parse_set_values(args.set)
    for key, value in (("endpoint", args.endpoint), ("pattern", args.pattern), ("layout.kind", args.layout),
                       ("layout.k", args.k), ("layout.radius_mrad", args.radius_mrad), ("layout.offset_mrad", args.offset_mrad),
                       ("output_dir", args.output_dir and str(args.output_dir)), ("record", args.record and str(args.record)),
                       ("max_runs", args.max_runs), ("idle_timeout_s", args.idle_timeout)):
        if value is not None:
            overrides[key] = value
    if args.config:
        return load_toml(args.config, DaemonConfig, overrides)
    data: dict = {}
    for k, v in overrides.items():
        set_dotted(data, k, v)
    return parse_config(data, DaemonConfig, "command line")


def open_source(args, cfg):
    """The source named by --source, else the livestereo stream at cfg.endpoint."""
    if args.source:
        from livestereo.daemon.sources import open_source_url

        calibration = None
        if args.calibration:
            from livestereo.config import load_toml
            from livestereo.protocol.messages import Calibration

            calibration = load_toml(args.calibration, Calibration)
        return open_source_url(args.source, calibration=calibration, scan_shape=tuple(args.scan_shape) if args.scan_shape else None)
    from livestereo.transport.zmq_source import ZmqStreamSource

    return ZmqStreamSource(cfg.endpoint, cfg.pattern, rcvhwm=cfg.rcvhwm)


def run(args) -> int:
    from livestereo.daemon.daemon import Daemon

    cfg = build_config(args)
    try:
        source = open_source(args, cfg)
    except (ValueError, OSError) as exc:
        print(f"livestereo run: {exc}")
        return 2
    daemon = Daemon(cfg, source)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    rc = daemon.run()
    for path in daemon.writer.written:
        print(f"result: {path}")
    return rc
