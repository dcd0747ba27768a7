"""Running the live window: choosing the GL backend, the interactive loop, the headless loop.

With a display, the window is a normal vispy window (whatever Qt / glfw / ... backend vispy
finds) that pulls from the model as soon as something new arrives, at most 20 times a
second (:class:`RedrawPacer`). Without one (no ``DISPLAY`` /
``WAYLAND_DISPLAY``) or with a snapshot folder, vispy's EGL backend renders offscreen
(``EGL_PLATFORM=surfaceless``: Mesa's llvmpipe needs no GPU and no X server) and the loop
writes PNG snapshots: ``latest.png`` at most every ``snapshot_interval_s`` while something
changes, ``scan_NNNN.png`` shortly after each scan ends, and ``latest.png`` again on exit.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from livestereo.view.launch import has_display  # noqa: F401  (re-exported)

log = logging.getLogger("livestereo.view")


class ViewError(RuntimeError):
    """The window cannot run (no GL backend, bad endpoint); the message says what to do."""


class RedrawPacer:
    """When the window pulls from its model and draws: as soon as the client thread has
    folded something in (``state.changed``), at most ``rate_hz`` times a second, and at least
    every ``idle_s`` (the status line's ages). A result that arrives just after a draw waits
    at most one period; one that arrives after a quiet spell is drawn at once (the old fixed
    20 Hz tick added 25 ms on average, 50 ms at worst). While the model is ``holding()`` (a
    finished scan's result is on its way) nothing is drawn.

    ``wait`` blocks (the headless loop); ``due`` is the non-blocking test for a GUI timer.
    """

    def __init__(self, state, rate_hz: float = 20.0, idle_s: float = 0.5, clock=time.monotonic):
        self.state = state
        self.period = 1.0 / float(rate_hz)
        self.idle_s = float(idle_s)
        self.clock = clock
        self.last = -1e9
        self.held = False

    def due(self) -> bool:
        """True (and the change flag taken) when an update should run now."""
        now = self.clock()
        if now - self.last < self.period:
            return False
        holding = getattr(self.state, "holding", None)
        self.held = holding is not None and holding()
        if self.held:  # a finished scan's result is on its way
            return False
        if self.state.changed.is_set() or now - self.last >= self.idle_s:
            self.state.changed.clear()
            self.last = now
            return True
        return False

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Block until an update is due; False if ``stop`` was set meanwhile."""
        while True:
            if stop is not None and stop.is_set():
                return False
            if self.due():
                return True
            now = self.clock()
            cap = self.last + self.period - now
            if cap > 0:  # drew less than a period ago
                if stop is not None:
                    stop.wait(cap)
                else:
                    time.sleep(cap)
                continue
            if self.held:  # wake on the batch that ends the hold
                self.state.changed.clear()
                timeout = 0.05
            else:
                timeout = max(0.0, self.last + self.idle_s - now)
            self.state.changed.wait(min(timeout, 0.1) if stop is not None else timeout)




def use_backend(headless: bool) -> str:
    """Select vispy's app backend before any canvas exists; the backend's name.

    Raises:
        ViewError: no usable backend, with what to install.
    """
    import vispy
    import vispy.app

    if headless:
        os.environ.setdefault("EGL_PLATFORM", "surfaceless")
        try:
            vispy.use(app="egl")
            app = vispy.app.use_app()
        except Exception as exc:
            raise ViewError(
                f"headless rendering needs EGL (Mesa's libEGL + llvmpipe, e.g. apt install libegl1 libgl1-mesa-dri): "
                f"vispy's EGL backend failed: {exc}") from None
        return getattr(app, "backend_name", "egl")
    try:
        app = vispy.app.use_app()
    except Exception as exc:
        raise ViewError(
            f"no GUI backend for vispy ({exc}); install one (pip install PyQt6 or glfw), or render headless to PNG "
            f"files with --snapshot-dir DIR") from None
    return app.backend_name


def headless_gl_problem(timeout: float = 60.0) -> str | None:
    """Why headless rendering does not work here (None: it works), probed in a child process
    so the caller keeps its own GL backend choice free."""
    import subprocess
    import sys

    code = ("from livestereo.view.app import use_backend; use_backend(True); "
            "from livestereo.view.window import LiveWindow; from livestereo.view.model import ViewState; "
            "LiveWindow(ViewState(), size=(96, 64)).render()")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "the EGL probe timed out"
    if r.returncode:
        lines = r.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {r.returncode}"
    return None


def write_png(path: Path, rgba: np.ndarray) -> Path:
    """Write an RGBA / RGB uint8 array as a PNG, atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        import imageio.v3 as iio

        iio.imwrite(tmp, rgba)
    except ImportError:
        from vispy.io import write_png as vwrite

        vwrite(str(tmp), rgba)
    os.replace(tmp, path)
    return path


def _scan_png(folder: Path, done: dict, fallback: int) -> Path:
    """<folder>/<run id>/scan_NNNN.png: beside the daemon's scan_NNNN.h5 when folder is its output folder."""
    run = re.sub(r"[^A-Za-z0-9._-]", "_", str(done.get("run_id") or "")).lstrip(".")
    scan = done.get("scan")
    name = f"scan_{int(scan) if isinstance(scan, int) else fallback:04d}.png"
    return folder / run / name if run else folder / name


def _save(path: Path, win) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, win.render())
    except OSError as exc:  # a full disk must not end the window
        log.warning("cannot write %s: %s", path, exc)


class _Stop:
    def __init__(self):
        self.event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


def run_headless(endpoint: str, snapshot_dir: Path, *, size=(1280, 800), snapshot_interval_s: float = 2.0,
                 max_seconds: float | None = None, exit_after_scans: int | None = None,
                 exit_when_idle_s: float | None = None, rate_hz: float = 20.0,
                 on_tick: Callable[[], None] | None = None) -> int:
    """Receive ``endpoint`` and write PNG snapshots into ``snapshot_dir`` until told to stop."""
    from livestereo.view.client import LiveClient
    from livestereo.view.model import ViewState

    use_backend(headless=True)
    from livestereo.view.window import LiveWindow

    snapshot_dir = Path(snapshot_dir)
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    state = ViewState()
    try:
        win = LiveWindow(state, size=size)
        win.render()  # fail now, clearly, if GL does not work
    except Exception as exc:
        raise ViewError(f"headless OpenGL rendering failed: {exc}") from None
    try:
        client = LiveClient(endpoint, state).start()
    except Exception as exc:
        raise ViewError(f"cannot connect to {endpoint}: {exc}") from None
    stop = _Stop()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: stop.set("signal"))
    log.info("live window (headless): %s -> snapshots in %s", endpoint, snapshot_dir)
    t0 = time.monotonic()
    last_snap, dirty, n_done, pending = -1e9, True, 0, {}
    pacer = RedrawPacer(state, rate_hz, idle_s=0.25)
    try:
        while not stop.event.is_set():
            tick = time.monotonic()
            dirty |= win.update()
            if on_tick is not None:
                on_tick()
            done, n_done = state.scans_done_since(n_done)
            for d in done:
                pending[_scan_png(snapshot_dir, d, n_done)] = tick + 1.0  # the final results may follow scan_done
            for path, deadline in list(pending.items()):
                if tick >= deadline:
                    _save(path, win)
                    del pending[path]
            if dirty and tick - last_snap >= snapshot_interval_s and state.received:
                _save(snapshot_dir / "latest.png", win)
                last_snap, dirty = tick, False
            if max_seconds is not None and tick - t0 >= max_seconds:
                stop.set("max seconds")
            if exit_after_scans is not None and n_done >= exit_after_scans and not pending:
                stop.set(f"{n_done} scan(s) done")
            if exit_when_idle_s is not None and state.last_receive_time is not None \
                    and time.time() - state.last_receive_time > exit_when_idle_s:
                stop.set("the stream went quiet")
            if not client.alive:
                stop.set("receiver stopped")
            pacer.wait(stop.event)
        win.update()
        for path in pending:
            _save(path, win)
        _save(snapshot_dir / "latest.png", win)
        log.info("live window: stopped (%s); %d message(s), %d dropped", stop.reason, state.received, state.dropped)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        client.stop()
        win.close()
    return 0


