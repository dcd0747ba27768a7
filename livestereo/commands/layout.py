"""``livestereo layout``: propose virtual detector regions for the best depth precision."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "layout"
HELP = "propose the region radius, offset and number of views that minimise the expected depth error"
DESCRIPTION = """\
Small regions of the bright-field disc give sharp but noisy views; large ones are bright
but blurred by (angular extent x height). For a foil of the given thickness (focused
mid-foil) and dose, this scans region radius, offset and the number of views K and prints
the stereo angle, the blur at the foil surfaces and the expected depth precision.

examples:
  livestereo layout --alpha-mrad 30 --thickness-nm 200 --scan-step-nm 1 --dose 100
  livestereo layout --calibration calib.toml --thickness-nm 120 --dose 20 --k 2 3 4 6
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha-mrad", type=float, help="convergence semi-angle (mrad)")
    p.add_argument("--scan-step-nm", type=float, help="scan step (nm)")
    p.add_argument("--calibration", type=Path, help="calibration TOML giving alpha and scan step")
    p.add_argument("--thickness-nm", type=float, required=True, help="foil thickness (nm)")
    p.add_argument("--dose", type=float, required=True, metavar="E_PER_A2", help="dose (electrons per square angstrom)")
    p.add_argument("--k", type=int, nargs="+", default=[2], help="numbers of views to consider (default 2)")
    p.add_argument("--line-width-nm", type=float, default=2.0, help="apparent dislocation line width (nm)")
    p.add_argument("--contrast", type=float, default=0.2, help="line contrast (fraction of the background)")


#: propose_layout's argument names -> the options that set them (for error messages)
_FLAGS = {"alpha_mrad": "--alpha-mrad", "thickness_nm": "--thickness-nm", "scan_step_nm": "--scan-step-nm",
          "dose_e_per_A2": "--dose", "line_width_nm": "--line-width-nm", "contrast": "--contrast", "k_values": "--k"}


def run(args) -> int:
    from livestereo.compute.advisor import format_proposal, propose_layout

    alpha, step = args.alpha_mrad, args.scan_step_nm
    if args.calibration:
        from livestereo.config import load_toml
        from livestereo.protocol.messages import Calibration

        cal = load_toml(args.calibration, Calibration)
        alpha = alpha or cal.convergence_semiangle_mrad
        step = step or cal.scan_step_nm
    if alpha is None or step is None:
        print("livestereo layout: give --alpha-mrad and --scan-step-nm, or --calibration", file=sys.stderr)
        return 2
    try:
        proposal = propose_layout(alpha, args.thickness_nm, step, args.dose, k_values=tuple(args.k),
                                  line_width_nm=args.line_width_nm, contrast=args.contrast)
    except ValueError as exc:
        message = str(exc)
        for name, flag in _FLAGS.items():
            message = message.replace(name, flag)
        print(f"livestereo layout: {message}", file=sys.stderr)
        return 2
    print(format_proposal(proposal))
    return 0
