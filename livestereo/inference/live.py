"""Dislocations in the live daemon: rolling inference on snapshots, final reconstruction
and in-situ tracking per finished scan.

:class:`DislocationAnalysis` is an analysis of :class:`livestereo.daemon.daemon.Daemon`
(``livestereo run`` injects it; the daemon package itself never imports torch):

- ``analyse(snapshot)`` runs in the daemon's latest-wins worker on the newest snapshot:
  the filled rows of the current scan go through the same :func:`process_viewset` as
  ``livestereo reconstruct``; the lines get provisional track ids (matched against the
  tracks of the completed scans, without changing them). The run's first snapshot also
  prepares the networks for its full scans (frozen graphs, ``DislocationPipeline.warm``);
  a snapshot's analysis that a finished scan overtakes is given up (it is stale, and the
  CPU goes to the finished scan);
- ``on_scan(scan)`` runs in the results writer on each finished scan: reconstruction,
  tracking (stable track ids, displacement, velocity), and group ``/dislocations`` of
  ``scan_NNNN.h5`` (layout below). Live snapshots wait meanwhile.

``/dislocations`` in ``scan_NNNN.h5``: what :meth:`DislocationResult.write_hdf5` writes
(attrs, ``thetas_mrad``, ``lines/NNNN/...``, ``crystal``; each line group also gets the
attr ``track_id``), ``maps/prob`` (K, ny, nx), ``maps/disparity``, ``maps/sigma_disparity``,
``maps/dz_nm`` (ny, nx) float32, ``view_indices`` (K,) (detectors of ``/images`` used as
views), and ``tracks``: datasets ``line_id``, ``track_id`` (L,) int64, ``status`` (L,) str
("new" | "continued" | "fragment"), ``displacement_nm`` and ``velocity_nm_s`` (L, 3) float64 (NaN for
new tracks), ``speed_nm_s``, ``speed_xy_nm_s``, ``velocity_sigma_z_nm_s``, ``dt_s``, ``distance_nm`` (L,); attrs ``time_s`` (the scan's
mid-time), ``clock`` ("frames" | "wall"), ``max_distance_nm``, ``z_weight``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from livestereo.compute.tracking import LineTracker, TrackStep, steps_json, warm_kernels, write_tracks_hdf5
from livestereo.config import ConfigError
from livestereo.daemon.live import bin_max, binning_for, ids_of, MAX_IMAGE_SIDE
from livestereo.daemon.products import ScanImages
from livestereo.daemon.worker import Retry
from livestereo.inference.analysis import Cancelled, ViewSet, crystal_from, meta_get, process_viewset

log = logging.getLogger("livestereo.dislocations")


@dataclasses.dataclass
class DislocationOutcome:
    """One analysis of a snapshot or a finished scan."""

    result: Any
    """livestereo.compute.dislocations.DislocationResult."""
    maps: dict[str, np.ndarray | None]
    seconds: dict[str, float]
    view_indices: list[int]
    thickness_nm: float
    track_ids: list[int | None]
    """Per line: the track id (final) or the provisional one (snapshot; None: no match)."""
    displacements_nm: list[np.ndarray | None]
    steps: list[TrackStep] | None = None
    """Final scans: the tracking step of every line."""
    time_s: float | None = None
    clock: str | None = None


def scan_time(scan: ScanImages, clock: str = "auto") -> tuple[float, str]:
    """(mid-time of the scan in s, clock used): "frames" = (scan + 0.5) x positions x
    frame_time_s (back-to-back scans, the acquisition clock); "wall" = middle of the scan's
    arrival (stats started / finished, s since the epoch)."""
    ft = scan.calibration.frame_time_s
    if clock == "frames" or (clock == "auto" and ft):
        if not ft:
            raise ValueError("track_clock = 'frames' needs frame_time_s in the calibration")
        n = scan.valid.size
        return (scan.scan + 0.5) * n * float(ft), "frames"
    st = scan.stats
    a, b = st.get("started"), st.get("finished")
    if a is None:
        raise ValueError("the scan has no start time")
    return (0.5 * (a + b) if b is not None else float(a)), "wall"


class DislocationAnalysis:
    """Live and per-scan 3D dislocation reconstruction with in-situ tracking (see module doc).

    Args:
        output_dir: the daemon's results folder.
        thickness_nm, material: used when given, else the start metadata's ``thickness_nm``
            / ``material`` (and ``zone_axis``, ``g``, ``g_angle_deg`` for the orientation).
        threads: torch threads (``torch.set_num_threads``), keep a core for ingest.
        detector_weights, stereo_weights: weight files (None: the shipped ones).
        detector_precision, volume_precision: "auto" | "float32" | "bfloat16"
            (DislocationPipeline.load).
        pipeline: an already built pipeline (tests); None: loaded once in :meth:`prepare`.
        min_rows: snapshots with fewer filled rows are not analysed.
        min_interval_s: least time between two live analyses (the daemon's worker honours it).
    """

    name = "dislocations"

    def __init__(self, output_dir: Path, *, thickness_nm: float | None = None, material: str | None = None,
                 threads: int = 1, detector_weights: Path | None = None, stereo_weights: Path | None = None,
                 track_max_distance_nm: float = 8.0, track_z_weight: float = 0.25, track_clock: str = "auto",
                 line_params=None, pipeline=None, min_rows: int = 8, min_interval_s: float = 0.0,
                 detector_precision: str = "auto", volume_precision: str = "auto"):
        self.output_dir = Path(output_dir)
        self.thickness_nm = thickness_nm
        self.material = material
        self.threads = int(threads)
        self.detector_weights = detector_weights
        self.stereo_weights = stereo_weights
        self.detector_precision = detector_precision
        self.volume_precision = volume_precision
        self.track_kw = {"max_distance_nm": track_max_distance_nm, "z_weight": track_z_weight}
        self.track_clock = track_clock
        self.line_params = line_params
        self.min_rows = int(min_rows)
        self.min_interval_s = float(min_interval_s)
        self.pipeline = pipeline
        self.error: str | None = None
        """Why the analysis is disabled (e.g. missing weights), else None."""
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()   # the trackers are shared by the live and the final path
        self._finals_running = 0            # finished scans being analysed: live snapshots wait
        self._finals_started = 0            # a live snapshot's analysis gives up when this moves
        self.live_skipped_for_final = 0
        self._final_scans: dict[str, int] = {}  # run id -> the last scan whose final analysis began
        self._crystal: dict[str, tuple[Any, Any]] = {}
        self._warned: set[tuple[str, str]] = set()
        self.trackers: dict[str, LineTracker] = {}

    # ------------------------------------------------------------------ setup
    @property
    def available(self) -> bool:
        return self.error is None

    def prepare(self) -> None:
        """Load the networks once (the daemon calls it before ingest starts); a failure disables
        the analysis with a logged error, the daemon keeps acquiring and writing scans."""
        with self._load_lock:
            if self.pipeline is not None or self.error is not None:
                return
            try:
                import torch

                torch.set_num_threads(self.threads)
                from livestereo.inference.pipeline import DislocationPipeline

                self.pipeline = DislocationPipeline.load(self.detector_weights, self.stereo_weights,
                                                         detector_precision=self.detector_precision,
                                                         volume_precision=self.volume_precision)
                warm_kernels()  # the tracker's, so the first tracked scan does not compile them
                log.info("dislocation networks loaded (%s, %s; detector in %s, cost volume in %s; %d torch "
                         "thread(s))", self.pipeline.info.get("detector"), self.pipeline.info.get("stereo"),
                         str(self.pipeline.detector_dtype).removeprefix("torch."),
                         str(self.pipeline.volume_dtype).removeprefix("torch."), self.threads)
            except Exception as exc:  # missing / broken weights, no torch: acquisition goes on
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("dislocation inference disabled: %s (acquisition and per-scan HDF5 results continue)", self.error)

    def _warn_once(self, run_id: str, text: str) -> None:
        if (run_id, text) not in self._warned:
            self._warned.add((run_id, text))
            log.warning("run %s: %s", run_id, text)

    def _thickness(self, snap: ScanImages) -> float | None:
        t = self.thickness_nm if self.thickness_nm is not None else meta_get(snap.start_metadata, "thickness_nm")
        try:
            t = float(t) if t is not None else None
        except (TypeError, ValueError):
            t = None
        return t if t is not None and np.isfinite(t) and t > 0 else None

    def applies(self, snap: ScanImages) -> bool:
        if self.error is not None:
            return False
        lay = snap.layout
        if np.asarray(lay.weights).ndim != 3 or len(lay.view_indices) < 2:
            return False  # segmented detectors: nanoparticles; fewer than two views: no stereo
        if self._thickness(snap) is None:
            self._warn_once(snap.run_id, "no dislocation reconstruction: foil thickness unknown "
                                         "(give --thickness-nm or thickness_nm in the start metadata)")
            return False
        return True

    def _crystal_of(self, snap: ScanImages):
        if snap.run_id not in self._crystal:
            try:
                self._crystal[snap.run_id] = crystal_from(self.material, None, snap.start_metadata)
            except ConfigError as exc:
                self._warn_once(snap.run_id, f"no crystal frame for the lines: {exc}")
                self._crystal[snap.run_id] = (None, None)
        return self._crystal[snap.run_id]

    def viewset(self, snap: ScanImages) -> ViewSet:
        idx = list(snap.layout.view_indices)
        mat, ori = self._crystal_of(snap)
        return ViewSet(
            views=np.asarray(snap.images)[idx], valid=np.asarray(snap.valid, dtype=bool),
            thetas_mrad=np.asarray(snap.centroids_mrad, dtype=np.float64)[idx], names=[snap.names[i] for i in idx],
            scan_step_nm=float(snap.calibration.scan_step_nm), thickness_nm=self._thickness(snap), scan=int(snap.scan),
            material=mat, orientation=ori, metadata={"run_id": snap.run_id, "final": snap.final, "seq": snap.seq},
        )

    def tracker(self, run_id: str) -> LineTracker:
        with self._load_lock:
            if run_id not in self.trackers:
                self.trackers[run_id] = LineTracker(**self.track_kw)
            return self.trackers[run_id]

    def _process(self, snap: ScanImages, cancelled=None):
        if self.pipeline is None:
            self.prepare()
            if self.pipeline is None:
                raise RuntimeError(f"dislocation inference unavailable: {self.error}")
        vs = self.viewset(snap)
        if not snap.final:  # a finished scan never waits for tracing: it runs eager until then
            self._warm(snap, vs)
        # no lock: inference does not change the networks, so a finished scan (normal
        # priority) never waits for a live snapshot's analysis (lower priority) to end
        res, maps, secs = process_viewset(self.pipeline, vs, self.line_params, cancelled=cancelled)
        return vs, res, maps, secs

    def _warm(self, snap: ScanImages, vs: ViewSet) -> None:
        """Prepare the networks for this run's full scans (frozen graphs, see
        DislocationPipeline.warm): once per shape and geometry, normally in the live worker on
        the run's first snapshot, so the finished scans never wait for it."""
        warm = getattr(self.pipeline, "warm", None)
        if warm is None:
            return
        try:
            if warm(np.shape(vs.views), vs.thetas_mrad, vs.scan_step_nm, vs.thickness_nm):
                log.info("run %s: networks prepared for %dx%d scans", snap.run_id, *np.shape(vs.views)[1:])
        except Exception as exc:  # eager inference still works
            log.warning("run %s: could not prepare the networks for full scans: %s", snap.run_id, exc)

    # ------------------------------------------------------------------ live
    def analyse(self, snap: ScanImages) -> DislocationOutcome | None:
        """Rolling inference on a snapshot (None when too few rows are filled yet, or when the
        scan's final analysis has begun). Raises :class:`Retry` while a finished scan is being
        reconstructed: the worker tries this snapshot again unless a newer one comes."""
        if snap.scan <= self._final_scans.get(snap.run_id, -1):
            return None  # the finished scan's own result supersedes this partial view
        if self._finals_running:
            # a finished scan is being reconstructed: its latency matters more than this
            # partial view of the next scan, so leave it the CPU
            self.live_skipped_for_final += 1
            raise Retry()
        rows = int(np.count_nonzero(np.asarray(snap.valid).any(axis=1)))
        if rows < min(self.min_rows, snap.valid.shape[0]):
            return None
        started = self._finals_started
        try:
            # a scan that finishes meanwhile gives this (already stale) preview up: the CPU and
            # the GIL go to the finished scan, not to a low-priority thread that holds them
            vs, res, maps, secs = self._process(snap, lambda: self._finals_started != started)
        except Cancelled:
            self.live_skipped_for_final += 1
            raise Retry() from None
        curves = [ln.points_nm for ln in res.lines]
        tr = self.tracker(snap.run_id)
        with self._run_lock:
            matched = tr.match(curves, [ln.closed for ln in res.lines])
            disp = [tr.displacement(tid, c) if tid is not None else None for (tid, _), c in zip(matched, curves)]
        return DislocationOutcome(res, maps, secs, list(snap.layout.view_indices), vs.thickness_nm,
                                  [tid for tid, _ in matched], disp)

    @staticmethod
    def on_result(snap: ScanImages, out: DislocationOutcome | None, latency_s: float) -> None:
        if out is not None:
            log.debug("live dislocations run %s scan %d (%.0f%% filled): %d line(s) in %.0f ms", snap.run_id, snap.scan,
                      100 * snap.fill_fraction, len(out.result.lines), 1e3 * latency_s)

    # ------------------------------------------------------------------ final
    def on_scan(self, scan: ScanImages) -> DislocationOutcome | None:
        """Reconstruct and track a finished scan (:meth:`write_result` adds it to the scan's file)."""
        with self._run_lock:
            self._finals_running += 1
            self._finals_started += 1
            self._final_scans[scan.run_id] = max(scan.scan, self._final_scans.get(scan.run_id, -1))
        try:
            vs, res, maps, secs = self._process(scan)
        finally:
            with self._run_lock:
                self._finals_running -= 1
        t, clock = scan_time(scan, self.track_clock)
        tr = self.tracker(scan.run_id)
        t_track = time.perf_counter()
        with self._run_lock:
            steps = tr.update_lines(scan.scan, t, res.lines)
        secs = {**secs, "tracking": round(time.perf_counter() - t_track, 4)}
        out = DislocationOutcome(res, maps, secs, list(scan.layout.view_indices), vs.thickness_nm,
                                 [s.track_id for s in steps], [s.displacement_nm for s in steps], steps, t, clock)
        moving = [s for s in steps if s.speed_nm_s is not None]
        log.info("run %s scan %d: %d dislocation line(s), %d tracked (%s), %d new; %.2f s inference",
                 scan.run_id, scan.scan, len(res.lines), len(moving),
                 ", ".join(f"#{s.track_id} {s.speed_nm_s:.3g} nm/s (in-plane {s.speed_xy_nm_s:.3g})"
                           for s in moving[:6]) or "-",
                 sum(1 for s in steps if s.status == "new"), secs.get("inference", 0.0))
        return out

    def write_result(self, scan: ScanImages, out: DislocationOutcome, path: Path) -> None:
        """``/dislocations`` (lines, maps, tracks) into the scan's HDF5 file."""
        self._write(path, out, self.tracker(scan.run_id))

    def _write(self, path: Path, out: DislocationOutcome, tr: LineTracker) -> None:
        import h5py

        with h5py.File(path, "a") as f:
            if "dislocations" in f:
                del f["dislocations"]
            g = f.create_group("dislocations")
            out.result.write_hdf5(g)
            g.create_dataset("view_indices", data=np.asarray(out.view_indices, dtype=np.int64))
            m = g.create_group("maps")
            for key, arr in out.maps.items():
                if arr is not None:
                    m.create_dataset(key, data=arr, compression="gzip", compression_opts=1)
            m.attrs["frame"] = "view-0 scan coordinates (row, col); disparity in px along the baseline of views 0-1"
            steps = out.steps or []
            write_tracks_hdf5(g, steps, out.result.lines, tr, out.time_s, out.clock)

    def scan_summary(self, scan: ScanImages, out: DislocationOutcome) -> dict[str, Any]:
        return {"n_lines": len(out.result.lines), "time_s": out.time_s, "clock": out.clock, "seconds": out.seconds,
                "tracks": steps_json(out.steps or [], out.result.lines)}

    def run_summary(self, run_id: str) -> dict[str, Any] | None:
        tr = self.trackers.get(run_id)
        out: dict[str, Any] = {}
        if self.error is not None:
            out["error"] = self.error
        if tr is not None:
            out["tracks"] = tr.summary()
        return out or None

    # ------------------------------------------------------------------ live stream
    def message(self, snap: ScanImages, out: DislocationOutcome | None, latency_s: float):
        """``dislocations`` topic (README "Live results stream")."""
        if out is None:
            return None
        res = out.result
        amap = {a.line_id: a for a in (res.analyses or [])}
        steps = {s.line_index: s for s in (out.steps or [])}
        lines, pts, pix, offsets = [], [], [], [0]
        for i, ln in enumerate(res.lines):
            a = amap.get(ln.id)
            s = steps.get(i)
            d = out.displacements_nm[i] if i < len(out.displacements_nm) else None
            z = ln.points_nm[:, 2]
            lines.append({
                "id": int(ln.id), "track_id": out.track_ids[i] if i < len(out.track_ids) else None,
                "n_points": ln.n_points, "length_nm": round(float(ln.length_nm), 3),
                "z_range_nm": [float(np.nanmin(z)), float(np.nanmax(z))] if np.isfinite(z).any() else None,
                "closed": bool(ln.closed), "mean_probability": float(ln.mean_probability),
                "direction_uvw": list(a.direction_uvw) if a is not None else None,
                "habit_plane": a.habit if a is not None else None,
                "habit_hkl": list(a.habit_hkl) if a is not None and a.habit_hkl is not None else None,
                "displacement_nm": None if d is None else np.round(d, 4).tolist(),
                "velocity_nm_s": None if s is None or s.velocity_nm_s is None else np.round(s.velocity_nm_s, 6).tolist(),
                "speed_nm_s": None if s is None or s.speed_nm_s is None else round(float(s.speed_nm_s), 6),
                "speed_xy_nm_s": None if s is None or s.speed_xy_nm_s is None else round(float(s.speed_xy_nm_s), 6),
                "velocity_sigma_z_nm_s": (None if s is None or s.velocity_sigma_z_nm_s is None
                                          else round(float(s.velocity_sigma_z_nm_s), 6)),
            })
            pts.append(np.asarray(ln.points_nm, np.float32))
            pix.append(np.asarray(ln.pixels_px, np.float32))
            offsets.append(offsets[-1] + ln.n_points)
        prob = np.asarray(out.maps["prob"], np.float32)
        f = binning_for(prob.shape[-2:], MAX_IMAGE_SIDE)
        prob8 = bin_max(np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8), f)
        data = {
            "latency_s": round(float(latency_s), 4), "fill_fraction": snap.fill_fraction, "final": snap.final,
            "thickness_nm": out.thickness_nm, "scan_step_nm": float(res.scan_step_nm),
            "thetas_mrad": np.asarray(res.thetas_mrad, float).tolist(), "view_indices": list(out.view_indices),
            "material": res.material.name if res.material is not None else None,
            "display_binning": f, "time_s": out.time_s, "seconds": out.seconds, "lines": lines,
        }
        arrays = {
            "prob": prob8,
            "line_points_nm": np.concatenate(pts) if pts else np.zeros((0, 3), np.float32),
            "line_pixels_px": np.concatenate(pix) if pix else np.zeros((0, 2), np.float32),
            "line_offsets": np.asarray(offsets, dtype=np.int64),
        }
        return data, arrays, ids_of(snap)