def run_interactive(endpoint: str, *, size=(1280, 800), max_seconds: float | None = None, rate_hz: float = 20.0) -> int:
    """The window on the display; returns when it is closed."""
    from livestereo.view.client import LiveClient
    from livestereo.view.model import ViewState

    use_backend(headless=False)
    from vispy import app

    from livestereo.view.window import LiveWindow

    state = ViewState()
    win = LiveWindow(state, size=size, show=True, title=f"livestereo live - {endpoint}")
    try:
        client = LiveClient(endpoint, state).start()
    except Exception as exc:
        raise ViewError(f"cannot connect to {endpoint}: {exc}") from None
    # a cheap fast poll of the model's change flag; updates (and draws) at most rate_hz
    pacer = RedrawPacer(state, rate_hz)
    timer = app.Timer(interval=min(0.005, 1.0 / rate_hz), connect=lambda event: pacer.due() and win.update(),
                      start=True)
    if max_seconds is not None:
        app.Timer(interval=max_seconds, connect=lambda event: app.quit(), iterations=1, start=True)
    try:
        app.run()
    finally:
        timer.stop()
        client.stop()
    log.info("live window closed; %d message(s), %d dropped, %d update(s)", state.received, state.dropped, win.updates)
    return 0


def benchmark(n: int = 60, size=(1280, 800), image_px: int = 256, n_lines: int = 3) -> dict[str, float]:
    """Updates per second, each a new scan state: 2 image_px^2 views + overlays + 3D lines,
    decoded, composed (what the client thread does), uploaded and rendered offscreen."""
    from livestereo.protocol.live import decode_live
    from livestereo.view.model import ViewState
    from livestereo.view.synthetic import dislocation_scan

    use_backend(headless=True)
    from livestereo.view.window import LiveWindow

    scans = [dislocation_scan(scan=i, shape=(image_px, image_px), fill=min(1.0, (i + 1) / n), pub_seq=3 * i,
                              n_lines=n_lines, seed=i) for i in range(n)]
    state = ViewState()
    win = LiveWindow(state, size=size)
    state.feed_batch([decode_live(m) for m in scans[0].messages])
    win.update()
    win.render()  # shaders compiled, glyphs cached
    t0 = time.perf_counter()
    t_feed = 0.0
    for s in scans:
        t1 = time.perf_counter()
        state.feed_batch([decode_live(m) for m in s.messages])
        t_feed += time.perf_counter() - t1
        win.update()
        win.render()
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        win.canvas.update()
        win.render()
    dt_draw = time.perf_counter() - t0
    win.close()
    return {"updates_per_s": n / dt, "compose_ms": 1e3 * t_feed / n, "draw_only_per_s": n / dt_draw}
