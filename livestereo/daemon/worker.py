"""A latest-wins worker: analyses the newest snapshot, skipping stale ones; ingest never waits."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from livestereo.daemon.latest import Latest
from livestereo.daemon.products import ScanImages
from livestereo.priority import lower_thread_priority

log = logging.getLogger("livestereo.worker")


class Retry(Exception):
    """Raised by an ``analyse`` that cannot take this snapshot now (its CPU is given to a
    finished scan, say): the worker puts the snapshot back, unless a newer one has arrived,
    and tries again after ``retry_s``. So the newest snapshot is analysed even when the
    stream stops right after it."""


class LatestWorker(threading.Thread):
    """Runs ``analyse(snapshot)`` on the newest item of its own ``slot``.

    ``latest`` holds (snapshot, result, latency_s) of the last analysis; ``done`` counts
    analyses, ``skipped`` the snapshots replaced before they could be analysed, ``errors``
    the analyses that raised (logged, never fatal), ``deferred`` the times ``analyse``
    raised :class:`Retry`.
    """

    def __init__(self, name: str, analyse: Callable[[ScanImages], Any], *, accept: Callable[[ScanImages], bool] | None = None,
                 on_result: Callable[[ScanImages, Any, float], None] | None = None,
                 min_interval_s: float = 0.0, niceness: int = 0, idle: bool = False, retry_s: float = 0.1):
        super().__init__(name=f"livestereo-{name}", daemon=True)
        self.slot: Latest[ScanImages] = Latest()
        self.analyse = analyse
        self.accept = accept or (lambda s: True)
        self.on_result = on_result
        self.min_interval_s = float(min_interval_s)
        """Least time between the starts of two analyses (s): caps the CPU the worker takes."""
        self.retry_s = float(retry_s)
        """Wait (s) before a snapshot whose analysis raised :class:`Retry` is tried again."""
        self.niceness = int(niceness)
        """Added to this thread's nice value (Linux): ingest keeps priority on a busy machine."""
        self.idle = bool(idle)
        """Run in the SCHED_IDLE class (Linux; ``niceness`` then does not apply)."""
        self.priority = "normal"
        """What :func:`lower_thread_priority` applied once the thread started."""
        self.latest: tuple[ScanImages, Any, float] | None = None
        self.done = 0
        self.errors = 0
        self.deferred = 0
        self._halt = threading.Event()

    @property
    def skipped(self) -> int:
        return self.slot.replaced

    def run(self) -> None:
        self.priority = lower_thread_priority(self.niceness, idle=self.idle)
        last_start = -1e9
        while not self._halt.is_set():
            wait = last_start + self.min_interval_s - time.perf_counter()
            if wait > 0 and self._halt.wait(wait):
                return
            snap = self.slot.get(timeout=0.2)
            if snap is None:
                if self.slot.closed:
                    return
                continue
            try:
                if not self.accept(snap):
                    continue
            except Exception as exc:
                self.errors += 1
                log.warning("%s: cannot tell whether run %s applies: %s", self.name, snap.run_id, exc)
                continue
            t0 = last_start = time.perf_counter()
            try:
                result = self.analyse(snap)
            except Retry:
                self.deferred += 1
                self.slot.restore(snap)
                if self._halt.wait(self.retry_s):
                    return
                continue
            except Exception as exc:  # bad data must not kill the worker or the daemon
                self.errors += 1
                if self.errors <= 5:
                    log.warning("%s: analysis of run %s scan %d failed: %s", self.name, snap.run_id, snap.scan, exc)
                continue
            latency = time.perf_counter() - t0
            self.latest = (snap, result, latency)
            self.done += 1
            if self.on_result is not None:
                self.on_result(snap, result, latency)

    def stop(self) -> None:
        self._halt.set()
        self.slot.close()
        self.join(5)
