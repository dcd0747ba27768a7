"""Finished scans off the ingest thread: their files, then their analyses, in order.

Two threads share the work so that a scan's file never waits for its reconstruction:

- the results writer (normal priority) writes each finished scan's HDF5 file and runs the
  scan sinks at once; it hands every scan and run summary on to
- the final analyst, which runs every analysis' ``on_scan`` on the finished scan (the
  daemon publishes the result as soon as it exists), adds the results to the scan's file
  once that is written, publishes ``scan_done`` and writes the run summary (run.json).

The analyst may run in the SCHED_IDLE class (``DaemonConfig.final_idle``): when scans
finish faster than they can be reconstructed on a small machine, ingest keeps its pace and
the reconstructions follow, in order, as the CPU frees. Scans waiting for it are counted in
:attr:`ResultsWriter.backlog` (a few MB each; a warning is logged when it grows past
``BACKLOG_WARNING``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from livestereo.daemon.memory import release_free_memory
from livestereo.daemon.products import ScanImages
from livestereo.daemon.results import scan_path, write_run_summary, write_scan
from livestereo.priority import lower_thread_priority

log = logging.getLogger("livestereo.daemon")

ScanSink = Callable[[ScanImages], None]

#: free heap pages go back to the system at most this often (s): every small, fast scan
#: would also hand back the pages of the receive buffers, which ingest then faults in again
TRIM_INTERVAL_S = 2.0

BACKLOG_WARNING = 16
"""Finished scans waiting for their analyses beyond which a warning is logged."""


class _ScanFile:
    """The finished scan's HDF5 path once the writer has written it (None: it could not)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.ready = threading.Event()


class ResultsWriter(threading.Thread):
    """Writes each finished scan to HDF5 and hands it to the final analyst (its own thread).

    Put ``("scan", ScanImages)`` and ``("run", summary)`` on :attr:`queue`; :meth:`stop`
    finishes everything queued. File errors are logged and counted in ``errors``, analysis
    errors in ``analysis_errors``; neither is ever fatal.
    """

    def __init__(self, output_dir: Path, scan_sinks: list[ScanSink] | None = None, *, analyses: list | None = None,
                 on_analysis: Callable[[Any, ScanImages, Any, float], None] | None = None,
                 on_scan_done: Callable[[ScanImages, Path | None, dict], None] | None = None,
                 niceness: int = 0, idle: bool = False):
        super().__init__(name="livestereo-results", daemon=True)
        self.niceness = niceness
        """Added to the writer's and the analyst's nice values (Linux)."""
        self.output_dir = Path(output_dir)
        self.scan_sinks = list(scan_sinks or [])
        self.queue: queue.Queue = queue.Queue()
        self.written: list[Path] = []
        self.errors = 0
        self.priority = "normal"
        """What :func:`lower_thread_priority` applied to the writer once it started."""
        self.analyst = _FinalAnalyst(self, list(analyses or []), on_analysis, on_scan_done,
                                     niceness=niceness, idle=idle)

    # ------------------------------------------------------------------ counters
    @property
    def analysis_errors(self) -> int:
        return self.analyst.errors

    @property
    def scan_results(self) -> dict[str, list[dict]]:
        """run id -> per finished scan: {"scan", "hdf5", "complete", <analysis name>: summary}."""
        return self.analyst.scan_results

    @property
    def backlog(self) -> int:
        """Finished scans written but not yet analysed (the final analyst's queue)."""
        return self.analyst.scans_waiting

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self.analyst.start()
        super().start()

    def run(self) -> None:
        self.priority = lower_thread_priority(self.niceness)
        while True:
            item = self.queue.get()
            if item is None:
                self.analyst.put(None)
                return
            kind, payload = item
            if kind != "scan":
                self.analyst.put(item)
                continue
            scan_file = _ScanFile()
            self.analyst.put(("scan", (payload, scan_file)))  # the analysis starts while the file is written
            try:
                scan_file.path = write_scan(payload, scan_path(self.output_dir, payload.run_id, payload.scan))
                self.written.append(scan_file.path)
                log.info("wrote %s", scan_file.path)
                for sink in self.scan_sinks:
                    sink(payload)
            except Exception:  # a full disk must not stop acquisition; it is logged and counted
                self.errors += 1
                log.exception("could not write scan results")
            finally:
                scan_file.ready.set()

    def stop(self) -> None:
        """Write and analyse everything queued, then end both threads."""
        self.queue.put(None)
        if self.ident is not None:
            self.join()
        else:
            self.analyst.put(None)
        if self.analyst.ident is not None:
            self.analyst.join()


