"""``livestereo view``: the live window on the daemon's results stream."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

NAME = "view"
HELP = "live window: images with detected dislocations, 3D lines in the foil, status (headless: PNG snapshots)"
DESCRIPTION = """\
Connects to the results stream a daemon publishes (`livestereo run --publish ENDPOINT`, or
`livestereo run --view`, which starts this window itself) and shows: the mean diffraction
pattern with the virtual detector regions, each virtual image with the detected
dislocations (magenta) and the unscanned part hatched, a 3D view of the reconstructed lines
coloured by depth inside the foil box with the microscope (and, when known, crystal) axes,
particles for segmented runs, per-dislocation velocities for in-situ series and a status
line (frames/s, messages dropped by this window, latency). It can attach to a running daemon
or a replay at any time; closing or killing it never disturbs acquisition.

Without a display (no DISPLAY / WAYLAND_DISPLAY), or with --snapshot-dir, it renders
offscreen (EGL, no GPU needed) and writes PNG files: latest.png (every
--snapshot-interval seconds while something changes, and on exit) and scan_NNNN.png
after each scan.

examples:
  livestereo view                                          # the daemon on this machine (tcp://127.0.0.1:5556)
  livestereo view --connect tcp://daq-pc:5556 --size 1600x1000
  livestereo view --snapshot-dir shots --exit-when-idle 5  # headless, ends when the stream stops
  livestereo view --benchmark 60                           # updates per second on this machine
"""

log = logging.getLogger("livestereo.view")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1280x800, not {text!r}") from None
    if not (64 <= w <= 8192 and 64 <= h <= 8192):
        raise argparse.ArgumentTypeError("width and height must be 64...8192")
    return w, h


def register(p: argparse.ArgumentParser) -> None:
    from livestereo.view.launch import DEFAULT_ENDPOINT

    p.add_argument("--connect", default=DEFAULT_ENDPOINT, metavar="ENDPOINT",
                   help=f"the daemon's results stream (default {DEFAULT_ENDPOINT})")
    p.add_argument("--snapshot-dir", type=Path, metavar="DIR",
                   help="render headless and write PNG snapshots here (the default without a display: ./livestereo-view)")
    p.add_argument("--snapshot-interval", type=float, default=2.0, metavar="S",
                   help="at most one latest.png per S seconds while something changes (default 2)")
    p.add_argument("--size", type=_size, default=(1280, 800), metavar="WxH", help="window size (default 1280x800)")
    p.add_argument("--rate", type=float, default=20.0, metavar="HZ", help="update rate (default 20)")
    p.add_argument("--max-seconds", type=float, metavar="S", help="close after S seconds")
    p.add_argument("--exit-after-scans", type=int, metavar="N", help="close once N scans have ended (and been drawn)")
    p.add_argument("--exit-when-idle", type=float, metavar="S",
                   help="close when nothing has arrived for S seconds (after the first message): the run is over")
    p.add_argument("--benchmark", type=int, metavar="N", nargs="?", const=60,
                   help="measure updates per second with N synthetic scans (2 views 256x256 + 3D lines), headless")


def run(args) -> int:
    from livestereo.view.app import ViewError, benchmark, has_display, run_headless, run_interactive

    try:
        if args.benchmark:
            r = benchmark(args.benchmark, size=args.size)
            print(f"{r['updates_per_s']:.1f} updates/s (each: 2 new 256x256 views + overlays + 3D lines, "
                  f"composed in {r['compose_ms']:.1f} ms, uploaded and rendered headless); "
                  f"redraw alone {r['draw_only_per_s']:.1f}/s")
            return 0
        headless = args.snapshot_dir is not None or not has_display()
        if headless:
            snap = args.snapshot_dir or Path("livestereo-view")
            if args.snapshot_dir is None:
                log.info("no display: rendering headless, snapshots in %s", snap.resolve())
            return run_headless(args.connect, snap, size=args.size, snapshot_interval_s=args.snapshot_interval,
                                max_seconds=args.max_seconds, exit_after_scans=args.exit_after_scans,
                                exit_when_idle_s=args.exit_when_idle, rate_hz=args.rate)
        return run_interactive(args.connect, size=args.size, max_seconds=args.max_seconds, rate_hz=args.rate)
    except ViewError as exc:
        print(f"livestereo view: {exc}", file=sys.stderr)
        return 1
