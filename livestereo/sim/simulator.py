"""The simulated 4D-STEM source: start message, frames of every scan, ground truth.

>>> sim = Simulator(SimConfig(scan_shape=(32, 32)))
>>> start = sim.start_message("run-1")
>>> for first, frames in sim.scan_frames(0):   # frames (count, *start.item_shape), cfg.dtype
...     pass

Everything is deterministic given ``cfg.seed``: the scene (seed stream 0), the motion between
scans (stream 1, per scan), the scan jitter (stream 2, per scan) and the counting noise
(stream 3, per scan and per frame, so any chunking gives the same frames).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from livestereo.protocol.messages import PROTOCOL_VERSION, Calibration, StartMessage
from livestereo.sim.config import SimConfig
from livestereo.sim.pixelated import PixelatedModel, pixelated_frames, pixelated_model
from livestereo.sim.render import render_views
from livestereo.sim.scene import Scene, advance, make_scene, translate
from livestereo.sim.segmented import SegmentedModel, segmented_frames, segmented_model
from livestereo.sim.truth import scene_truth
from livestereo.sim.truth import write_truth as _write_truth


def half_disc_centroid_mrad(alpha_mrad: float) -> float:
    """Centroid distance of a half disc of radius alpha: 4 alpha / (3 pi) (mrad)."""
    return 4.0 * alpha_mrad / (3.0 * math.pi)


class Simulator:
    """A deterministic simulated source for one :class:`SimConfig`."""

    def __init__(self, cfg: SimConfig):
        self.cfg = cfg
        self._scenes: dict[int, Scene] = {0: make_scene(cfg, self._rng(0))}
        self.model: PixelatedModel | SegmentedModel
        if cfg.detector == "pixelated":
            self.model = pixelated_model(cfg)
            self.item_shape: tuple[int, ...] = tuple(cfg.frame_shape)
        else:
            self.model = segmented_model(cfg)
            self.item_shape = (cfg.n_segments,)
        self._views: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------------------ randomness
    def _rng(self, stream: int, scan: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, stream, scan])

    def _seed_base(self, scan: int) -> int:
        return int(np.random.SeedSequence([self.cfg.seed, 3, scan]).generate_state(1, np.uint32)[0])

    # ----------------------------------------------------------------------------------- scene
    @property
    def n_positions(self) -> int:
        """Scan positions per scan (ny * nx)."""
        return self.cfg.scan_shape[0] * self.cfg.scan_shape[1]

    def _physical_scene(self, scan: int) -> Scene:
        if scan < 0:
            raise ValueError(f"scan must be >= 0, got {scan}")
        if scan not in self._scenes:
            k = max(s for s in self._scenes if s < scan)
            scene = self._scenes[k]
            for s in range(k + 1, scan + 1):
                scene = advance(scene, 1, self.cfg, self._rng(1, s))
                self._scenes[s] = scene
        return self._scenes[scan]

    def scene_at(self, scan: int) -> Scene:
        """The scene seen by scan ``scan`` (0-based): dislocations moved by the in-situ motion
        and the sample shifted by the drift (``drift_nm_per_scan`` x scan)."""
        dx, dy = self.cfg.drift_nm_per_scan
        return translate(self._physical_scene(scan), (dx * scan, dy * scan))

    def row_offsets_nm(self, scan: int) -> np.ndarray:
        """(ny, 2) scan jitter (x, y) (nm) of each row of scan ``scan``."""
        ny = self.cfg.scan_shape[0]
        if self.cfg.jitter_nm <= 0:
            return np.zeros((ny, 2))
        return self._rng(2, scan).normal(0.0, self.cfg.jitter_nm, (ny, 2))

    @property
    def stereo_thetas_mrad(self) -> np.ndarray:
        """(2, 2) default stereo pair (theta_x, theta_y) (mrad) of views A and B used by the truth:
        the left / right half-disc centroids (pixelated) or the effective angles of segment 0 and
        the opposite segment N // 2 (segmented)."""
        if self.cfg.detector == "segmented" and self.cfg.n_segments >= 2:
            eff = self.model.effective_mrad  # type: ignore[union-attr]
            return np.array([eff[0], eff[self.cfg.n_segments // 2]], dtype=np.float64)
        c = half_disc_centroid_mrad(self.cfg.convergence_semiangle_mrad)
        return np.array([[-c, 0.0], [c, 0.0]])

    # ---------------------------------------------------------------------------------- frames
    def bin_views(self, scan: int) -> np.ndarray:
        """(n_positions, n_bins) float32 noise-free transmission of every angle bin at every scan
        position of scan ``scan`` (the last scan's result is cached)."""
        if self._views is not None and self._views[0] == scan:
            return self._views[1]
        cfg = self.cfg
        v = render_views(self.scene_at(scan), self.model.bin_thetas_mrad, cfg.scan_shape, cfg.scan_step_nm,
                         row_offsets_nm=self.row_offsets_nm(scan))
        views = np.ascontiguousarray(v.reshape(v.shape[0], -1).T)
        self._views = (scan, views)
        return views

    def frames(self, scan: int, first: int, count: int) -> np.ndarray:
        """Frames (count, *item_shape) ``cfg.dtype`` of flat positions first .. first+count-1 of a scan."""
        if first < 0 or count < 0 or first + count > self.n_positions:
            raise ValueError(f"positions {first}..{first + count} outside the scan of {self.n_positions}")
        views = self.bin_views(scan)
        if isinstance(self.model, PixelatedModel):
            return pixelated_frames(self.model, views, first, count, self._seed_base(scan), self.cfg.dtype)
        return segmented_frames(self.model, views, first, count, self._seed_base(scan), self.cfg.dtype)

    def scan_frames(self, scan: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first flat index, frames (count, *item_shape) cfg.dtype) in chunks of
        ``frames_per_message`` covering scan ``scan`` in order."""
        n, step = self.n_positions, self.cfg.frames_per_message
        for first in range(0, n, step):
            yield first, self.frames(scan, first, min(step, n - first))

    def precompute_scan(self, scan: int = 0) -> np.ndarray:
        """All frames of one scan (n_positions, *item_shape) cfg.dtype (equal to the chunks of scan_frames)."""
        return self.frames(scan, 0, self.n_positions)

    # ------------------------------------------------------------------------- messages, truth
    def calibration(self) -> Calibration:
        """The calibration a start message carries."""
        cfg = self.cfg
        pix = cfg.detector == "pixelated"
        send = pix and cfg.send_disc_calibration
        seg = None
        if not pix:
            seg = tuple((float(a), float(b)) for a, b in self.model.effective_mrad)  # type: ignore[union-attr]
        return Calibration(
            convergence_semiangle_mrad=cfg.convergence_semiangle_mrad, scan_step_nm=cfg.scan_step_nm,
            mrad_per_px=cfg.mrad_per_px if pix else None,
            disc_center_px=cfg.center_px if send else None,
            disc_radius_px=cfg.disc_radius_px if send else None,
            scan_rotation_deg=cfg.scan_rotation_deg, high_tension_kv=cfg.high_tension_kv,
            segment_angles_mrad=seg, frame_time_s=cfg.frame_time_s,
        )

    def metadata(self) -> dict[str, Any]:
        """Sample and simulation description (msgpack / JSON serialisable)."""
        cfg = self.cfg
        s0 = self._scenes[0]
        md: dict[str, Any] = {
            "source": "livestereo.sim",
            "material": cfg.material,
            "thickness_nm": cfg.thickness_nm,
            "zone_axis": list(cfg.zone_axis),
            "g_hkl": list(s0.g_hkl),
            "foil_tilt_mrad": list(cfg.foil_tilt_mrad),
            "focus_nm": cfg.focus_nm,
            "seed": cfg.seed,
            "n_dislocations": len(s0.dislocations),
            "dose_e_per_A2": cfg.dose_e_per_A2,
            "electrons_per_position": cfg.electrons_per_position,
            "glide_velocity_nm_per_scan": cfg.glide_velocity_nm_per_scan,
            "drift_nm_per_scan": list(cfg.drift_nm_per_scan),
            "stereo_thetas_mrad": self.stereo_thetas_mrad.tolist(),
            "sim_config": cfg.model_dump(mode="json"),
        }
        if isinstance(self.model, SegmentedModel):
            md["segment_geometric_angles_mrad"] = self.model.geometric_mrad.tolist()
        return md

    def start_message(self, run_id: str) -> StartMessage:
        """The start message of a run of this simulation."""
        cfg = self.cfg
        pix = cfg.detector == "pixelated"
        return StartMessage(
            version=PROTOCOL_VERSION, run_id=run_id, detector=cfg.detector, scan_shape=tuple(cfg.scan_shape),
            frame_shape=tuple(cfg.frame_shape) if pix else None, n_segments=None if pix else cfg.n_segments,
            dtype=cfg.dtype, repeat=cfg.repeat, calibration=self.calibration(), metadata=self.metadata(),
        )

    def truth(self, scan: int) -> dict[str, Any]:
        """Ground truth of scan ``scan``: ``ids``, ``kinds``, ``curves`` (list of (n, 3) nm arrays),
        ``height_nm`` (ny, nx), ``line_mask`` (2, ny, nx), ``disparity_px`` (ny, nx, 2) for the
        default stereo pair ``stereo_thetas_mrad`` (2, 2), ``calibration`` (dict), ``scan``."""
        cfg = self.cfg
        t = scene_truth(self.scene_at(scan), cfg.scan_shape, cfg.scan_step_nm, self.stereo_thetas_mrad)
        t["scan"] = int(scan)
        t["calibration"] = self.calibration().model_dump()
        return t

    def write_truth(self, path: str | Path, scans: Iterable[int]) -> None:
        """HDF5 truth of the given scans (layout in livestereo.sim.truth)."""
        _write_truth(path, (self.truth(s) for s in scans), self.calibration().model_dump(), self.metadata())
