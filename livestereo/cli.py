"""The ``livestereo`` command: one subcommand per module in livestereo.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from livestereo import __version__
from livestereo.commands import COMMANDS
from livestereo.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livestereo",
        description="Live tilt-less stereo 3D imaging beside a STEM: stream detector frames, "
        "accumulate virtual stereo images, reconstruct dislocations and nanoparticles in 3D.",
    )
    parser.add_argument("--version", action="version", version=f"livestereo {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"livestereo.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"livestereo.commands.{name}":
                continue  # not built yet
            raise
        p = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.register(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"livestereo {args.command}: bad config:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"livestereo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
