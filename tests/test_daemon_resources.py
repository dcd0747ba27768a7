"""How the daemon shares a small machine: thread priorities and memory release."""

import os
import sys
import threading

import numpy as np
import pytest

from livestereo.daemon.memory import release_free_memory, tune_malloc
from livestereo.priority import lower_thread_priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are a Linux feature")
def test_lower_thread_priority_changes_only_the_calling_thread():
    seen = {}

    def worker():
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        lower_thread_priority(3)
        seen["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["delta"] == 3 or os.getpriority(os.PRIO_PROCESS, 0) + 3 > 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
    lower_thread_priority(0)  # no change, no error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is a Linux scheduling class")
def test_idle_class_applies_to_the_calling_thread_only():
    seen = {}

    def worker():
        seen["applied"] = lower_thread_priority(0, idle=True)
        seen["policy"] = os.sched_getscheduler(threading.get_native_id())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"applied": "idle", "policy": os.SCHED_IDLE}
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is a Linux scheduling class")
def test_window_process_starts_in_the_idle_class():
    import subprocess

    from livestereo.priority import lower_process_priority

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], preexec_fn=lower_process_priority)
    try:
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
    finally:
        child.kill()
        child.wait()


def _finished_scan(scan: int):
    from livestereo.daemon.products import LayoutInfo, ScanImages
    from livestereo.protocol.messages import Calibration

    shape = (16, 16)
    valid = np.ones(shape, bool)
    lay = LayoutInfo(("a", "b"), ("view", "view"), np.array([[-20.0, 0.0], [20.0, 0.0]]),
                     np.ones((2, 8, 8), np.float32), None, None)
    return ScanImages("r", scan, 9, np.random.default_rng(scan).random((2, *shape)), valid, lay,
                      Calibration(convergence_semiangle_mrad=30.0, scan_step_nm=1.0), {}, True, True, {"frames": 256})


class _BlockedAnalysis:
    """A finished-scan analysis that waits for ``release``, as a starved one would."""

    name = "blocked"

    def __init__(self):
        self.release = threading.Event()
        self.order: list = []
        self.policy = None

    def applies(self, scan):
        return True

    def on_scan(self, scan):
        self.policy = os.sched_getscheduler(threading.get_native_id())
        assert self.release.wait(20)
        self.order.append(("on_scan", scan.scan))
        return {"scan": scan.scan}

    def write_result(self, scan, result, path):
        assert path.exists()  # the writer wrote it first
        self.order.append(("write_result", scan.scan))

    def scan_summary(self, scan, result):
        return {"n_lines": scan.scan}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is a Linux scheduling class")
def test_scan_files_are_written_while_their_analyses_wait(tmp_path):
    """A starved (idle-class) reconstruction never holds back the finished scans' files; the
    analyses then run in order and the scan_done hook follows each."""
    import time

    from livestereo.daemon.writer import ResultsWriter

    ana = _BlockedAnalysis()
    done = []
    writer = ResultsWriter(tmp_path, analyses=[ana], idle=True,
                           on_scan_done=lambda scan, path, extra: done.append((scan.scan, path.name, extra)))
    writer.start()
    try:
        for k in range(3):
            writer.queue.put(("scan", _finished_scan(k)))
        files = [tmp_path / "r" / f"scan_{k:04d}.h5" for k in range(3)]
        t0 = time.monotonic()
        while not all(f.exists() for f in files) and time.monotonic() - t0 < 20:
            time.sleep(0.01)
        assert all(f.exists() for f in files)
        assert writer.backlog == 3 and ana.order == [] and done == []
        ana.release.set()
        writer.queue.put(("run", {"run_id": "r"}))
    finally:
        ana.release.set()
        writer.stop()
    assert ana.policy == os.SCHED_IDLE and writer.analyst.priority == "idle" and writer.priority == "normal"
    assert ana.order == [(step, k) for k in range(3) for step in ("on_scan", "write_result")]
    assert done == [(k, f"scan_{k:04d}.h5", {"n_lines": k}) for k in range(3)]
    assert writer.backlog == 0 and writer.errors == 0 and writer.analysis_errors == 0
    assert (tmp_path / "r" / "run.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_malloc_settings_apply_and_free_pages_are_returned():
    assert tune_malloc() is True
    blocks = [np.ones(4096, np.uint8) for _ in range(20000)]  # ~80 MB of small heap blocks
    del blocks[::2]
    del blocks
    assert isinstance(release_free_memory(), bool)
