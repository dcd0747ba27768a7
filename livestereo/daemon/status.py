"""The compact status line printed every second, and a progress bar in a terminal."""

from __future__ import annotations

import logging
import sys
import time

from livestereo.daemon.ingest import Counters

log = logging.getLogger("livestereo.status")


def format_rate(n: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


class StatusLine:
    """Every ``interval_s``: frames/s, GB/s, rejected, gaps, scans done, and finished scans
    whose analyses are still waiting when there are any (and a tqdm bar on a tty)."""

    def __init__(self, interval_s: float = 1.0, *, progress: bool | None = None, stream=None):
        self.interval_s = interval_s
        self.stream = stream or sys.stderr
        self.progress = self.stream.isatty() if progress is None else progress
        self._bar = None
        self._t = time.monotonic()
        self._frames = 0
        self._bytes = 0
        self.last_line = ""
        self.frames_per_s = 0.0
        self.gb_per_s = 0.0

    def due(self) -> bool:
        """True when the next line is due (cheap: call it per message)."""
        return time.monotonic() - self._t >= self.interval_s

    def update(self, counters: Counters, run_desc: str, total_frames: int | None, force: bool = False,
               awaiting_analysis: int = 0) -> None:
        now = time.monotonic()
        dt = now - self._t
        if dt < self.interval_s and not force:
            return
        fps = (counters.frames - self._frames) / dt if dt > 0 else 0.0
        gbs = (counters.bytes - self._bytes) / dt / 1e9 if dt > 0 else 0.0
        self._t, self._frames, self._bytes = now, counters.frames, counters.bytes
        self.frames_per_s, self.gb_per_s = fps, gbs
        self.last_line = (
            f"{run_desc} | {format_rate(fps)} frames/s {gbs:.2f} GB/s | frames {counters.frames} | "
            f"rejected {counters.rejected_total} | gaps {counters.gaps} | scans done {counters.scans_done}"
        )
        if awaiting_analysis:
            self.last_line += f" | {awaiting_analysis} awaiting analysis"
        if self.progress:
            self._progress(counters, total_frames)
        else:
            log.info("%s", self.last_line)

    def _progress(self, counters: Counters, total: int | None) -> None:
        from tqdm import tqdm

        if self._bar is None or (total and self._bar.total != total):
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total or None, unit="frame", unit_scale=True, file=self.stream, dynamic_ncols=True)
        self._bar.n = counters.frames
        self._bar.set_postfix_str(self.last_line.split(" | ", 1)[-1], refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
