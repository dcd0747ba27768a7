"""Helpers shared by subcommands: --set overrides and value parsing."""

from __future__ import annotations

import argparse
import json
from typing import Any


def parse_set_values(pairs: list[str] | None) -> dict[str, Any]:
    """['a.b=3', 'c=[1,2]'] -> {'a.b': 3, 'c': [1, 2]} (values parsed as JSON, else kept as text)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config key (dotted for tables, e.g. layout.k=4); repeatable")


def parse_rate(text: str) -> float | None:
    """'max' -> None (as fast as possible), else a positive number."""
    if text.lower() in ("max", "inf", "0"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"rate must be positive or 'max', got {text!r}")
    return value
