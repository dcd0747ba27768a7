"""Nanoparticles in segmented runs: live on snapshots, final per scan into the results.

For a run whose virtual detectors are detector segments, every snapshot (newest wins) and
every finished scan go through ``reconstruct_particles``; the finished scan's table is
written into ``scan_NNNN.h5`` (group ``/particles``) and ``scan_NNNN_particles.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from livestereo.compute.particles.calibration import SegmentCalibration
from livestereo.compute.particles.params import ParticleParams, load_particle_config
from livestereo.compute.particles.pipeline import reconstruct_particles, resolve_segment_angles
from livestereo.compute.particles.table import ParticleTable, write_particle_table
from livestereo.daemon.products import ScanImages

log = logging.getLogger("livestereo.particles")


class ParticleAnalysis:
    """Particle reconstruction for segmented runs (``applies`` says which results qualify);
    an analysis of the daemon (see livestereo.daemon.daemon)."""

    name = "particles"

    def __init__(self, output_dir: Path, config_path: Path | None = None):
        self.output_dir = Path(output_dir)
        self.params: ParticleParams = ParticleParams()
        self.calibration: SegmentCalibration | None = None
        if config_path is not None:
            self.params, self.calibration = load_particle_config(config_path)
        self.tables: dict[tuple[str, int], ParticleTable] = {}

    @staticmethod
    def applies(result: ScanImages) -> bool:
        roles = result.layout.roles
        return len(roles) >= 2 and all(r == "segment" for r in roles)

    def analyse(self, result: ScanImages) -> ParticleTable:
        n_seg = len(result.layout.roles)
        start_angles = result.calibration.segment_angles_mrad
        angles = resolve_segment_angles(n_seg, start_angles, self.calibration)
        return reconstruct_particles(result.images, result.valid, angles, result.calibration.scan_step_nm, self.params)

    def on_scan(self, result: ScanImages) -> ParticleTable | None:
        """The finished scan's particle table (:meth:`write_result` writes it)."""
        if not self.applies(result):
            return None
        try:
            table = self.analyse(result)
        except ValueError as exc:
            log.warning("run %s scan %d: no particle reconstruction: %s", result.run_id, result.scan, exc)
            return None
        self.tables[(result.run_id, result.scan)] = table
        return table

    def write_result(self, result: ScanImages, table: ParticleTable, h5_path: Path) -> None:
        """The table into the scan's HDF5 file (group ``/particles``) and a CSV beside it."""
        csv_path = h5_path.with_name(h5_path.stem + "_particles.csv")
        with h5py.File(h5_path, "a") as f:
            write_particle_table(table, f.require_group("particles"), csv_path)
        flagged = int(np.count_nonzero(table.flags))
        log.info("run %s scan %d: %d particles (%d flagged), z from %.1f to %.1f nm -> %s",
                 result.run_id, result.scan, len(table), flagged,
                 float(table.z_nm.min()) if len(table) else float("nan"),
                 float(table.z_nm.max()) if len(table) else float("nan"), csv_path)

    @staticmethod
    def on_result(snap: ScanImages, table: ParticleTable, latency_s: float) -> None:
        log_live(snap, table, latency_s)

    @staticmethod
    def message(snap: ScanImages, table: ParticleTable, latency_s: float):
        from livestereo.daemon.live import particles_message

        return particles_message(snap, table, latency_s)

    @staticmethod
    def scan_summary(scan: ScanImages, table: ParticleTable) -> dict:
        return {"n_particles": len(table), "flagged": int(np.count_nonzero(table.flags))}


def log_live(snap: ScanImages, table: ParticleTable, latency_s: float) -> None:
    log.debug("live particles run %s scan %d (%.0f%% filled): %d in %.0f ms",
              snap.run_id, snap.scan, 100 * snap.fill_fraction, len(table), 1e3 * latency_s)
