"""Nanoparticles from segmented-detector images: denoise, detect circles, 4-view line search, depth.

Pure compute (no zmq, torch or vispy). Entry points:

- ``reconstruct_particles(images (n_seg, ny, nx), valid (ny, nx), segment_angles_mrad (n_seg, 2),
  scan_step_nm, params) -> ParticleTable``
- ``calibrate_segment_angles(images_a, images_b, focus_change_nm, scan_step_nm) -> (n_seg, 2) mrad``
- ``write_particle_table(table, h5_path_or_group, csv_path)``
- ``load_particle_config(path) -> (ParticleParams, SegmentCalibration | None)`` (configs/particles.toml)
- ``resolve_segment_angles(n_segments, start_angles_mrad, calibration) -> (n_seg, 2) mrad``
"""

from livestereo.compute.particles.calibration import (
    SegmentCalibration,
    calibrate_segment_angles,
    load_segment_calibration,
    save_segment_calibration,
)
from livestereo.compute.particles.params import ParticleConfig, ParticleParams, load_particle_config
from livestereo.compute.particles.pipeline import reconstruct_particles, resolve_segment_angles, theory_sigma_z_nm
from livestereo.compute.particles.table import FLAGS, ParticleTable, read_particle_table, write_particle_table

__all__ = [
    "FLAGS",
    "ParticleConfig",
    "ParticleParams",
    "load_particle_config",
    "ParticleTable",
    "SegmentCalibration",
    "calibrate_segment_angles",
    "load_segment_calibration",
    "read_particle_table",
    "reconstruct_particles",
    "resolve_segment_angles",
    "save_segment_calibration",
    "theory_sigma_z_nm",
    "write_particle_table",
]
