"""The ingest state machine: validated messages in, virtual images per scan out.

``Ingest.handle(item)`` takes one ``Received`` from any source. It checks the message
against the run it belongs to, accumulates frames with the numba kernels, and hands
finished scans to ``on_scan`` and partial snapshots to ``on_snapshot``. A bad message is
rejected with a logged reason and a counter; nothing it does can stop the daemon.

It imports no sockets: the same code runs live, on replays and offline.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Callable

import numpy as np

from livestereo.compute.accumulate import Accumulator
from livestereo.compute.layouts import Layout, LayoutSpec, build_layout
from livestereo.daemon.config import Limits
from livestereo.daemon.products import LayoutInfo, ScanImages
from livestereo.protocol.codec import ProtocolError
from livestereo.protocol.messages import EndMessage, FramesMessage, StartMessage
from livestereo.protocol.source import Received

log = logging.getLogger("livestereo.ingest")

#: How many rejections of one reason are logged in full per run before going quiet.
_LOG_FIRST = 5


@dataclasses.dataclass
class Counters:
    """Running totals over the daemon's life (all runs)."""

    messages: int = 0
    frames: int = 0
    bytes: int = 0
    duplicates: int = 0
    gaps: int = 0
    """Frames messages missing according to sequence numbers."""
    scans_done: int = 0
    runs_done: int = 0
    rejected: Counter = dataclasses.field(default_factory=Counter)
    """Rejected messages by reason."""

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rejected"] = dict(self.rejected)
        return d


@dataclasses.dataclass
class _Scan:
    number: int
    acc: Accumulator
    frames: int = 0
    duplicates: int = 0
    gaps: int = 0
    started: float = dataclasses.field(default_factory=time.time)
    last_seq: int = -1


class _Run:
    """State of the run in progress."""

    def __init__(self, start: StartMessage, started: float):
        self.start = start
        self.started = started
        self.calibration = start.calibration
        self.layout: Layout | None = None
        self.weights: np.ndarray | None = None  # (n_det, npix) float32
        self.last_acc: Accumulator | None = None  # the latest scan's: the next one starts from it
        self.dtype = np.dtype(start.dtype).newbyteorder("<")
        self.item_shape = start.item_shape
        self.n_positions = start.n_positions
        self.layout_info: LayoutInfo | None = None
        self.pending: list[FramesMessage] = []  # held while the disc is being found
        self.pending_frames = 0
        self.scan: _Scan | None = None
        self.completed_scans: set[int] = set()
        self.expected_seq = 0
        self.frames = 0
        self.gaps = 0
        self.rejected: Counter = Counter()
        self.last_message = time.monotonic()
        self.highest_scan = -1
        self.pattern_sum: np.ndarray | None = None  # running sum of sampled frames (mean pattern)
        self.pattern_n = 0


