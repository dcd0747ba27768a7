"""Physics-based 4D-STEM simulator (pure: no zmq, torch or vispy).

- :mod:`livestereo.sim.config`: :class:`SimConfig` (``configs/sim_*.toml``);
- :mod:`livestereo.sim.materials`: lattice parameters and glide systems of the presets;
- :mod:`livestereo.sim.scene`: foils with dislocations (:func:`make_scene`, :func:`advance`);
- :mod:`livestereo.sim.render`: noise-free virtual views and truth maps (:func:`render_views`,
  :func:`line_masks`, :func:`height_map`, :func:`disparity_map`), reusable for training data;
- :mod:`livestereo.sim.pixelated`, :mod:`livestereo.sim.segmented`: detector models;
- :mod:`livestereo.sim.simulator`: :class:`Simulator` (start message, frames, truth);
- :mod:`livestereo.sim.truth`: HDF5 ground truth files.
"""

from livestereo.sim.config import SimConfig
from livestereo.sim.render import disparity_map, height_map, line_masks, render_views
from livestereo.sim.scene import Dislocation, Scene, advance, make_scene
from livestereo.sim.simulator import Simulator

__all__ = [
    "SimConfig", "Simulator", "Scene", "Dislocation", "make_scene", "advance",
    "render_views", "line_masks", "height_map", "disparity_map",
]