class _FinalAnalyst(threading.Thread):
    """Per finished scan, in order: every analysis' ``on_scan`` and the ``on_analysis`` hook,
    then (once the writer has written the file) every ``write_result`` and ``on_scan_done``;
    per run: the run summary with each analysis' ``run_summary``."""

    def __init__(self, writer: ResultsWriter, analyses: list,
                 on_analysis: Callable[[Any, ScanImages, Any, float], None] | None,
                 on_scan_done: Callable[[ScanImages, Path | None, dict], None] | None,
                 *, niceness: int, idle: bool):
        super().__init__(name="livestereo-final-analyses", daemon=True)
        self.writer = writer
        self.analyses = analyses
        self.on_analysis = on_analysis
        self.on_scan_done = on_scan_done
        self.niceness = niceness
        self.idle = idle
        self.priority = "normal"
        """What :func:`lower_thread_priority` applied once the thread started."""
        self.errors = 0
        self.scan_results: dict[str, list[dict]] = {}
        self.scans_in = 0
        """Finished scans handed over (counted by the writer's thread only)."""
        self.scans_out = 0
        """Finished scans done (counted by this thread only)."""
        self._queue: queue.Queue = queue.Queue()
        self._last_trim = 0.0
        self._warned = False

    @property
    def scans_waiting(self) -> int:
        return self.scans_in - self.scans_out

    def put(self, item) -> None:
        if item is not None and item[0] == "scan":
            self.scans_in += 1
            if self.scans_waiting > BACKLOG_WARNING and not self._warned:
                self._warned = True
                log.warning("%d finished scans wait for their analyses (the CPU is short): their files are "
                            "written; their 3D results follow in order", self.scans_waiting)
        self._queue.put(item)

    def run(self) -> None:
        self.priority = lower_thread_priority(self.niceness, idle=self.idle)
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload = item
            try:
                if kind == "scan":
                    self._scan(*payload)
                else:
                    self._run_summary(payload)
            except Exception:
                self.errors += 1
                log.exception("could not finish the %s results", kind)
            finally:
                if kind == "scan":
                    self.scans_out += 1
                    if self.scans_waiting <= BACKLOG_WARNING // 2:
                        self._warned = False

    def _run_summary(self, payload: dict) -> None:
        for a in self.analyses:
            fn = getattr(a, "run_summary", None)
            if fn is None:
                continue
            try:
                extra = fn(payload["run_id"])
            except Exception:
                self.errors += 1
                log.exception("%s: run summary failed", a.name)
                extra = None
            if extra:
                payload[a.name] = extra
        payload["scan_results"] = self.scan_results.pop(payload["run_id"], [])
        try:
            path = write_run_summary(self.writer.output_dir, payload)
        except Exception:
            self.writer.errors += 1
            log.exception("could not write the run summary")
            return
        self.writer.written.append(path)
        log.info("wrote %s", path)

    def _scan(self, scan: ScanImages, scan_file: _ScanFile) -> None:
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
        scan_file.ready.wait()
        path = scan_file.path
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
        self.errors += 1
        log.error("run %s scan %d: %s analysis failed: %s", scan.run_id, scan.scan, a.name, exc,
                  exc_info=self.errors <= 3)
