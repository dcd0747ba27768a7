"""``livestereo train detector|stereo``: train a network on synthetic data and write its weights."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

NAME = "train"
HELP = "train the detection UNet or the stereo network on synthetic data (writes the shipped weights)"
DESCRIPTION = """\
Train a network on synthetic stereo data made from the simulator's physics and write its
weights (by default into the package: livestereo/weights/detector.pt, stereo.pt).

  livestereo train detector                 # configs/train_detector.toml
  livestereo train stereo                   # configs/train_stereo.toml (uses detector.pt)
  livestereo train detector --steps 50 --out /tmp/det.pt
  livestereo train stereo --resume          # continue from the last checkpoint
  livestereo train stereo --set use_detector=true --set init_weights=livestereo/weights/stereo.pt

Training is seeded and checkpointed every checkpoint_every steps; --resume continues from
the checkpoint with the same data stream.  Uses CUDA when present.
"""

_DEFAULT_CONFIGS = {"detector": "configs/train_detector.toml", "stereo": "configs/train_stereo.toml"}


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=("detector", "stereo"), help="which network to train")
    p.add_argument("--config", type=Path, default=None,
                   help="training config (TOML; default configs/train_<model>.toml)")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--resume", action="store_true", help="continue from the config's checkpoint file")
    p.add_argument("--out", type=Path, default=None, help="override the output weights file")
    p.add_argument("--checkpoint", type=Path, default=None, help="override the checkpoint file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (0: torch default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (dotted for tables, VALUE in TOML syntax), e.g. "
                   "--set use_detector=true --set synth.dose=[10,100]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from livestereo.config import load_toml
    from livestereo.inference import train as tr

    config = args.config or Path(_DEFAULT_CONFIGS[args.model])
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.out is not None:
        overrides["out"] = str(args.out)
    if args.checkpoint is not None:
        overrides["checkpoint"] = str(args.checkpoint)
    if args.threads is not None:
        overrides["threads"] = args.threads
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"livestereo train: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value.strip()  # a bare string
    model_cls = tr.DetectorTrainConfig if args.model == "detector" else tr.StereoTrainConfig
    cfg = load_toml(config, model_cls, overrides)
    fn = tr.train_detector if args.model == "detector" else tr.train_stereo
    result = fn(cfg, resume=args.resume, progress=not args.no_progress)
    print(f"{args.model}: {len(result['history'])} steps, final loss {result['final_loss']:.4f} (mean of the last 50), "
          f"{result['wall_s']:.0f} s; weights -> {result['out']}")
    return 0
