"""How the daemon shares a small machine: thread priorities and memory release."""

import os
import sys
import threading

import numpy as np
import pytest

from livestereo.daemon.memory import release_free_memory, tune_malloc
from livestereo.daemon.worker import lower_thread_priority


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_malloc_settings_apply_and_free_pages_are_returned():
    assert tune_malloc() is True
    blocks = [np.ones(4096, np.uint8) for _ in range(20000)]  # ~80 MB of small heap blocks
    del blocks[::2]
    del blocks
    assert isinstance(release_free_memory(), bool)
