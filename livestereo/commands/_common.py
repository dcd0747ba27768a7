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


def track_summary_lines(run_id: Any, tracks: list[dict[str, Any]]) -> list[str]:
    """Printable in-situ summary of one run: per track (LineTracker.summary() entries) its
    scans and mean speed per scan step, in-plane first (the 3D speed carries the lines'
    depth error, whose size per step, the z velocity's median 1-sigma, follows); the total
    displacement when there is no clock for speeds."""
    out = [f"  dislocations tracked in run {run_id} (mean speed per scan step; the 3D one "
           f"carries the depth error of the lines, the in-plane one does not):"]
    for t in tracks:
        speed, speed_xy = t.get("mean_speed_nm_s"), t.get("mean_speed_xy_nm_s")
        if speed is not None:
            text = f"in-plane {speed_xy:.1f} nm/s, 3D {speed:.1f} nm/s"
            sig = t.get("median_velocity_sigma_z_nm_s")
            if sig is not None:
                text += f" (z +/- {sig:.1f} nm/s per step)"
        elif len(t.get("scans", ())) > 1:
            text = ("displacement (x, y, z) " + ", ".join(f"{v:.1f}" for v in t["total_displacement_nm"])
                    + " nm (no clock for speeds)")
        else:
            text = "seen once"
        out.append(f"    track {t['track_id']}: scans {t['first_scan']}-{t['last_scan']}, {text}")
    return out
