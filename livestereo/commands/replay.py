"""``livestereo replay``: send a recording (or a 4D file) as a livestereo stream."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from livestereo.commands._common import parse_rate

NAME = "replay"
HELP = "replay a recording, .npy, HDF5 or .mib file as a livestereo stream (the daemon connects)"
DESCRIPTION = """\
Binds a socket and re-emits a recording's messages at the recorded pace (--speed 1), N
times faster (--speed N) or as fast as the daemon takes them (--speed max). A recording cut
short replays every complete record and says where it stopped. 4D files (.npy, HDF5
including DECTRIS master files, Merlin .mib) are recognised by content and streamed as one
scan; give their calibration with --calibration and the scan shape with --scan-shape when
the file does not carry them.

examples:
  livestereo replay today.lsrec --speed max
  livestereo replay scan.npy --calibration calib.toml --endpoint tcp://127.0.0.1:5556
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="recording or 4D file")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="endpoint to bind (default %(default)s)")
    p.add_argument("--pattern", choices=("push", "pub"), default="push")
    p.add_argument("--speed", type=parse_rate, default=1.0, metavar="1|N|max", help="pace relative to the recording (default 1; 'max' = as fast as taken)")
    p.add_argument("--calibration", type=Path, help="calibration TOML for 4D files")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("NY", "NX"))
    p.add_argument("--rate", type=parse_rate, default=None, metavar="HZ|max", help="frames/s for 4D files (default max)")


def run(args) -> int:
    from livestereo.daemon.sources import is_recording

    if not args.file.exists():
        print(f"livestereo replay: {args.file}: no such file", file=sys.stderr)
        return 2
    if is_recording(args.file):
        from livestereo.transport.replay import replay

        import zmq

        try:
            stats = replay(args.file, args.endpoint, speed=args.speed, pattern=args.pattern)
        except (ValueError, zmq.ZMQError) as exc:  # a malformed endpoint or an address in use
            print(f"livestereo replay: {exc}", file=sys.stderr)
            return 2
        print(stats)
        return 0
    from livestereo.daemon.sources import open_source_url
    from livestereo.transport.sender import StreamSender

    calibration = None
    if args.calibration:
        from livestereo.config import load_toml
        from livestereo.protocol.messages import Calibration

        calibration = load_toml(args.calibration, Calibration)
    try:
        source = open_source_url(str(args.file), calibration=calibration,
                                 scan_shape=tuple(args.scan_shape) if args.scan_shape else None)
    except ValueError as exc:
        print(f"livestereo replay: {exc}", file=sys.stderr)
        return 2
    try:
        sender = StreamSender(args.endpoint, args.pattern)
    except ValueError as exc:
        source.close()
        print(f"livestereo replay: {exc}", file=sys.stderr)
        return 2
    print(f"streaming {source.name} on {sender.endpoint}", flush=True)
    sent = errors = 0
    t0 = time.perf_counter()
    try:
        while True:
            try:
                item = source.receive(1.0)
            except EOFError:
                break
            if item is None:
                continue
            if item.error is not None:
                errors += 1
                print(f"skipped: {item.error}")
                continue
            if args.rate and hasattr(item.message, "data"):
                due = t0 + sent / args.rate
                if (d := due - time.perf_counter()) > 0:
                    time.sleep(d)
            sender.send(item.message)
            sent += getattr(item.message, "count", 0)
    finally:
        source.close()
        sender.close()
    print(f"streamed {sent} frames from {args.file} ({errors} bad items skipped)")
    return 0
