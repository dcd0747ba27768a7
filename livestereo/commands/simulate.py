"""``livestereo simulate``: the built-in physics simulator as a stream source."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from livestereo.commands._common import add_set_argument, parse_rate, parse_set_values

NAME = "simulate"
HELP = "stream simulated 4D-STEM (or segmented) frames of dislocations in a foil over ZeroMQ, or write a recording"
DESCRIPTION = """\
Simulates a scan (or an in-situ series of repeated scans) of a foil with 3D dislocations as
a pixelated detector (a diffraction pattern per scan position) or a segmented detector
(N values per position) would record it, with Poisson noise at the chosen dose.

It binds a ZeroMQ socket and streams livestereo protocol v1 (start, frames, end); start
`livestereo run` (which connects) before or after it. Ground truth (3D curves in nm, line
masks, disparity maps, calibration) goes to --truth.

examples:
  livestereo simulate --config configs/sim_tial_insitu.toml --truth truth.h5
  livestereo simulate --set scan_shape=[128,128] --set repeat=5 --rate 2000
  livestereo simulate --config configs/sim_bench.toml --cycle 20 --rate max
  livestereo simulate --record sim.lsrec         (no socket: write a recording directly)
"""

log = logging.getLogger("livestereo.simulate")


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="simulation config (TOML); see configs/sim_*.toml")
    add_set_argument(p)
    p.add_argument("--particles", action="store_true", help="nanoparticles in ice (configs/sim_particles.toml) instead of dislocations")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="endpoint to bind (default %(default)s; 'tcp://127.0.0.1:*' for a free port)")
    p.add_argument("--pattern", choices=("push", "pub"), default="push", help="push: lossless, waits for the daemon (default); pub: broadcast")
    p.add_argument("--rate", type=parse_rate, default=None, metavar="HZ|max", help="frames per second, or 'max' (default max)")
    p.add_argument("--frames-per-message", type=int, default=None, metavar="N", help="frames per message (default from config; 1 = one frame per message)")
    p.add_argument("--cycle", type=int, default=None, metavar="SCANS", help="precompute scan 0 once and send it SCANS times (benchmarks: physics is not the limit)")
    p.add_argument("--run-id", default=None, help="run id (default: sim-<time>)")
    p.add_argument("--truth", type=Path, default=None, help="write ground truth (HDF5) here")
    p.add_argument("--record", type=Path, default=None, help="write a livestereo recording instead of streaming")
    p.add_argument("--endpoint-file", type=Path, default=None, help="write the bound endpoint to this file (for scripts using port '*')")


def make_simulator(args):
    overrides = parse_set_values(args.set)
    from livestereo.config import load_toml, parse_config

    if args.particles:
        from livestereo.sim.particles import ParticleSimConfig, ParticleSimulator

        cfg = load_toml(args.config, ParticleSimConfig, overrides) if args.config else parse_config(_unflatten(overrides), ParticleSimConfig, "--set")
        return ParticleSimulator(cfg), cfg
    from livestereo.sim.config import SimConfig
    from livestereo.sim.simulator import Simulator

    cfg = load_toml(args.config, SimConfig, overrides) if args.config else parse_config(_unflatten(overrides), SimConfig, "--set")
    return Simulator(cfg), cfg


def _unflatten(flat: dict) -> dict:
    from livestereo.config import set_dotted

    out: dict = {}
    for k, v in flat.items():
        set_dotted(out, k, v)
    return out


def scan_sources(sim, cfg, cycle: int | None):
    """(scan, chunks) pairs: generated per scan, or scan 0 precomputed (now, before the start
    message goes out, so a receiver never waits on it) and cycled."""
    fpm = getattr(cfg, "frames_per_message", 64)
    if cycle:
        frames = sim.precompute_scan(0)
        return ((scan, ((i, frames[i:i + fpm]) for i in range(0, len(frames), fpm))) for scan in range(cycle))
    return _generated_scans(sim, cfg.repeat)


def _generated_scans(sim, repeat: int):
    scan = 0
    while repeat == 0 or scan < repeat:
        yield scan, sim.scan_frames(scan)
        scan += 1


def run(args) -> int:
    sim, cfg = make_simulator(args)
    run_id = args.run_id or time.strftime("sim-%Y%m%d-%H%M%S")
    start = sim.start_message(run_id)
    if args.cycle:
        start = start.model_copy(update={"repeat": args.cycle})
    scans = scan_sources(sim, cfg, args.cycle)
    fpm = args.frames_per_message or getattr(cfg, "frames_per_message", 64)
    if args.truth:
        n_truth = args.cycle and 1 or (cfg.repeat or 1)
        sim.write_truth(args.truth, range(n_truth))
        print(f"ground truth: {args.truth}", flush=True)
    if args.record:
        return _write_recording(args.record, start, scans, fpm)

    from livestereo.transport.sender import StreamSender, stream_scans

    try:
        sender = StreamSender(args.endpoint, args.pattern)
    except ValueError as exc:  # a malformed endpoint or an address in use
        print(f"livestereo simulate: {exc}", file=sys.stderr)
        return 2
    print(f"simulator streaming run {run_id} on {sender.endpoint} ({args.pattern})", flush=True)
    if args.endpoint_file:
        args.endpoint_file.write_text(sender.endpoint)
    t0 = time.perf_counter()

    def scan_sent(scan, frames_sent):
        dt = time.perf_counter() - t0
        log.info("scan %d sent (%d frames, %.0f frames/s)", scan, frames_sent, frames_sent / dt if dt else 0)

    try:
        end = stream_scans(sender, start, scans, rate_hz=args.rate, frames_per_message=fpm, on_scan_sent=scan_sent)
    finally:
        sender.close()
    dt = time.perf_counter() - t0
    print(f"simulator done: {end.frames_sent} frames in {dt:.1f} s ({end.frames_sent / dt:.0f} frames/s), {end.reason}", flush=True)
    return 0


def _write_recording(path: Path, start, scans, fpm: int) -> int:
    from livestereo.protocol.codec import encode_end, encode_start, iter_frames_parts
    from livestereo.protocol.messages import EndMessage
    from livestereo.recording.format import RecordingWriter

    seq = frames = 0
    with RecordingWriter(path) as w:
        w.write(encode_start(start), time.time())
        for _scan, count, parts in iter_frames_parts(start, scans, fpm):
            w.write(parts, time.time())
            seq += 1
            frames += count
        w.write(encode_end(EndMessage(start.run_id, frames, "complete")), time.time())
    print(f"recording written: {path} ({frames} frames, {seq} messages)", flush=True)
    return 0
