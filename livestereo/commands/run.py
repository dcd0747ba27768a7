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

Dislocations are reconstructed live (rolling inference on the newest snapshot of the
scan in progress; stale snapshots are skipped, ingest never waits) and per finished scan
(group /dislocations of scan_NNNN.h5), and tracked through an in-situ series (track ids,
displacement in nm, velocity in nm/s). Segmented detectors give nanoparticles instead.
--publish sends snapshots and results to any client (README "Live results stream");
--view opens the live window in its own process.

examples:
  livestereo run                                   (tcp://127.0.0.1:5555, stereo pair)
  livestereo run --view                            (publish on tcp://127.0.0.1:5556 and open the window)
  livestereo run --publish tcp://0.0.0.0:5556 --thickness-nm 150 --material gamma-TiAl
  livestereo run --layout multiview --k 6 --output-dir results/
  livestereo run --config configs/daemon.toml --record today.lsrec
  livestereo run --source recording.lsrec          (offline, no socket)
  livestereo run --source merlin://127.0.0.1:6342 --set layout.radius_mrad=8
  livestereo run --source "dectris://10.0.0.5:31001?rest=80&arm=1&images=scan" --scan-shape 256 256
                                                   (arm a DECTRIS DCU over its SIMPLON API, then read the scan)
"""

log = logging.getLogger("livestereo.run")

DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="daemon config (TOML); see configs/daemon.toml")
    add_set_argument(p)
    p.add_argument("--endpoint", help="stream endpoint to connect to (default tcp://127.0.0.1:5555)")
    p.add_argument("--pattern", choices=("pull", "sub"), help="pull (lossless, default) or sub (watch a PUB stream)")
    p.add_argument("--source", help="another source instead of --endpoint: a file (recording, .npy, .h5, .mib), merlin://HOST:PORT "
                   "or dectris://HOST:PORT; DECTRIS options: ?rest=PORT (SIMPLON API) &arm=1 &trigger=1 &images=scan|N "
                   "&header_detail=basic &channel=NAME (README 'Real detectors')")
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
    p.add_argument("--publish", metavar="ENDPOINT", help="publish snapshots and results on this ZeroMQ endpoint (PUB, bound here), e.g. tcp://127.0.0.1:5556")
    p.add_argument("--view", action="store_true", help=f"open the live window in its own process (implies --publish, default {DEFAULT_PUBLISH})")
    p.add_argument("--no-inference", action="store_true", help="no dislocation reconstruction (acquisition and per-scan images only)")
    p.add_argument("--thickness-nm", type=float, help="foil thickness (nm); overrides the stream metadata's thickness_nm")
    p.add_argument("--material", help="material preset or TOML for the crystal frame of the lines; overrides the stream metadata's material")
    p.add_argument("--inference-threads", type=int, help="torch threads for the live networks (default 1: keeps a core for ingest)")


def build_config(args):
    from livestereo.config import load_toml, parse_config, set_dotted
    from livestereo.daemon.config import DaemonConfig

    overrides = parse_set_values(args.set)
    for key, value in (("endpoint", args.endpoint), ("pattern", args.pattern), ("layout.kind", args.layout),
                       ("layout.k", args.k), ("layout.radius_mrad", args.radius_mrad), ("layout.offset_mrad", args.offset_mrad),
                       ("output_dir", args.output_dir and str(args.output_dir)), ("record", args.record and str(args.record)),
                       ("max_runs", args.max_runs), ("idle_timeout_s", args.idle_timeout),
                       ("publish", getattr(args, "publish", None)), ("thickness_nm", getattr(args, "thickness_nm", None)),
                       ("material", getattr(args, "material", None)),
                       ("inference_threads", getattr(args, "inference_threads", None)),
                       ("inference", False if getattr(args, "no_inference", False) else None)):
        if value is not None:
            overrides[key] = value
    if args.config:
        cfg = load_toml(args.config, DaemonConfig, overrides)
    else:
        data: dict = {}
        for k, v in overrides.items():
            set_dotted(data, k, v)
        cfg = parse_config(data, DaemonConfig, "command line")
    if getattr(args, "view", False) and not cfg.publish:
        cfg = cfg.model_copy(update={"publish": DEFAULT_PUBLISH})
    return cfg


def make_analyses(cfg) -> list:
    """The analyses the daemon runs besides its own (nanoparticles): dislocations, unless
    switched off. Only this command layer may hand torch code to the daemon."""
    if not cfg.inference:
        return []
    from livestereo.inference.live import DislocationAnalysis

    return [DislocationAnalysis(cfg.output_dir, thickness_nm=cfg.thickness_nm, material=cfg.material,
                                threads=cfg.inference_threads, detector_weights=cfg.detector_weights,
                                stereo_weights=cfg.stereo_weights, detector_precision=cfg.detector_precision,
                                volume_precision=cfg.volume_precision,
                                track_max_distance_nm=cfg.track_max_distance_nm,
                                track_z_weight=cfg.track_z_weight, track_clock=cfg.track_clock,
                                min_interval_s=cfg.inference_interval_s)]


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
    try:
        daemon = Daemon(cfg, source, analyses=make_analyses(cfg))
    except OSError as exc:  # e.g. the publish endpoint is taken
        source.close()
        print(f"livestereo run: {exc}")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    viewer = None
    if args.view and daemon.publisher is not None:
        from livestereo.view.launch import launch_view

        endpoint = daemon.publisher.endpoint
        try:
            viewer = launch_view(endpoint, cfg.output_dir)
            log.info("live window started (pid %d) on %s", viewer.pid, endpoint)
        except Exception as exc:  # no display etc.: acquisition goes on
            log.error("could not start the live window: %s", exc)
    rc = daemon.run()
    if viewer is not None and viewer.poll() is None:
        from livestereo.view.launch import has_display, stop_view, wait_for_last_snapshot

        if has_display():
            log.info("the live window stays open (pid %d); close it when done", viewer.pid)
        else:  # headless snapshots: let it draw the last scan, then end it with the daemon
            wait_for_last_snapshot(viewer, cfg.output_dir, daemon.runs_ended)
            stop_view(viewer)
    for path in daemon.writer.written:
        print(f"result: {path}")
    return rc
