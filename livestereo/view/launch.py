"""Start the live window as its own process (what ``livestereo run --view`` does).

The window runs in a separate process and process group: closing it, killing it or its
crashing never touches the daemon, and a Ctrl-C in the daemon's terminal does not reach it
twice. The daemon's publisher never waits for a subscriber, so a slow or dead window only
loses messages itself. No vispy here: the daemon imports this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from livestereo.priority import lower_process_priority

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5556"


def connect_endpoint(bind_endpoint: str) -> str:
    """The address to connect to for a bound endpoint: ``tcp://*:5556`` -> ``tcp://127.0.0.1:5556``."""
    for wild in ("tcp://*:", "tcp://0.0.0.0:"):
        if bind_endpoint.startswith(wild):
            return "tcp://127.0.0.1:" + bind_endpoint[len(wild):]
    return bind_endpoint


def view_command(endpoint: str, snapshot_dir: Path | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "livestereo", "view", "--connect", connect_endpoint(endpoint)]
    if snapshot_dir is not None:
        cmd += ["--snapshot-dir", str(snapshot_dir)]
    return cmd + [str(a) for a in extra_args]


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def launch_view(endpoint: str, snapshot_dir: Path | None = None, extra_args: Sequence[str] = (),
                log_path: Path | None = None, snapshots: str = "auto") -> subprocess.Popen:
    """Start ``livestereo view --connect endpoint`` in its own process group; the Popen.

    ``snapshots="auto"``: a window on the display when there is one, else headless PNG
    snapshots in ``snapshot_dir`` (the daemon's ``--view`` at the microscope and on a server);
    ``"always"``: headless snapshots in ``snapshot_dir`` even with a display.
    Its output goes to ``log_path`` when given (appended), else to this process's stderr.
    """
    if snapshots not in ("auto", "always"):
        raise ValueError(f"snapshots must be 'auto' or 'always', not {snapshots!r}")
    if snapshots == "auto" and has_display():
        snapshot_dir = None
    out = open(log_path, "ab") if log_path is not None else None
    try:
        return subprocess.Popen(view_command(endpoint, snapshot_dir, extra_args), stdin=subprocess.DEVNULL,
                                stdout=out if out is not None else subprocess.DEVNULL,
                                stderr=out if out is not None else None, start_new_session=True,
                                preexec_fn=lower_process_priority if os.name == "posix" else None)
    finally:
        if out is not None:
            out.close()


def wait_for_last_snapshot(proc: subprocess.Popen, snapshot_dir: Path, runs_ended: Sequence[dict],
                           timeout_s: float = 10.0) -> bool:
    """Give a headless window time to draw the last scan of the last run (it writes
    ``<run id>/scan_NNNN.png`` about a second after each scan ends) before it is stopped.
    ``runs_ended``: the daemon's run summaries (``run_id``, ``scans``). True when it was written."""
    import time

    if not runs_ended or not runs_ended[-1].get("scans"):
        return False
    run = runs_ended[-1]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(run["run_id"])).lstrip(".")
    target = Path(snapshot_dir) / safe / f"scan_{max(run['scans']):04d}.png"
    t0 = time.monotonic()
    while proc.poll() is None and not target.exists() and time.monotonic() - t0 < timeout_s:
        time.sleep(0.2)
    return target.exists()


def stop_view(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """Ask the window to finish (SIGTERM: headless writes its last snapshot), kill it if it does not; its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout)
