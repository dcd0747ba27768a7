"""The latest-wins slot and worker: a snapshot whose analysis must wait (Retry) is tried
again unless a newer one arrived, so the newest snapshot is analysed even when the stream
stops right after it."""

from __future__ import annotations

import threading
import time

from livestereo.daemon.latest import Latest
from livestereo.daemon.worker import LatestWorker, Retry


def _wait_for(cond, timeout=5.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


def test_restore_puts_back_only_into_an_empty_slot():
    slot: Latest[int] = Latest()
    slot.put(1)
    assert slot.get(0) == 1
    assert slot.restore(1) and slot.peek() == 1
    slot.put(2)  # replacing a restored item is not a second skip
    assert slot.replaced == 0
    assert slot.get(0) == 2
    slot.put(3)
    assert not slot.restore(2) and slot.get(0) == 3
    slot.put(4)
    slot.put(5)
    assert slot.replaced == 1
    slot.close()
    assert not slot.restore(5)


class _Busy:
    """An analysis that must wait while ``busy`` is set (as while a finished scan is reconstructed)."""

    def __init__(self):
        self.busy = threading.Event()
        self.analysed: list[int] = []

    def __call__(self, snap):
        if self.busy.is_set():
            raise Retry()
        self.analysed.append(snap)
        return snap * 10


def test_deferred_snapshot_is_analysed_once_the_cpu_is_free():
    ana = _Busy()
    ana.busy.set()
    w = LatestWorker("t", ana, retry_s=0.01)
    w.start()
    try:
        w.slot.put(7)  # the stream stops after this snapshot
        _wait_for(lambda: w.deferred >= 3)
        assert ana.analysed == [] and w.latest is None
        ana.busy.clear()
        _wait_for(lambda: w.done == 1)
        assert ana.analysed == [7] and w.latest[:2] == (7, 70)
        assert w.skipped == 0 and w.errors == 0
        time.sleep(0.05)
        assert w.done == 1  # analysed once, not again
    finally:
        w.stop()


def test_newer_snapshot_wins_over_a_deferred_one():
    ana = _Busy()
    ana.busy.set()
    w = LatestWorker("t", ana, retry_s=0.01)
    w.start()
    try:
        w.slot.put(1)
        _wait_for(lambda: w.deferred >= 1)
        w.slot.put(2)
        _wait_for(lambda: w.deferred >= 4)
        ana.busy.clear()
        _wait_for(lambda: w.done == 1)
        time.sleep(0.05)
        assert ana.analysed == [2] and w.done == 1
    finally:
        w.stop()
