"""Throughput of the accumulation kernels against the machine's read bandwidth.

``bench_accumulation(seconds)`` is printed by tools/bench_ingest.py.  It fills a buffer of
256 x 256 uint16 frames (about 1 GiB: larger than the caches, so every pass streams from
memory), then measures

1. the read-bandwidth baseline: numpy sum of the same buffer viewed as uint64 (one thread);
2. Accumulator.add over the buffer, in batches of 256 frames (one message's worth), for
   realistic layouts from build_layout (disc radius 60 px, alpha 25 mrad): 2 stereo views,
   8 multiview regions, stereo + BF + ADF, plus two full-frame worst cases (binary halves:
   every pixel read; smooth per-pixel weights: every pixel read and multiplied);
3. the ratio of each to the baseline, in frame bytes per second (nominal: the kernels read
   only the masks' support, so layouts covering little of the frame beat the baseline).

Every layout runs three times: on numba's thread pool (threads = numba.get_num_threads()),
serially (threads = 1, comparable with the one-thread numpy baseline), and with the
default choice by measured cost (threads = 0, printed "auto").  Each row is a dict:
case, threads, n_det, support (fraction of pixels read), frames_per_s, gb_per_s (frame
bytes / s, 1e9), ratio (gb_per_s / baseline gb_per_s), passes (median of passes taken).
On a shared machine other processes distort the parallel rows most (a parallel batch waits
for its slowest thread); quote ratios from one run.
"""

from __future__ import annotations

import time

import numba
import numpy as np

from livestereo.compute.accumulate import Accumulator
from livestereo.compute.layouts import LayoutSpec, build_layout
from livestereo.protocol.messages import Calibration, StartMessage

__all__ = ["bench_accumulation", "bench_layouts"]

_SHAPE = (256, 256)
_BATCH = 256


def bench_layouts() -> dict[str, np.ndarray]:
    """The benchmark's weight matrices ((n_det, 65536) float32) by case name."""
    cal = Calibration(
        convergence_semiangle_mrad=25.0, scan_step_nm=1.0, disc_center_px=(127.6, 128.3), disc_radius_px=60.0
    )
    start = StartMessage(
        version=1, run_id="bench", detector="pixelated", scan_shape=(64, 64), frame_shape=_SHAPE,
        dtype="uint16", calibration=cal,
    )
    out = {
        "stereo (2 views)": build_layout(LayoutSpec(kind="stereo"), start).weights_matrix(),
        "multiview (8 views)": build_layout(LayoutSpec(kind="multiview", k=8), start).weights_matrix(),
        "stereo + bf + adf (4)": build_layout(LayoutSpec(kind="stereo", with_bf_adf=True), start).weights_matrix(),
    }
    npix = _SHAPE[0] * _SHAPE[1]
    halves = np.zeros((2, npix), dtype=np.float32)
    halves[0, : npix // 2] = 1.0
    halves[1, npix // 2 :] = 1.0
    out["full frame, 2 binary halves"] = halves
    yy, xx = np.mgrid[0 : _SHAPE[0], 0 : _SHAPE[1]]
    g = np.exp(-((yy - 128.0) ** 2 + (xx - 128.0) ** 2) / (2 * 80.0**2)).astype(np.float32).reshape(-1)
    out["full frame, 2 smooth weights"] = np.stack([g, (xx.reshape(-1) / 255.0).astype(np.float32) + 0.01])
    return out


def _fill(buffer_bytes: int) -> np.ndarray:
    frame_bytes = _SHAPE[0] * _SHAPE[1] * 2
    n = max(_BATCH, (int(buffer_bytes) // frame_bytes) // _BATCH * _BATCH)
    buf = np.empty((n, *_SHAPE), dtype=np.uint16)
    rng = np.random.default_rng(1)
    block = rng.poisson(30.0, size=(_BATCH, *_SHAPE)).astype(np.uint16)
    for i in range(0, n, _BATCH):
        buf[i : i + _BATCH] = block
        buf[i : i + _BATCH, 0, 0] = i // _BATCH  # not all blocks identical
    return buf


def _passes(fn, budget_s: float, min_passes: int = 2) -> tuple[list[float], list[float]]:
    """Wall-clock and calling-thread CPU seconds of repeated calls of fn, for about budget_s."""
    wall, cpu = [], []
    t_end = time.perf_counter() + budget_s
    while len(wall) < min_passes or time.perf_counter() < t_end:
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def bench_accumulation(seconds: float = 10.0, buffer_bytes: int = 1 << 30) -> list[dict]:
    """Measure accumulation throughput for about ``seconds`` (plus set-up); see module doc.

    Rows with threads == 1 (the baseline and the serial kernel) also carry cpu_gb_per_s and
    cpu_ratio, from the calling thread's CPU time: on a machine shared with other busy
    processes they show what the code does when it gets a core (memory contention stays).
    """
    buf = _fill(buffer_bytes)
    n = buf.shape[0]
    nbytes = buf.nbytes
    layouts = bench_layouts()
    budget = max(float(seconds), 0.1) / (len(layouts) + 1)
    rows = []

    flat64 = buf.reshape(-1).view(np.uint64)
    flat64.sum()  # touch every page once
    wall, cpu = _passes(lambda: flat64.sum(), budget)
    base = nbytes / float(np.median(wall)) / 1e9
    base_cpu = nbytes / float(np.median(cpu)) / 1e9
    rows.append(
        dict(case="baseline: numpy uint64-view sum", threads=1, n_det=0, support=1.0,
             frames_per_s=n / float(np.median(wall)), gb_per_s=base, ratio=1.0, passes=len(wall),
             cpu_gb_per_s=base_cpu, cpu_ratio=1.0)
    )

    for name, w in layouts.items():
        for parallel in (True, False, None):
            acc = Accumulator(w, n, parallel=parallel)
            acc.add(buf[:_BATCH], 0)  # compile / load the cached kernels
            acc.add(buf[:1], 0)

            def run(acc=acc):
                for i in range(0, n, _BATCH):
                    acc.add(buf[i : i + _BATCH], i)

            wall, cpu = _passes(run, budget / 3)
            med = float(np.median(wall))
            gbs = nbytes / med / 1e9
            row = dict(case=name, threads={True: numba.get_num_threads(), False: 1, None: 0}[parallel],
                       n_det=int(w.shape[0]), support=acc.support_fraction, frames_per_s=n / med, gb_per_s=gbs,
                       ratio=gbs / base, passes=len(wall), cpu_gb_per_s=None, cpu_ratio=None)
            if parallel is False:
                row["cpu_gb_per_s"] = nbytes / float(np.median(cpu)) / 1e9
                row["cpu_ratio"] = row["cpu_gb_per_s"] / base_cpu
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of bench_accumulation rows (threads 0 = automatic choice)."""
    lines = [
        f"{'case':<34s} {'threads':>7s} {'n_det':>5s} {'read':>6s} {'frames/s':>11s} {'GB/s':>7s} {'ratio':>6s}"
        f" {'cpu GB/s':>9s} {'cpu ratio':>9s}"
    ]
    for r in rows:
        cpu = r.get("cpu_gb_per_s")
        lines.append(
            f"{r['case']:<34s} {r['threads'] or 'auto':>7} {r['n_det']:>5d} {r['support']:>6.1%}"
            f" {r['frames_per_s']:>11,.0f} {r['gb_per_s']:>7.2f} {r['ratio']:>6.2f}"
            + (f" {cpu:>9.2f} {r['cpu_ratio']:>9.2f}" if cpu is not None else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(format_rows(bench_accumulation(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)))
