"""Synthetic training and evaluation data for the dislocation networks (pure numpy, no torch).

The physics is the simulator's forward model (design.md section 1): dislocations are 3D
curves in a foil of thickness t; the view of incident angle theta sees a feature at height dz
(above the probe crossover) at scan position r - theta*dz (E1/E2); a virtual detector region
of angular radius r_s blurs it by ~r_s*|dz| (E3); two views A, B see it at positions whose
difference is (theta_B - theta_A)*dz (E4).  Views are rendered by projecting densely sampled
curve points with E1 and splatting a 2D Gaussian line profile, with signed, per-view contrast.

- :func:`make_pair` renders a stereo pair directly in the *rectified* frame (baseline
  theta_B - theta_A along +x), with per-view centre-line masks and the disparity map of
  view A (x_A - x_B in px, NaN off the lines).
- :func:`make_views` renders K views at arbitrary incident angles and returns the 3D curves.
- :func:`normalise_view` is the robust per-view normalisation the networks expect.
- :func:`line_snr_of_points` says how visible a line is (matched-filter SNR per pixel of
  line length); ``make_views(..., line_snr=True)`` maps it along the true centre lines.
"""

from livestereo.synth.generate import (
    SynthParams,
    line_snr_of_points,
    make_batch,
    make_pair,
    make_views,
    render_curves,
    sample_scene,
)
from livestereo.synth.normalise import normalise_view

__all__ = ["SynthParams", "line_snr_of_points", "make_batch", "make_pair", "make_views", "normalise_view", "render_curves", "sample_scene"]
