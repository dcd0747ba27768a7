"""CPU priorities: whatever is downstream of the virtual images yields to ingest (Linux).

On a small machine the sender, libzmq's IO threads and the ingest loop can keep every core
busy. Analyses, the results publisher and the live window then run in the SCHED_IDLE class:
they get only the CPU time nothing of normal priority wants and give it back the moment
ingest needs it. A nice value alone is not enough: a nice-19 thread still takes its slice
on every wake-up (tools/bench_live.py (b): 0.89x of the bare daemon with nice 19, 0.95-0.98x
idle). Where SCHED_IDLE is refused (another OS, a restricted container), nice values apply.
No imports beyond the standard library: every layer may use it.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("livestereo.priority")

VIEW_NICENESS = 5
"""Where the idle class is refused: the window process runs this much nicer than the daemon."""


def lower_thread_priority(niceness: int, *, idle: bool = False) -> str:
    """Lower the calling thread's CPU priority (Linux: per thread; elsewhere a no-op) so that
    on a busy machine ingest and a sender come first and analyses wait.

    ``idle``: the SCHED_IDLE class: the thread runs only on CPU time that no thread of normal
    priority wants, and yields the moment one does (nice values do not apply to it); where
    that is refused, the nice value is raised instead. Otherwise its nice value is raised by
    ``niceness``. Returns what applies now: ``"idle"``, ``"nice +N"`` or ``"normal"``.
    """
    tid = threading.get_native_id()
    if idle and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError as exc:
            log.debug("cannot put %s in the idle class: %s", threading.current_thread().name, exc)
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return "normal"
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(niceness)))
        return f"nice +{int(niceness)}"
    except OSError as exc:  # not permitted here: run at normal priority
        log.debug("cannot lower the priority of %s: %s", threading.current_thread().name, exc)
        return "normal"


def lower_process_priority(niceness: int = VIEW_NICENESS) -> str:
    """The calling process in the SCHED_IDLE class, else ``niceness`` steps nicer: for the
    live window, as the ``preexec_fn`` of its Popen, where the calling thread is the whole
    process and what it gets passes on to everything it starts. A window then never slows
    ingest (llvmpipe renders on the CPU); on a busy machine it only redraws less often.
    Returns ``"idle"``, ``"nice +N"`` or ``"normal"``."""
    return lower_thread_priority(niceness, idle=True)
