"""``livestereo export``: a recording as an HDF5 4D array for other tools."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "export"
HELP = "export a recording to an HDF5 4D array (scan_y, scan_x, det_y, det_x) for LiberTEM, py4DSTEM, HyperSpy"
DESCRIPTION = """\
Writes the frames of one scan (default scan 0) as /data (scan_y, scan_x, det_y, det_x) in
the frames' dtype, with /valid marking positions that were received, and the calibration
as attributes. --all-scans writes /scan_NNNN/data for every scan of an in-situ series.

example:
  livestereo export today.lsrec -o today.h5
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("recording", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--scan", type=int, default=0, help="scan to export (default 0)")
    p.add_argument("--all-scans", action="store_true", help="export every scan of the series")
    p.add_argument("--compression", choices=("gzip", "lzf", "bitshuffle", "lz4", "zstd", "blosc"), default=None)


def run(args) -> int:
    from livestereo.recording.export import export_hdf5
    from livestereo.recording.format import RecordingError

    try:
        summary = export_hdf5(args.recording, args.output, scan=args.scan, all_scans=args.all_scans, compression=args.compression)
    except (RecordingError, ValueError, OSError) as exc:
        print(f"livestereo export: {exc}")
        return 2
    print(summary)
    return 0
