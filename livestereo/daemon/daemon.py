"""``livestereo run``: poll a source, record, ingest, and hand results to the sinks.

Threads: the ingest loop (this thread; the numba kernels release the GIL), one results
writer, one latest-wins worker per analysis (nanoparticles, dislocations) and, with
``publish``, the results publisher. Finished scans go to the writer through an unbounded
queue (a scan is a few MB and must never be lost); partial snapshots go to
``self.snapshots`` and to every worker's latest-wins slot, so a slow analysis skips stale
snapshots and never slows ingest.

An analysis is any object with

- ``name`` (str): also the live-stream topic of its results (``particles``, ``dislocations``);
- ``applies(snap) -> bool``: whether it runs on this run's images;
- ``analyse(snap) -> result``: on the newest snapshot, in its worker thread;
- ``on_scan(scan) -> result | None``: on each finished scan, in the results writer's
  thread, before anything is written, so the result is published as soon as it exists;

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
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from livestereo.daemon.config import DaemonConfig
from livestereo.daemon.ingest import Ingest
from livestereo.daemon.live import scan_done_message, snapshot_message
from livestereo.daemon.memory import release_free_memory, tune_malloc
from livestereo.daemon.latest import Latest
from livestereo.daemon.products import ScanImages
from livestereo.daemon.results import scan_path, write_run_summary, write_scan
from livestereo.daemon.status import StatusLine
from livestereo.daemon.worker import LatestWorker, lower_thread_priority
from livestereo.protocol.codec import encode
from livestereo.protocol.source import Source

log = logging.getLogger("livestereo.daemon")

ScanSink = Callable[[ScanImages], None]


#: free heap pages go back to the system at most this often (s): every small, fast scan
#: would also hand back the pages of the receive buffers, which ingest then faults in again
TRIM_INTERVAL_S = 2.0


class ResultsWriter(threading.Thread):
    """Writes each finished scan to HDF5 and each run summary to JSON, off the ingest thread.

    Per finished scan: every analysis' ``on_scan`` and ``on_analysis`` (the daemon publishes
    the result: latency matters), then the scan's HDF5 file, the ``scan_sinks`` and every
    analysis' ``write_result``, then ``on_scan_done`` (the daemon publishes ``scan_done``).
    Analysis errors are logged and counted in ``analysis_errors``, never fatal.
    """

    def __init__(self, output_dir: Path, scan_sinks: list[ScanSink] | None = None, *, analyses: list | None = None,
                 on_analysis: Callable[[Any, ScanImages, Any, float], None] | None = None,
                 on_scan_done: Callable[[ScanImages, Path | None, dict], None] | None = None,
                 niceness: int = 0):
        super().__init__(name="livestereo-results", daemon=True)
        self.niceness = niceness
        self.output_dir = Path(output_dir)
        self.scan_sinks = list(scan_sinks or [])
        self.analyses = list(analyses or [])
        self.on_analysis = on_analysis
        self.on_scan_done = on_scan_done
        self.queue: queue.Queue = queue.Queue()
        self.written: list[Path] = []
        self.errors = 0
        self.analysis_errors = 0
        self.scan_results: dict[str, list[dict]] = {}
        """run id -> per finished scan: {"scan", "hdf5", "complete", <analysis name>: summary}."""
        self._last_trim = 0.0

    def run(self) -> None:
        lower_thread_priority(self.niceness)
        while True:
            item = self.queue.get()
            if item is None:
                return
            kind, payload = item
            try:
                if kind == "scan":
                    self._scan(payload)
                else:
                    for a in self.analyses:
                        fn = getattr(a, "run_summary", None)
                        if fn is not None:
                            try:
                                extra = fn(payload["run_id"])
                            except Exception:
                                self.analysis_errors += 1
                                log.exception("%s: run summary failed", a.name)
                                extra = None
                            if extra:
                                payload[a.name] = extra
                    payload["scan_results"] = self.scan_results.pop(payload["run_id"], [])
                    path = write_run_summary(self.output_dir, payload)
                    self.written.append(path)
                    log.info("wrote %s", path)
            except Exception:  # a full disk must not stop acquisition; it is logged and counted
                self.errors += 1
                log.exception("could not write %s results", kind)

    def _scan(self, scan: ScanImages) -> None:
        extra: dict[str, Any] = {}
        summaries: dict[str, Any] = {}
        results: list[tuple[Any, Any]] = []
        for a in self.analyses:
            try:
                if not a.applies(scan):
                    continue
                t0 = time.perf_counter()
                result = a.on_scan(scan)
                latency = time.perf_counter() - t0
                if result is None:
                    continue
                results.append((a, result))
                fn = getattr(a, "scan_summary", None)
                summary = fn(scan, result) if fn is not None else None
                if summary:
                    summaries[a.name] = summary
                    extra.update({k: v for k, v in summary.items() if k in ("n_lines", "tracks", "n_particles")})
                if self.on_analysis is not None:
                    self.on_analysis(a, scan, result, latency)
            except Exception as exc:  # an analysis never stops the results or acquisition
                self._analysis_failed(a, scan, exc)
        path: Path | None = None
        try:
            path = write_scan(scan, scan_path(self.output_dir, scan.run_id, scan.scan))
            self.written.append(path)
            log.info("wrote %s", path)
            for sink in self.scan_sinks:
                sink(scan)
        except Exception:
            self.errors += 1
            log.exception("could not write scan results")
        if path is not None:
            for a, result in results:
                fn = getattr(a, "write_result", None)
                if fn is None:
                    continue
                try:
                    fn(scan, result, path)
                except Exception as exc:
                    self._analysis_failed(a, scan, exc)
        now = time.monotonic()
        if now - self._last_trim >= TRIM_INTERVAL_S:  # a long series must not creep up (livestereo.daemon.memory)
            self._last_trim = now
            release_free_memory()
        entry: dict[str, Any] = {"scan": scan.scan, "hdf5": path.name if path else None, "complete": scan.complete,
                                 **summaries}
        self.scan_results.setdefault(scan.run_id, []).append(entry)
        if self.on_scan_done is not None:
            try:
                self.on_scan_done(scan, path, extra)
            except Exception:
                log.exception("scan_done hook failed")

    def _analysis_failed(self, a, scan: ScanImages, exc: Exception) -> None:
        self.analysis_errors += 1
        log.error("run %s scan %d: %s analysis failed: %s", scan.run_id, scan.scan, a.name, exc,
                  exc_info=self.analysis_errors <= 3)

    def stop(self) -> None:
        self.queue.put(None)
        self.join()


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

            self.publisher = ResultsPublisher(cfg.publish, sndhwm=cfg.publish_sndhwm)
        self.workers: list[LatestWorker] = []
        self._worker_of: dict[str, LatestWorker] = {}
        for a in self.analyses:
            w = LatestWorker(a.name, a.analyse, accept=a.applies, on_result=self._result_hook(a),
                             min_interval_s=float(getattr(a, "min_interval_s", 0.0) or 0.0),
                             niceness=cfg.live_niceness)
            self.workers.append(w)
            self._worker_of[a.name] = w
        self.writer = ResultsWriter(cfg.output_dir, scan_sinks, analyses=self.analyses,
                                    on_analysis=self._on_final_analysis, on_scan_done=self._on_scan_done,
                                    niceness=cfg.final_niceness)
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
        """Per analysis: done, skipped, errors, last_latency_s (live) and final_errors."""
        out = {}
        for a in self.analyses:
            w = self._worker_of[a.name]
            out[a.name] = {"done": w.done, "skipped": w.skipped, "errors": w.errors,
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
                "results_errors": self.writer.errors, "analysis_errors": self.writer.analysis_errors}
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
                    status.update(ingest.counters, desc, total)
                    self._publish_status()
                if max_runs is not None and len(self.runs_ended) >= max_runs:
                    break
        except KeyboardInterrupt:
            log.warning("interrupted: closing the run in progress")
            ingest.flush("interrupted")
        finally:
            desc, total = self._run_desc()
            self.status.update(ingest.counters, desc, total, force=True)
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