class Ingest:
    """Turns a stream of messages into per-scan virtual images.

    on_scan(ScanImages): called with each finished scan (complete or closed incomplete).
    on_snapshot(ScanImages): called with partial images at most every snapshot_interval_s.
    on_run_end(dict): called with the run summary when a run ends.
    """

    def __init__(
        self,
        layout_spec: LayoutSpec | None = None,
        limits: Limits | None = None,
        *,
        disc_frames: int = 32,
        snapshot_interval_s: float = 0.1,
        on_scan: Callable[[ScanImages], None] | None = None,
        on_snapshot: Callable[[ScanImages], None] | None = None,
        on_run_end: Callable[[dict], None] | None = None,
        mean_pattern: bool = False,
    ):
        self.layout_spec = layout_spec or LayoutSpec()
        self.limits = limits or Limits()
        self.disc_frames = disc_frames
        self.snapshot_interval_s = snapshot_interval_s
        self.on_scan = on_scan or (lambda s: None)
        self.on_snapshot = on_snapshot
        self.on_run_end = on_run_end or (lambda d: None)
        self.mean_pattern = mean_pattern
        """Keep a running mean diffraction pattern (first frame of every frames message) for the view."""
        self.counters = Counters()
        self.run: _Run | None = None
        self._last_snapshot = 0.0
        self._ended_runs: set[str] = set()

    # ------------------------------------------------------------------ entry point
    def handle(self, item: Received) -> None:
        """Process one item from a source; never raises for bad input."""
        self.counters.messages += 1
        self.counters.bytes += item.nbytes
        if item.error is not None:
            self._reject(item.error.reason, item.error.detail)
            return
        msg = item.message
        try:
            if isinstance(msg, FramesMessage):
                self._frames(msg)
            elif isinstance(msg, StartMessage):
                self._start(msg)
            elif isinstance(msg, EndMessage):
                self._end(msg)
            else:
                self._reject("unknown_type", f"not a livestereo message: {type(msg).__name__}")
        except ProtocolError as exc:
            self._reject(exc.reason, exc.detail)
        if self.run is not None:
            self.run.last_message = time.monotonic()

    def check_idle(self, idle_timeout_s: float) -> None:
        """Close the run as 'sender_lost' if nothing came for ``idle_timeout_s`` seconds."""
        run = self.run
        if run is not None and time.monotonic() - run.last_message > idle_timeout_s:
            log.warning("run %s: no message for %.1f s, closing it as sender_lost", run.start.run_id, idle_timeout_s)
            self._close_run("sender_lost", frames_sent=None)

    def flush(self, reason: str = "stopped") -> None:
        """Close the run in progress (at shutdown or end of a file)."""
        if self.run is not None:
            self._close_run(reason, frames_sent=None)

    # ------------------------------------------------------------------ messages
    def _start(self, start: StartMessage) -> None:
        if self.run is not None:
            same = start.run_id == self.run.start.run_id
            raise ProtocolError(
                "start_mid_run",
                f"start for run {start.run_id!r} while run {self.run.start.run_id!r} is in progress"
                + (" (duplicate start)" if same else "; end that run first or wait for its idle timeout"),
            )
        lim = self.limits
        if start.frame_nbytes > lim.max_frame_bytes:
            raise ProtocolError("too_large", f"frame of {start.frame_nbytes} bytes exceeds max_frame_bytes={lim.max_frame_bytes}")
        if start.n_positions > lim.max_positions:
            raise ProtocolError("too_large", f"scan_shape {start.scan_shape} has {start.n_positions} positions > max_positions={lim.max_positions}")
        run = _Run(start, time.time())
        cal = start.calibration
        if start.metadata.get("scan_shape_guessed"):
            log.warning("run %s: the source did not give the scan shape; it was guessed as %s (set it with --scan-shape)",
                        start.run_id, start.scan_shape)
        if start.metadata.get("calibration_placeholder"):
            log.warning("run %s: the source carries no calibration; a placeholder calibration is used, so angles and "
                        "depths are not physical (give --calibration)", start.run_id)
        if start.detector == "segmented" or (cal.disc_center_px is not None and (cal.disc_radius_px is not None or cal.mrad_per_px is not None)):
            self._make_layout(run, cal.disc_center_px, cal.disc_radius_px)  # raises ProtocolError
        self.run = run
        self._ended_runs.discard(start.run_id)
        log.info(
            "run %s started: %s %s, scan %dx%d, %s, repeat %s%s",
            start.run_id, start.detector, "x".join(map(str, start.item_shape)), *start.scan_shape, start.dtype,
            start.repeat or "until stopped", "" if run.layout else "; finding the BF disc from the first frames",
        )

    def _make_layout(self, run: _Run, center, radius) -> None:
        try:
            layout = build_layout(self.layout_spec, run.start, disc_center_px=center, disc_radius_px=radius)
        except ValueError as exc:
            raise ProtocolError("bad_layout", f"cannot build the virtual detectors for run {run.start.run_id!r}: {exc}") from None
        image_bytes = len(layout.detectors) * run.start.n_positions * 8
        if image_bytes > self.limits.max_image_bytes:
            raise ProtocolError("too_large", f"{len(layout.detectors)} images of {run.start.n_positions} positions need {image_bytes} bytes > max_image_bytes={self.limits.max_image_bytes}")
        run.layout = layout
        run.weights = layout.weights_matrix()
        run.layout_info = LayoutInfo(
            names=tuple(layout.names),
            roles=tuple(d.role for d in layout.detectors),
            centroids_mrad=np.asarray(layout.centroids_mrad, dtype=np.float64),
            weights=np.stack([d.weights for d in layout.detectors]).astype(np.float32),
            disc_center_px=layout.disc_center_px,
            disc_radius_px=layout.disc_radius_px,
        )
        if run.start.detector == "pixelated" and (center is not None) and run.calibration.disc_center_px is None:
            upd = {"disc_center_px": tuple(center), "disc_radius_px": radius}
            if run.calibration.mrad_per_px is None and radius:
                upd["mrad_per_px"] = run.calibration.convergence_semiangle_mrad / radius
            run.calibration = run.calibration.model_copy(update=upd)
        _warm_up(run.weights, run.start)
        log.info("run %s layout:\n%s", run.start.run_id, layout.describe())

    def _frames(self, msg: FramesMessage) -> None:
        run = self.run
        if run is None:
            if msg.run_id in self._ended_runs:
                raise ProtocolError("after_end", f"frames for run {msg.run_id!r} after its end")
            raise ProtocolError("no_run", f"frames for run {msg.run_id!r} before any start")
        start = run.start
        data = msg.data
        if msg.run_id != start.run_id:
            raise ProtocolError("wrong_run", f"frames for run {msg.run_id!r} during run {start.run_id!r}")
        # in-process sources may hand over big-endian views of their receive buffer (Merlin)
        if data.dtype != run.dtype and data.dtype.newbyteorder("<") != run.dtype:
            raise ProtocolError("wrong_dtype", f"frames dtype {data.dtype.name} but the run declared {start.dtype}")
        if data.shape[1:] != run.item_shape:
            raise ProtocolError("wrong_shape", f"frames of shape {data.shape[1:]} but the run declared {run.item_shape}")
        count = data.shape[0]
        if msg.first + count > run.n_positions:
            raise ProtocolError("index_out_of_range", f"frames {msg.first}..{msg.first + count - 1} outside the scan of {run.n_positions} positions")
        scan_no = msg.scan
        current = run.scan
        if current is None or scan_no != current.number:
            if start.repeat and scan_no >= start.repeat:
                raise ProtocolError("scan_out_of_range", f"scan {scan_no} but the series has {start.repeat} scans")
            if scan_no in run.completed_scans or (current is not None and scan_no < current.number):
                raise ProtocolError("stale_scan", f"frames for scan {scan_no}, which is already closed")
        # sequence numbers: a jump forward is a gap (messages lost upstream)
        seq = msg.seq
        if seq != run.expected_seq:
            if seq > run.expected_seq:
                missing = seq - run.expected_seq
                run.gaps += missing
                self.counters.gaps += missing
                if current is not None:
                    current.gaps += missing
                log.warning("run %s: gap of %d message(s) before seq %d", start.run_id, missing, seq)
            run.expected_seq = max(run.expected_seq, seq + 1)
        else:
            run.expected_seq = seq + 1

        if run.layout is None:
            self._hold_for_disc(run, msg)
            return
        self._accumulate(run, msg)

    def _accumulate(self, run: _Run, msg: FramesMessage) -> None:
        scan = run.scan
        if scan is None or msg.scan != scan.number:
            if scan is not None:
                self._finish_scan(run)
            acc = run.last_acc.fresh() if run.last_acc is not None else Accumulator(run.weights, run.n_positions)
            run.last_acc = acc
            scan = run.scan = _Scan(msg.scan, acc)
            run.highest_scan = max(run.highest_scan, msg.scan)
        count = msg.data.shape[0]
        dups = scan.acc.add(msg.data, msg.first)
        scan.frames += count
        scan.duplicates += dups
        scan.last_seq = msg.seq
        run.frames += count
        counters = self.counters
        counters.frames += count
        if self.mean_pattern and msg.data.ndim == 3:
            if run.pattern_sum is None:
                run.pattern_sum = np.zeros(msg.data.shape[1:], np.float32)
            np.add(run.pattern_sum, msg.data[0], out=run.pattern_sum, casting="unsafe")
            run.pattern_n += 1
        if dups:
            counters.duplicates += dups
        if scan.frames - scan.duplicates >= run.n_positions and scan.acc.filled.all():
            self._finish_scan(run)
        elif self.on_snapshot is not None:
            now = time.monotonic()
            if now - self._last_snapshot >= self.snapshot_interval_s:
                self._last_snapshot = now
                self.on_snapshot(self._scan_images(run, scan, final=False, copy=True))

    def _hold_for_disc(self, run: _Run, msg: FramesMessage) -> None:
        run.pending.append(msg)
        run.pending_frames += msg.count
        if run.pending_frames < min(self.disc_frames, run.start.n_positions) and run.pending_frames < self.limits.max_buffered_frames:
            return
        from livestereo.compute.disc import DiscNotFound, find_disc  # only runs without a disc calibration

        frames = np.concatenate([m.data for m in run.pending])[: max(self.disc_frames, 1)]
        try:
            fit = find_disc(frames)
        except DiscNotFound as exc:
            pending, run.pending = run.pending, []
            self.run = None
            self._ended_runs.add(run.start.run_id)
            raise ProtocolError("no_disc", f"run {run.start.run_id!r}: BF disc not found in the first {len(frames)} frames ({exc}); "
                                f"{sum(m.count for m in pending)} frames dropped; give disc_center_px/disc_radius_px in the start message") from None
        log.info("run %s: BF disc found at (row %.2f, col %.2f) px, radius %.2f px from %d frames",
                 run.start.run_id, *fit.center_px, fit.radius_px, fit.n_frames)
        self._make_layout(run, fit.center_px, fit.radius_px)
        pending, run.pending = run.pending, []
        for m in pending:
            self._accumulate(run, m)

    def _end(self, end: EndMessage) -> None:
        run = self.run
        if run is None:
            raise ProtocolError("no_run", f"end for run {end.run_id!r} with no run in progress")
        if end.run_id != run.start.run_id:
            raise ProtocolError("wrong_run", f"end for run {end.run_id!r} during run {run.start.run_id!r}")
        self._close_run(end.reason, frames_sent=end.frames_sent)

    # ------------------------------------------------------------------ closing
    def _scan_images(self, run: _Run, scan: _Scan, *, final: bool, copy: bool) -> ScanImages:
        ny, nx = run.start.scan_shape
        filled = scan.acc.filled
        images = scan.acc.images.reshape(-1, ny, nx)
        valid = filled.reshape(ny, nx)
        if copy:
            images, valid = images.copy(), valid.copy()
        n_filled = int(np.count_nonzero(filled))
        return ScanImages(
            run_id=run.start.run_id,
            scan=scan.number,
            seq=scan.last_seq,
            images=images,
            valid=valid,
            layout=run.layout_info,
            calibration=run.calibration,
            start_metadata=dict(run.start.metadata),
            final=final,
            complete=n_filled == filled.size,
            stats={
                "frames": scan.frames,
                "duplicates": scan.duplicates,
                "gaps": scan.gaps,
                "positions_filled": n_filled,
                "positions_missing": int(filled.size - n_filled),
                "started": scan.started,
                "finished": time.time() if final else None,
            },
            mean_pattern=(run.pattern_sum / run.pattern_n).astype(np.float32) if run.pattern_n else None,
        )

    def _finish_scan(self, run: _Run) -> None:
        scan = run.scan
        run.scan = None
        if scan is None:
            return
        run.completed_scans.add(scan.number)
        result = self._scan_images(run, scan, final=True, copy=False)
        self.counters.scans_done += 1
        st = result.stats
        if result.complete:
            log.info("run %s scan %d complete: %d frames, %d duplicates, %d gaps",
                     run.start.run_id, scan.number, st["frames"], st["duplicates"], st["gaps"])
        else:
            missing = np.flatnonzero(~result.valid.ravel())
            log.warning("run %s scan %d INCOMPLETE: %d of %d positions never filled (first: %s), %d gaps",
                        run.start.run_id, scan.number, st["positions_missing"], result.valid.size,
                        _index_ranges(missing, run.start.scan_shape[1]), st["gaps"])
        self.on_scan(result)

    def _close_run(self, reason: str, frames_sent: int | None) -> None:
        run = self.run
        assert run is not None
        if run.pending and run.layout is None:
            log.warning("run %s ended before the BF disc could be found: %d held frames dropped", run.start.run_id, run.pending_frames)
        if run.scan is not None:
            self._finish_scan(run)
        self.run = None
        self._ended_runs.add(run.start.run_id)
        self.counters.runs_done += 1
        summary = {
            "run_id": run.start.run_id,
            "reason": reason,
            "frames_received": run.frames,
            "frames_sent": frames_sent,
            "scans": sorted(run.completed_scans),
            "gaps": run.gaps,
            "rejected": dict(run.rejected),
            "started": run.started,
            "ended": time.time(),
            "calibration": run.calibration.model_dump(mode="json"),
        }
        if frames_sent is not None and frames_sent != run.frames:
            log.warning("run %s: sender reports %d frames sent, %d received", run.start.run_id, frames_sent, run.frames)
        expected_scans = run.start.repeat
        if expected_scans and len(run.completed_scans) < expected_scans:
            log.warning("run %s ended (%s) after %d of %d scans", run.start.run_id, reason, len(run.completed_scans), expected_scans)
        log.info("run %s ended (%s): %d frames in %d scan(s), %d gaps, %d rejected",
                 run.start.run_id, reason, run.frames, len(run.completed_scans), run.gaps, sum(run.rejected.values()))
        self.on_run_end(summary)

    def _reject(self, reason: str, detail: str) -> None:
        self.counters.rejected[reason] += 1
        n = self.counters.rejected[reason]
        if self.run is not None:
            self.run.rejected[reason] += 1
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning("rejected message (%s, #%d): %s%s", reason, n, detail, "; further ones counted quietly" if n == _LOG_FIRST else "")


def _warm_up(weights: np.ndarray, start: StartMessage) -> None:
    """Load (or compile) the kernels for this run's dtype now, at the start message, rather
    than on the first frames (numba's cached load takes ~0.5-1 s on first use)."""
    frames = np.zeros((64, *start.item_shape), dtype=start.dtype)
    acc = Accumulator(weights, len(frames))
    acc.add(frames[:1], 0)
    acc.add(frames, 0)


def _index_ranges(flat: np.ndarray, nx: int, most: int = 4) -> str:
    """'(row, col) ranges' of the first few missing flat indices, for the log."""
    if flat.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    out = []
    for chunk in np.split(flat, breaks)[:most]:
        a, b = int(chunk[0]), int(chunk[-1])
        out.append(f"({a // nx},{a % nx})" + ("" if a == b else f"..({b // nx},{b % nx})"))
    more = len(breaks) + 1 - most
    return ", ".join(out) + (f" and {more} more runs" if more > 0 else "")
