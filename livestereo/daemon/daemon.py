"""``livestereo run``: poll a source, record, ingest, and hand results to the sinks.

Threads: the ingest loop (this thread; the numba kernels release the GIL), the results
writer and its final analyst (livestereo.daemon.writer), one latest-wins worker per analysis
(nanoparticles, dislocations) and, with ``publish``, the results publisher. Finished scans
go to the writer through an unbounded queue (a scan is a few MB and must never be lost);
partial snapshots go to
``self.snapshots`` and to every worker's latest-wins slot, so a slow analysis skips stale
snapshots and never slows ingest.

An analysis is any object with

- ``name`` (str): also the live-stream topic of its results (``particles``, ``dislocations``);
- ``applies(snap) -> bool``: whether it runs on this run's images;
- ``analyse(snap) -> result``: on the newest snapshot, in its worker thread;
- ``on_scan(scan) -> result | None``: on each finished scan, in the final analyst's thread,
  while the writer writes the scan's file, so the result is published as soon as it exists;

and optionally ``write_result(scan, result, path)`` (adds the result to ``scan_NNNN.h5``,
open with ``"a"``, once that file is written), ``prepare()`` (called before the ingest loop starts, e.g. to load models;
a failure is logged, never fatal), ``min_interval_s`` (least time between two live
analyses), ``on_result(snap, result, latency_s)``, ``message(snap, result, latency_s) ->
(data, arrays, ids)`` (its live-stream message; None: nothing to send),
``scan_summary(scan, result) -> dict`` (goes into the ``scan_done`` message and run.json),
``run_summary(run_id) -> dict`` (goes into run.json under the analysis' name) and
``close()``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from livestereo.daemon.config import DaemonConfig
from livestereo.daemon.ingest import Ingest
from livestereo.daemon.live import scan_done_message, snapshot_message
from livestereo.daemon.memory import tune_malloc
from livestereo.daemon.latest import Latest
from livestereo.daemon.products import ScanImages
from livestereo.daemon.status import StatusLine
from livestereo.daemon.worker import LatestWorker
from livestereo.daemon.writer import ResultsWriter, ScanSink
from livestereo.protocol.codec import encode
from livestereo.protocol.source import Source

log = logging.getLogger("livestereo.daemon")


class Daemon:
    """Runs one source through ingest until stopped, the source ends, or ``max_runs`` runs ended."""

    def __init__(self, cfg: DaemonConfig, source: Source, *, scan_sinks: list[ScanSink] | None = None,
                 status: StatusLine | None = None, analyses: list | None = None, publisher=None):
        self.cfg = cfg
        self.source = source
        tune_malloc()
        self.snapshots: Latest[ScanImages] = Latest()
        self.analyses: list = list(analyses or [])
        if cfg.particles and not any(getattr(a, "name", None) == "particles" for a in self.analyses):
            from livestereo.daemon.particles import ParticleAnalysis

            self.analyses.insert(0, ParticleAnalysis(cfg.output_dir, cfg.particles_config))
        self.publisher = publisher
        if self.publisher is None and cfg.publish:
            from livestereo.transport.publisher import ResultsPublisher  # pyzmq only

            self.publisher = ResultsPublisher(cfg.publish, sndhwm=cfg.publish_sndhwm, idle=cfg.publish_idle)
        self.workers: list[LatestWorker] = []
        self._worker_of: dict[str, LatestWorker] = {}
        for a in self.analyses:
            w = LatestWorker(a.name, a.analyse, accept=a.applies, on_result=self._result_hook(a),
                             min_interval_s=float(getattr(a, "min_interval_s", 0.0) or 0.0),
                             niceness=cfg.live_niceness, idle=cfg.live_idle)
            self.workers.append(w)
            self._worker_of[a.name] = w
        self.writer = ResultsWriter(cfg.output_dir, scan_sinks, analyses=self.analyses,
                                    on_analysis=self._on_final_analysis, on_scan_done=self._on_scan_done,
                                    niceness=cfg.final_niceness, idle=cfg.final_idle)
        self.runs_ended: list[dict] = []
        self.ingest = Ingest(
            cfg.layout, cfg.limits, disc_frames=cfg.disc_frames, snapshot_interval_s=cfg.snapshot_interval_s,
            on_scan=self._on_scan, on_snapshot=self._on_snapshot, on_run_end=self._on_run_end,
            mean_pattern=self.publisher is not None,
        )
        self.status = status or StatusLine(cfg.status_interval_s)
        self.stop_event = threading.Event()
        self._regions_cache: dict = {}
        self.recorder = None
        if cfg.record is not None:
            from livestereo.recording.format import RecordingWriter

            self.recorder = RecordingWriter(cfg.record)

    # ------------------------------------------------------------------ hooks
    def _result_hook(self, analysis) -> Callable[[ScanImages, Any, float], None]:
        own = getattr(analysis, "on_result", None)

        def hook(snap: ScanImages, result: Any, latency: float) -> None:
            if own is not None:
                own(snap, result, latency)
            self._publish_result(analysis, snap, result, latency)

        return hook

    def _publish_result(self, analysis, snap: ScanImages, result: Any, latency: float) -> None:
        msg = getattr(analysis, "message", None)
        if self.publisher is not None and msg is not None:
            self.publisher.offer(analysis.name, lambda: msg(snap, result, latency), keep=snap.final)

    def _on_final_analysis(self, analysis, scan: ScanImages, result: Any, latency: float) -> None:
        self._publish_result(analysis, scan, result, latency)

    def _on_scan_done(self, scan: ScanImages, path: Path | None, extra: dict) -> None:
        if self.publisher is not None:
            hdf5 = str(path) if path is not None else None
            self.publisher.offer("scan_done", lambda: scan_done_message(scan, hdf5, extra))

    def _on_snapshot(self, snap: ScanImages) -> None:
        self.snapshots.put(snap)
        if not snap.final:
            for w in self.workers:
                w.slot.put(snap)
        if self.publisher is not None:
            cache = self._regions_cache
            self.publisher.offer("snapshot", lambda: snapshot_message(snap, regions_cache=cache), keep=snap.final)

    def _on_scan(self, result: ScanImages) -> None:
        self._on_snapshot(result)
        self.writer.queue.put(("scan", result))

    def _on_run_end(self, summary: dict) -> None:
        summary["counters"] = self.ingest.counters.as_dict()
        self.runs_ended.append(summary)
        self.writer.queue.put(("run", summary))

    def analysis_counters(self) -> dict[str, dict]:
        """Per analysis: done, skipped, deferred (tried again later, see worker.Retry), errors,
        last_latency_s (live), available and error."""
        out = {}
        for a in self.analyses:
            w = self._worker_of[a.name]
            out[a.name] = {"done": w.done, "skipped": w.skipped, "deferred": w.deferred, "errors": w.errors,
                           "last_latency_s": round(w.latest[2], 4) if w.latest is not None else None,
                           "available": getattr(a, "available", True), "error": getattr(a, "error", None)}
        return out

    def _publish_status(self) -> None:
        if self.publisher is None:
            return
        c = self.ingest.counters
        desc, _total = self._run_desc()
        data = {"frames": c.frames, "messages": c.messages, "bytes": c.bytes,
                "frames_per_s": round(self.status.frames_per_s, 1), "gb_per_s": round(self.status.gb_per_s, 4),
                "rejected": c.rejected_total, "gaps": c.gaps, "scans_done": c.scans_done, "runs_done": c.runs_done,
                "run": desc, "publisher": self.publisher.counters(), "analyses": self.analysis_counters(),
                "results_errors": self.writer.errors, "analysis_errors": self.writer.analysis_errors,
                "scans_awaiting_analysis": self.writer.backlog}
        data["inference"] = data["analyses"].get("dislocations")
        run = self.ingest.run
        ids = {"run_id": run.start.run_id if run is not None else None,
               "scan": (run.scan.number if run is not None and run.scan is not None else None), "seq": None}
        self.publisher.offer("status", lambda: (data, {}, ids))

    def _run_desc(self) -> tuple[str, int | None]:
        run = self.ingest.run
        if run is None:
            return "waiting for a run", None
        total = run.start.n_positions * run.start.repeat if run.start.repeat else None
        scan = run.scan.number if run.scan is not None else max(run.highest_scan, 0)
        of = f"/{run.start.repeat}" if run.start.repeat else ""
        return f"run {run.start.run_id} scan {scan + 1}{of}", total

    def run(self) -> int:
        """The ingest loop. Returns 0, or 1 if results could not be written."""
        cfg = self.cfg
        for a in self.analyses:  # e.g. load models now, not while the first scan streams in
            prep = getattr(a, "prepare", None)
            if prep is not None:
                try:
                    prep()
                except Exception as exc:
                    log.error("%s: preparation failed: %s", a.name, exc)
        self.writer.start()
        for w in self.workers:
            w.start()
        if self.publisher is not None:
            self.publisher.start()
            log.info("publishing results on %s", self.publisher.endpoint)
        log.info("listening on %s; results in %s/", self.source.name, cfg.output_dir)
        poll_s = min(0.1, cfg.status_interval_s)
        ingest, recorder, source, status, max_runs = self.ingest, self.recorder, self.source, self.status, cfg.max_runs
        try:
            while not self.stop_event.is_set():
                try:
                    item = source.receive(poll_s)
                except EOFError:
                    ingest.flush("source ended")
                    break
                if item is not None:
                    if recorder is not None:
                        parts = item.parts if item.parts is not None else (encode(item.message) if item.message is not None else None)
                        if parts is not None:
                            recorder.write(parts, item.recv_time)
                    ingest.handle(item)
                else:
                    ingest.check_idle(cfg.idle_timeout_s)
                if status.due():
                    desc, total = self._run_desc()
                    status.update(ingest.counters, desc, total, awaiting_analysis=self.writer.backlog)
                    self._publish_status()
                if max_runs is not None and len(self.runs_ended) >= max_runs:
                    break
        except KeyboardInterrupt:
            log.warning("interrupted: closing the run in progress")
            ingest.flush("interrupted")
        finally:
            desc, total = self._run_desc()
            self.status.update(ingest.counters, desc, total, force=True, awaiting_analysis=self.writer.backlog)
            self.status.close()
            self.snapshots.close()
            for w in self.workers:
                w.stop()
            self.writer.stop()
            for a in self.analyses:
                close = getattr(a, "close", None)
                if close is not None:
                    close()
            if self.publisher is not None:
                self._publish_status()
                self.publisher.stop()
            source.close()
            if recorder is not None:
                recorder.close()
                log.info("recorded to %s", cfg.record)
        return 1 if self.writer.errors else 0

    def stop(self) -> None:
        self.stop_event.set()
