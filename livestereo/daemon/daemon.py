"""``livestereo run``: poll a source, record, ingest, and hand results to the sinks.

Threads: the ingest loop (this thread; the numba kernels release the GIL) and one results
writer. Finished scans go to the writer through an unbounded queue (a scan is a few MB and
must never be lost); partial snapshots go to ``self.snapshots``, a latest-wins slot.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from livestereo.daemon.config import DaemonConfig
from livestereo.daemon.ingest import Ingest
from livestereo.daemon.latest import Latest
from livestereo.daemon.products import ScanImages
from livestereo.daemon.results import scan_path, write_run_summary, write_scan
from livestereo.daemon.status import StatusLine
from livestereo.daemon.worker import LatestWorker
from livestereo.protocol.codec import encode
from livestereo.protocol.source import Source

log = logging.getLogger("livestereo.daemon")

ScanSink = Callable[[ScanImages], None]


class ResultsWriter(threading.Thread):
    """Writes each finished scan to HDF5 and each run summary to JSON, off the ingest thread."""

    def __init__(self, output_dir: Path, scan_sinks: list[ScanSink] | None = None):
        super().__init__(name="livestereo-results", daemon=True)
        self.output_dir = Path(output_dir)
        self.scan_sinks = list(scan_sinks or [])
        self.queue: queue.Queue = queue.Queue()
        self.written: list[Path] = []
        self.errors = 0

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            kind, payload = item
            try:
                if kind == "scan":
                    path = write_scan(payload, scan_path(self.output_dir, payload.run_id, payload.scan))
                    self.written.append(path)
                    log.info("wrote %s", path)
                    for sink in self.scan_sinks:
                        sink(payload)
                else:
                    path = write_run_summary(self.output_dir, payload)
                    self.written.append(path)
                    log.info("wrote %s", path)
            except Exception:  # a full disk must not stop acquisition; it is logged and counted
                self.errors += 1
                log.exception("could not write %s results", kind)

    def stop(self) -> None:
        self.queue.put(None)
        self.join()


class Daemon:
    """Runs one source through ingest until stopped, the source ends, or ``max_runs`` runs ended."""

    def __init__(self, cfg: DaemonConfig, source: Source, *, scan_sinks: list[ScanSink] | None = None,
                 status: StatusLine | None = None):
        self.cfg = cfg
        self.source = source
        self.snapshots: Latest[ScanImages] = Latest()
        self.workers: list[LatestWorker] = []
        scan_sinks = list(scan_sinks or [])
        if cfg.particles:
            from livestereo.daemon.particles import ParticleAnalysis, log_live

            particles = ParticleAnalysis(cfg.output_dir, cfg.particles_config)
            scan_sinks.append(particles.on_scan)
            self.workers.append(LatestWorker("particles", particles.analyse, accept=particles.applies, on_result=log_live))
        self.writer = ResultsWriter(cfg.output_dir, scan_sinks)
        self.runs_ended: list[dict] = []
        self.ingest = Ingest(
            cfg.layout, cfg.limits, disc_frames=cfg.disc_frames, snapshot_interval_s=cfg.snapshot_interval_s,
            on_scan=self._on_scan, on_snapshot=self._on_snapshot, on_run_end=self._on_run_end,
        )
        self.status = status or StatusLine(cfg.status_interval_s)
        self.stop_event = threading.Event()
        self.recorder = None
        if cfg.record is not None:
            from livestereo.recording.format import RecordingWriter

            self.recorder = RecordingWriter(cfg.record)

    def _on_snapshot(self, snap: ScanImages) -> None:
        self.snapshots.put(snap)
        for w in self.workers:
            w.slot.put(snap)

    def _on_scan(self, result: ScanImages) -> None:
        self._on_snapshot(result)
        self.writer.queue.put(("scan", result))

    def _on_run_end(self, summary: dict) -> None:
        summary["counters"] = self.ingest.counters.as_dict()
        self.runs_ended.append(summary)
        self.writer.queue.put(("run", summary))

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
        self.writer.start()
        for w in self.workers:
            w.start()
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
            source.close()
            if recorder is not None:
                recorder.close()
                log.info("recorded to %s", cfg.record)
        return 1 if self.writer.errors else 0

    def stop(self) -> None:
        self.stop_event.set()
