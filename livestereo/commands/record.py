"""``livestereo record``: record a stream without processing it."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "record"
HELP = "record a livestereo stream to a file (append-only, checksummed, crash-safe)"
DESCRIPTION = """\
Connects to a stream and appends every message, with its receive time and a checksum, to
a livestereo recording. Bad messages are kept too. Stops after the run's end message (or
--timeout seconds of silence). Replay it with `livestereo replay`; open it elsewhere after
`livestereo export`. To record while processing, use `livestereo run --record FILE`.

example:
  livestereo record --endpoint tcp://127.0.0.1:5555 -o today.lsrec
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, help="recording file to write (refuses to overwrite)")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="stream endpoint to connect to (default %(default)s)")
    p.add_argument("--pattern", choices=("pull", "sub"), default="pull")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S seconds without a message")
    p.add_argument("--runs", type=int, default=1, help="stop after this many runs ended (0: until --timeout or Ctrl-C)")


def run(args) -> int:
    from livestereo.transport.record import record

    stats = record(args.endpoint, args.output, pattern=args.pattern, idle_timeout_s=args.timeout,
                   max_runs=args.runs or None)
    print(stats)
    return 0
