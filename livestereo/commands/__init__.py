"""One module per ``livestereo`` subcommand.

Each module defines ``NAME`` (the subcommand), ``HELP`` (one line), ``register(parser)``
(adds its arguments to the argparse subparser) and ``run(args) -> int`` (the exit code).
Heavy imports (torch, vispy, zmq) happen inside ``run`` so ``livestereo --help`` is quick.
"""

COMMANDS = (
    "simulate",
    "run",
    "record",
    "replay",
    "export",
    "layout",
    "reconstruct",
    "train",
    "calibrate",
    "view",
    "demo",
)
