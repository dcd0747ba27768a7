"""Accumulation: every detector frame -> one value per virtual detector (design.md section 2).

images[d, first + i] = sum_p weights[d, p] * frames[i, p], in float64, for the
(n_det, npix) weights of a layout.  The kernels read only the pixels where some weight is
non-zero.  At construction each detector's support is cut into *pieces*: ranges
[start, stop) of consecutive flat pixel indices (C order over (det_y, det_x), or the
segments), sorted by start so that each frame is read in one forward pass:

- a *summed* piece is anchored on a plateau (>= 8 pixels of one weight c: the interior of
  a mask row): the kernel sums the raw pixel values of the range (exactly, in int64, for
  integer frames; in float64 with eight interleaved partial sums for float32 frames),
  multiplies by c, and adds (w - c) * value for the few *exceptions* of the range (the
  anti-aliased edge pixels).  Binary disjoint masks are the special case without
  exceptions: one contiguous integer sum per mask row, which vectorises;
- a *weighted* piece (no plateau: smooth weights) is a dot product of per-pixel weights
  with the pixel values (float64, four interleaved partial sums).

While reducing frame i the kernel prefetches the cache lines of frame i + 1 that the pieces
touch (spread over the pieces; long contiguous stretches are left to the hardware
prefetcher), which keeps sparse masks from waiting on memory latency.

Every frame is reduced in one fixed order (piece by piece, fixed partial-sum lanes), one
frame per loop iteration, so results are bit-identical for the same input whatever the
batch size, the thread count, the kernel (serial or parallel), and with the JIT disabled.
"""

from __future__ import annotations

import copy

import dataclasses
import threading
import time
import weakref

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["Accumulator", "FRAME_DTYPES", "KernelChoice", "kernel_choice", "PiecePlan", "cached_plan", "piece_table", "plan_pieces", "prefetch_schedule"]

#: dtypes the kernels accept (design.md section 3).
FRAME_DTYPES = ("uint8", "uint16", "uint32", "int16", "int32", "float32")

#: below this many frames one call runs the serial kernel (a thread-pool launch costs more).
PARALLEL_MIN_FRAMES = 8
#: parallel=None: weight of a new batch in the running cost per frame, and how often
#: (in batches) the kernel not in use is tried again: every _PROBE_EVERY batches after a
#: switch, doubling up to _PROBE_MAX while the probes confirm the choice.
_EWMA = 0.25
_PROBE_EVERY = 64
_PROBE_MAX = 2048
#: frames per parallel work item: between these, aiming at 4 items per thread.
_BLOCK_MIN, _BLOCK_MAX = 4, 64
_LINE = 64  # bytes per cache line
#: contiguous stretches longer than this many lines are left to the hardware prefetcher.
_HW_STREAM_LINES = 16

#: a run of at least this many pixels with one weight anchors a summed piece.
_MIN_ANCHOR = 8

# One parallel launch at a time from this module: the workqueue threading layer (the
# fallback when neither OpenMP nor TBB is present) aborts on concurrent launches, and two
# parallel launches on the same cores only oversubscribe them.  A caller that finds the
# pool busy runs the serial kernel instead, on its own thread.
_PARALLEL_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True, eq=False)
class PiecePlan:
    """The weights as pieces (see the module docstring); all arrays are (n_pieces,) unless noted.

    Attributes:
        start, stop: int64 flat pixel range [start, stop) of each piece, sorted by start.
        det: int64 detector the piece adds to.
        coef: float64 weight of a summed piece (coef * sum of the pixels).
        exc_lo, exc_hi: int64 range of the piece's exceptions in exc_pix / exc_dw.
        woff: int64 offset of a weighted piece's weights in ``wflat``; -1 for summed pieces.
        exc_pix: (n_exc,) int64 flat pixel index of each exception.
        exc_dw: (n_exc,) float64 weight minus coef of each exception.
        wflat: (n_w,) float32 per-pixel weights of the weighted pieces, back to back.
        n_support: pixels with a non-zero weight for some detector (read per frame).
    """

    start: np.ndarray
    stop: np.ndarray
    det: np.ndarray
    coef: np.ndarray
    exc_lo: np.ndarray
    exc_hi: np.ndarray
    woff: np.ndarray
    exc_pix: np.ndarray
    exc_dw: np.ndarray
    wflat: np.ndarray
    n_support: int

    @property
    def n_pieces(self) -> int:
        return int(self.start.shape[0])

    @property
    def n_weighted_pixels(self) -> int:
        return int(self.wflat.shape[0])


def plan_pieces(weights: np.ndarray) -> PiecePlan:
    """Cut ``weights`` ((n_det, npix) float32, >= 0) into summed and weighted pieces.

    Per detector, each contiguous range of its support is split at its plateaus (runs of
    >= _MIN_ANCHOR equal weights): one summed piece per plateau, reaching back to the end
    of the previous one (the first from the range start), whose other pixels become
    exceptions.  A range without a plateau becomes one weighted piece.
    """
    w = np.ascontiguousarray(weights, dtype=np.float32)
    ints: list[tuple[int, int, int, int, int, int]] = []  # start, stop, det, exc_lo, exc_hi, woff
    coefs: list[float] = []
    exc_pix: list[np.ndarray] = []
    exc_dw: list[np.ndarray] = []
    wparts: list[np.ndarray] = []
    n_exc = n_w = 0
    for d in range(w.shape[0]):
        sup = np.flatnonzero(w[d])
        if sup.size == 0:
            continue
        cut = np.flatnonzero(np.diff(sup) != 1) + 1  # contiguous ranges of the support
        for lo, hi in zip(np.r_[0, cut], np.r_[cut, sup.size]):
            a = int(sup[lo])
            vals = w[d, a : a + (hi - lo)]
            n = vals.shape[0]
            run_first = np.r_[0, np.flatnonzero(vals[1:] != vals[:-1]) + 1]
            run_len = np.diff(np.r_[run_first, n])
            anchors = run_first[run_len >= _MIN_ANCHOR]
            if anchors.size == 0:  # no plateau: per-pixel weights
                ints.append((a, a + n, d, n_exc, n_exc, n_w))
                coefs.append(0.0)
                wparts.append(vals)
                n_w += n
                continue
            bounds = np.r_[0, anchors[1:], n]
            for k in range(anchors.size):
                i0, i1 = int(bounds[k]), int(bounds[k + 1])
                c = vals[anchors[k]]
                part = vals[i0:i1]
                e = np.flatnonzero(part != c)
                ints.append((a + i0, a + i1, d, n_exc, n_exc + e.size, -1))
                coefs.append(float(c))
                exc_pix.append(a + i0 + e)
                exc_dw.append(part[e].astype(np.float64) - float(c))
                n_exc += e.size
    t = np.asarray(ints, dtype=np.int64).reshape(-1, 6)
    order = np.lexsort((t[:, 2], t[:, 0]))  # frame order: one forward pass per frame
    t = t[order]
    return PiecePlan(
        start=t[:, 0].copy(), stop=t[:, 1].copy(), det=t[:, 2].copy(),
        coef=np.asarray(coefs, dtype=np.float64)[order], exc_lo=t[:, 3].copy(), exc_hi=t[:, 4].copy(),
        woff=t[:, 5].copy(),
        exc_pix=np.concatenate(exc_pix).astype(np.int64) if exc_pix else np.zeros(0, np.int64),
        exc_dw=np.concatenate(exc_dw) if exc_dw else np.zeros(0, np.float64),
        wflat=np.concatenate(wparts).astype(np.float32) if wparts else np.zeros(0, np.float32),
        n_support=int(np.count_nonzero((w != 0).any(axis=0))),
    )


def prefetch_schedule(plan: PiecePlan, itemsize: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which pixels of the next frame to prefetch while each piece of this frame runs.

    Returns (pf_pix, pf_lo, pf_hi): one pixel index per 64-byte line the pieces touch
    (counted for a line-aligned frame), in frame order, except inside contiguous stretches
    longer than _HW_STREAM_LINES lines, which the hardware prefetcher streams better; piece
    s issues the prefetches pf_pix[pf_lo[s]:pf_hi[s]].
    """
    per_line = max(1, _LINE // int(itemsize))
    if plan.n_pieces == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z.copy(), z.copy()
    # lines of the union support; long contiguous stretches are left to the hardware
    # prefetcher (software prefetches there only compete with it), except their first lines
    cover = np.zeros(int(plan.stop.max()) // per_line + 2, dtype=np.int64)
    np.add.at(cover, plan.start // per_line, 1)
    np.add.at(cover, (plan.stop - 1) // per_line + 1, -1)
    touched = np.cumsum(cover) > 0
    idx = np.flatnonzero(touched)
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    keep = []
    for lo, hi in zip(np.r_[0, brk], np.r_[brk, idx.size]):
        keep.append(idx[lo : min(hi, lo + _HW_STREAM_LINES)] if hi - lo > _HW_STREAM_LINES else idx[lo:hi])
    pix = np.concatenate(keep) * per_line if keep else np.zeros(0, dtype=np.int64)
    # spread evenly over the pieces, in order (earlier pieces prefetch the earlier lines)
    edges = np.linspace(0, pix.size, plan.n_pieces + 1).round().astype(np.int64)
    return pix.astype(np.int64), edges[:-1].copy(), edges[1:].copy()


_PLAN_CACHE: list[tuple[np.ndarray, PiecePlan]] = []
_PLAN_CACHE_SIZE = 4
_PLAN_CACHE_LOCK = threading.Lock()


def cached_plan(weights: np.ndarray) -> PiecePlan:
    """plan_pieces(weights), reusing the plan of equal weights seen recently.

    A new Accumulator per scan of an in-situ series then costs a comparison (about a
    millisecond) instead of a new plan (tens of milliseconds for 512 x 512 layouts).
    """
    with _PLAN_CACHE_LOCK:
        for i, (w, plan) in enumerate(_PLAN_CACHE):
            if w.shape == weights.shape and np.array_equal(w, weights):
                _PLAN_CACHE.append(_PLAN_CACHE.pop(i))
                return plan
    plan = plan_pieces(weights)
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE.append((weights.copy(), plan))
        del _PLAN_CACHE[:-_PLAN_CACHE_SIZE]
    return plan


def _span_sum(seg, zero):
    """Sum of the 1-D array ``seg``, started from ``zero`` (its type is the sum's type).

    Integers: one exact int64 sum (the order does not matter, so LLVM vectorises it;
    summing uint16 in uint32 blocks streams long ranges faster but was measured slower on
    the short ranges of real masks).  Floats: float64 in a fixed order, eight interleaved
    partial sums (p mod 8) combined pairwise, so the compiled kernel can use SIMD while the
    result stays a fixed function of the input (this Python version, run when the JIT is
    disabled, gives the same bits).
    """
    if isinstance(zero, (float, np.floating)):
        return _span_sum_lanes(seg, zero)
    return _span_sum_simple(seg, zero)


def _span_sum_simple(seg, zero):
    tot = zero
    for p in range(seg.shape[0]):
        tot += seg[p]
    return tot


def _span_sum_lanes(seg, zero):
    n = seg.shape[0]
    s0 = zero
    s1 = zero
    s2 = zero
    s3 = zero
    s4 = zero
    s5 = zero
    s6 = zero
    s7 = zero
    n8 = n - n % 8
    for p in range(0, n8, 8):
        s0 += seg[p]
        s1 += seg[p + 1]
        s2 += seg[p + 2]
        s3 += seg[p + 3]
        s4 += seg[p + 4]
        s5 += seg[p + 5]
        s6 += seg[p + 6]
        s7 += seg[p + 7]
    for p in range(n8, n):
        s0 += seg[p]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@overload(_span_sum, jit_options={"nogil": True})
def _ol_span_sum(seg, zero):
    if isinstance(zero, types.Float):
        return _span_sum_lanes
    return _span_sum_simple


@intrinsic
def _prefetch_intrinsic(typingctx, arr, idx):
    """llvm.prefetch (read, into L2) of the cache line holding arr[idx]."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, cgutils.voidptr_t), ir.Constant(i32, 0), ir.Constant(i32, 2),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


def _prefetch(arr, idx):
    """Hint the CPU to fetch arr[idx] soon; a no-op in Python (JIT disabled)."""


@overload(_prefetch, jit_options={"nogil": True})
def _ol_prefetch(arr, idx):
    def impl(arr, idx):
        _prefetch_intrinsic(arr, idx)

    return impl


def _weighted_sum(w, seg):
    """sum_p w[p] * seg[p] in float64, four interleaved partial sums (p mod 4), fixed order."""
    n = seg.shape[0]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    n4 = n - n % 4
    for p in range(0, n4, 4):
        s0 += np.float64(w[p]) * np.float64(seg[p])
        s1 += np.float64(w[p + 1]) * np.float64(seg[p + 1])
        s2 += np.float64(w[p + 2]) * np.float64(seg[p + 2])
        s3 += np.float64(w[p + 3]) * np.float64(seg[p + 3])
    for p in range(n4, n):
        s0 += np.float64(w[p]) * np.float64(seg[p])
    return (s0 + s1) + (s2 + s3)


_weighted_sum_jit = numba.njit(nogil=True, cache=True)(_weighted_sum)


# columns of the kernels' int64 piece table
_START, _STOP, _DET, _EXC_LO, _EXC_HI, _WOFF, _PF_LO, _PF_HI = range(8)


_TABLES: "weakref.WeakKeyDictionary[PiecePlan, dict[int, tuple[np.ndarray, np.ndarray]]]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def piece_table(plan: PiecePlan, itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    """(table, pf_pix): the plan's integer arrays as one (n_pieces, 8) int64 table (columns
    start, stop, det, exc_lo, exc_hi, woff, pf_lo, pf_hi) and the prefetch pixels, for
    frames of ``itemsize`` bytes per pixel (one argument instead of eight: cheaper calls).
    Built once per plan and itemsize and shared by the plan's Accumulators (the next
    scan's costs a lookup, not ~0.5 ms); nothing writes them (they stay writeable arrays:
    read-only ones would be another numba signature to compile)."""
    with _TABLES_LOCK:
        per_plan = _TABLES.setdefault(plan, {})
        hit = per_plan.get(int(itemsize))
    if hit is not None:
        return hit
    pf_pix, pf_lo, pf_hi = prefetch_schedule(plan, itemsize)
    table = np.ascontiguousarray(
        np.stack([plan.start, plan.stop, plan.det, plan.exc_lo, plan.exc_hi, plan.woff, pf_lo, pf_hi], axis=1), dtype=np.int64)
    with _TABLES_LOCK:
        return per_plan.setdefault(int(itemsize), (table, pf_pix))


@numba.njit(nogil=True, cache=True)
def _reduce_frame(frame, nxt, prefetch, zero, table, coef, exc_pix, exc_dw, wflat, pf_pix, acc):
    """acc[d] = sum_p w[d, p] * frame[p], piece by piece in frame order (float64, fixed order).

    While at it, prefetch the lines of ``nxt`` (the next frame) when ``prefetch``.
    """
    for d in range(acc.shape[0]):
        acc[d] = 0.0
    for s in range(table.shape[0]):
        if prefetch:
            # spread the prefetches of the next frame's lines over this frame's pieces
            for j in range(table[s, _PF_LO], table[s, _PF_HI]):
                _prefetch(nxt, pf_pix[j])
        # a slice, not frame[p] for p in range(a, b): the loops over it vectorise
        seg = frame[table[s, _START] : table[s, _STOP]]
        o = table[s, _WOFF]
        if o < 0:
            t = coef[s] * np.float64(_span_sum(seg, zero))
            for e in range(table[s, _EXC_LO], table[s, _EXC_HI]):
                t += exc_dw[e] * np.float64(frame[exc_pix[e]])
            acc[table[s, _DET]] += t
        else:
            acc[table[s, _DET]] += _weighted_sum_jit(wflat[o : o + seg.shape[0]], seg)


@numba.njit(nogil=True, cache=True)
def _prefetch_all(frame, at, pf_pix):
    """Prefetch the lines of the frame starting at frame[at] that the pieces read.

    A frame just received lies in another core's cache or in memory, and the kernels
    prefetch only the next frame, so the first frame of a call (the only one with one frame
    per message) was read line by line as the pieces reached it (a multiview frame from
    memory: 14.1 -> 12.3 us with this; 4 us when in cache)."""
    for j in range(pf_pix.shape[0]):
        _prefetch(frame, at + pf_pix[j])


@numba.njit(nogil=True, cache=True)
def _accumulate_serial(frames, zero, table, coef, exc_pix, exc_dw, wflat, pf_pix, images, first):
    """images[:, first + i] = reduction of frames[i] (frames: (count, npix))."""
    n_det = images.shape[0]
    acc = np.zeros(n_det, dtype=np.float64)
    count = frames.shape[0]
    if count > 0:
        _prefetch_all(frames[0], 0, pf_pix)
    for i in range(count):
        nxt = min(i + 1, count - 1)
        _reduce_frame(frames[i], frames[nxt], i + 1 < count, zero, table, coef, exc_pix, exc_dw, wflat, pf_pix, acc)
        for d in range(n_det):
            images[d, first + i] = acc[d]


@numba.njit(nogil=True, cache=True, parallel=True)
def _accumulate_parallel(frames, zero, table, coef, exc_pix, exc_dw, wflat, pf_pix, images, first, block):
    """Same as _accumulate_serial, the frames split across threads in blocks of ``block`` frames."""
    n_det = images.shape[0]
    count = frames.shape[0]
    n_blocks = (count + block - 1) // block
    for blk in numba.prange(n_blocks):
        acc = np.zeros(n_det, dtype=np.float64)
        i0 = blk * block
        i1 = min(i0 + block, count)
        for i in range(i0, i1):
            nxt = min(i + 1, i1 - 1)
            _reduce_frame(frames[i], frames[nxt], i + 1 < i1, zero, table, coef, exc_pix, exc_dw, wflat, pf_pix, acc)
            for d in range(n_det):
                images[d, first + i] = acc[d]


def _bswap16(v):
    """The uint16 ``v`` with its two bytes swapped."""
    return np.uint16((v >> np.uint16(8)) | (v << np.uint16(8)))


def _bswap32(v):
    """The uint32 ``v`` with its four bytes reversed."""
    return np.uint32((v >> np.uint32(24)) | ((v >> np.uint32(8)) & np.uint32(0xFF00))
                     | ((v << np.uint32(8)) & np.uint32(0xFF0000)) | (v << np.uint32(24)))


def _bswap(v):
    """``v`` (a uint16 or uint32) with its bytes reversed."""
    return _bswap16(v) if v.dtype.itemsize == 2 else _bswap32(v)


@overload(_bswap, jit_options={"nogil": True})
def _ol_bswap(v):
    return _bswap16 if v.bitwidth == 16 else _bswap32


def _span_sum_be(seg):
    """Exact int64 sum of ``seg``, big-endian unsigned integers read as native words (the
    swap before the widening add keeps the loop vectorised)."""
    tot = np.int64(0)
    for p in range(seg.shape[0]):
        tot += _bswap(seg[p])
    return tot


_span_sum_be_jit = numba.njit(nogil=True, cache=True)(_span_sum_be)


@numba.njit(nogil=True, cache=True)
def _reduce_frame_be(row, nxt, nxt_at, table, coef, exc_pix, exc_dw, wflat, pf_pix, acc, scratch):
    """_reduce_frame for a frame of big-endian unsigned integers, ``row`` its words read
    natively, in the same order and precision (integer piece sums are exact; a weighted
    piece is swapped into ``scratch`` and summed by the same function), so it gives the same
    bits as the native kernel on the byte-swapped frame. The next frame, prefetched
    meanwhile, starts at nxt[nxt_at] (nxt_at < 0: none)."""
    for d in range(acc.shape[0]):
        acc[d] = 0.0
    for s in range(table.shape[0]):
        if nxt_at >= 0:
            for j in range(table[s, _PF_LO], table[s, _PF_HI]):
                _prefetch(nxt, nxt_at + pf_pix[j])
        a = table[s, _START]
        b = table[s, _STOP]
        o = table[s, _WOFF]
        if o < 0:
            t = coef[s] * np.float64(_span_sum_be_jit(row[a:b]))
            for e in range(table[s, _EXC_LO], table[s, _EXC_HI]):
                t += exc_dw[e] * np.float64(_bswap(row[exc_pix[e]]))
            acc[table[s, _DET]] += t
        else:
            n = b - a
            for k in range(n):
                scratch[k] = _bswap(row[a + k])
            acc[table[s, _DET]] += _weighted_sum_jit(wflat[o : o + n], scratch[:n])


@numba.njit(nogil=True, cache=True)
def _accumulate_be(words, count, stride, npix, table, coef, exc_pix, exc_dw, wflat, pf_pix, images, first, scratch):
    """_accumulate_serial for big-endian unsigned frames, read where they lie (no
    byte-swapped copy). Frame i starts ``i * stride`` bytes after frame 0, which may put
    it at any byte alignment, so ``words`` holds one native word view per alignment:
    words[k][j] is the word at byte k + j * itemsize after the start of frame 0.
    scratch: (npix,) of the native dtype, for the weighted pieces."""
    n_det = images.shape[0]
    acc = np.zeros(n_det, dtype=np.float64)
    isz = len(words)
    for i in range(count):
        b = i * stride
        row = words[b % isz][b // isz:b // isz + npix]
        if i + 1 < count:
            nb = b + stride
            _reduce_frame_be(row, words[nb % isz], nb // isz, table, coef, exc_pix, exc_dw, wflat, pf_pix, acc, scratch)
        else:
            _reduce_frame_be(row, row, -1, table, coef, exc_pix, exc_dw, wflat, pf_pix, acc, scratch)
        for d in range(n_det):
            images[d, first + i] = acc[d]


def _frames_contiguous(frames: np.ndarray) -> bool:
    """Whether each frame's pixels are contiguous (the frames themselves may be apart)."""
    if frames.ndim < 2:
        return False
    expected = frames.dtype.itemsize
    for n, st in zip(frames.shape[:0:-1], frames.strides[:0:-1]):
        if n > 1 and st != expected:
            return False
        expected *= n
    return True


def _zero_for(dtype: np.dtype):
    """Scalar that fixes the per-piece sum type: exact int64 for integers, float64 for floats."""
    return np.float64(0.0) if dtype.kind == "f" else np.int64(0)


class KernelChoice:
    """Which kernel is cheaper for one plan: the thread pool or the serial one (measured).

    Shared by every Accumulator built on the same (cached) plan, so a new Accumulator per
    scan starts from what the previous scans learned.  The first batch of each kernel is
    not measured (it may include loading the compiled kernel).  Races between threads only
    blur the estimates.
    """

    def __init__(self) -> None:
        self.cost: dict[bool, float | None] = {True: None, False: None}  # EWMA seconds per frame
        self.warm: set[bool] = set()
        self.interval = _PROBE_EVERY
        self.since_probe = 0
        self.probing: bool | None = None  # the kernel being probed, if any
        self._lock = threading.Lock()

    def choose(self) -> bool:
        """True: run the next batch on the thread pool."""
        with self._lock:
            par, ser = self.cost[True], self.cost[False]
            if par is None:
                return True
            if ser is None:
                return False
            best = par <= ser
            self.since_probe += 1
            if self.probing is None and self.since_probe >= self.interval:
                self.since_probe = 0
                self.probing = not best
                return not best
            return best

    def record(self, parallel: bool, seconds_per_frame: float) -> None:
        """Fold one batch's cost into the estimate of its kernel."""
        with self._lock:
            if parallel not in self.warm:
                self.warm.add(parallel)
                return
            best_before = self._best()
            old = self.cost[parallel]
            if old is None or self.probing is parallel:  # a probe replaces a stale estimate
                self.cost[parallel] = seconds_per_frame
            else:
                self.cost[parallel] = old + _EWMA * (seconds_per_frame - old)
            if self.probing is parallel:
                self.probing = None
                confirmed = self._best() == best_before
                self.interval = min(2 * self.interval, _PROBE_MAX) if confirmed else _PROBE_EVERY

    def _best(self) -> bool | None:
        par, ser = self.cost[True], self.cost[False]
        return None if par is None or ser is None else par <= ser


_CHOICES: "weakref.WeakKeyDictionary[PiecePlan, KernelChoice]" = weakref.WeakKeyDictionary()
_CHOICES_LOCK = threading.Lock()


def kernel_choice(plan: PiecePlan) -> KernelChoice:
    """The KernelChoice shared by the Accumulators of ``plan``."""
    with _CHOICES_LOCK:
        c = _CHOICES.get(plan)
        if c is None:
            c = _CHOICES[plan] = KernelChoice()
        return c


class Accumulator:
    """Per scan position, one weighted sum per virtual detector.

    LiberTEM-UDF-like: result buffers ``images`` plus the mask ``filled`` of the scan
    positions written so far.  Not thread-safe for concurrent ``add`` on one instance; the
    kernels release the GIL, so different instances may run on different threads.

    Batches of PARALLEL_MIN_FRAMES frames or more may run on numba's thread pool (one pool
    launch at a time per process; a caller finding it busy runs serially on its own
    thread).  Where other work (inference threads, other processes) keeps the cores busy,
    a parallel batch waits for its slowest thread, often a whole scheduler time slice, and
    runs slower than the serial kernel.  ``parallel=None`` (default) therefore measures
    both (KernelChoice, shared by the Accumulators of equal weights): it keeps a running
    cost per frame of each kernel, uses the cheaper one and re-tries the other now and
    then.  ``True`` / ``False`` force one.  The choice never changes the results (same bits).

    Attributes:
        images: (n_det, n_positions) float64, zero initially; images[d, i] is detector d at
            flat scan index i (row * nx + col).
        filled: (n_positions,) bool, True where a frame has been accumulated.
        Both are written in place (reset() too): read or copy them, do not rebind them.
    """

    def __init__(self, weights: np.ndarray, n_positions: int, *, parallel: bool | None = None):
        """weights: (n_det, npix) float32 (finite, >= 0), npix = pixels (or segments) per frame;
        n_positions: scan positions (ny * nx); parallel: None = choose by measured cost,
        True / False = always / never use the thread-pool kernel for batches."""
        w = np.asarray(weights)
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"weights must be (n_det, npix), got shape {w.shape}")
        w = np.ascontiguousarray(w, dtype=np.float32)
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and >= 0")
        if int(n_positions) < 1:
            raise ValueError(f"n_positions must be >= 1, got {n_positions}")
        self.weights = w
        self.n_det, self.npix = w.shape
        self.n_positions = int(n_positions)
        self.parallel = parallel
        self.plan = cached_plan(w)
        self.choice = kernel_choice(self.plan)
        self._kernel_tail: dict[np.dtype, tuple] = {}
        self._scratch: np.ndarray | None = None  # big-endian frames: their weighted pieces, swapped
        self.images = np.zeros((self.n_det, self.n_positions), dtype=np.float64)
        self.filled = np.zeros(self.n_positions, dtype=bool)

    @property
    def support_fraction(self) -> float:
        """Fraction of each frame's pixels the kernels read."""
        return self.plan.n_support / self.npix

    def add(self, frames: np.ndarray, first: int) -> int:
        """Accumulate ``count`` consecutive frames starting at flat scan index ``first``.

        Args:
            frames: (count, *item_shape) of uint8/uint16/uint32/int16/int32/float32;
                C-contiguous (else copied), may be read-only. Big-endian uint16 / uint32
                frames whose pixels are contiguous within each frame (the frames may lie
                apart, as in a detector's receive buffer) are read in place, not copied.
            first: flat scan index of frames[0]; 0 <= first and first + count <= n_positions.

        Sets images[:, first + i] = weights @ frames[i] (assigned, not added) and
        filled[first:first + count] = True.

        Returns:
            How many of these positions were already filled (duplicates, overwritten).
        """
        count = int(frames.shape[0]) if frames.ndim else 0
        if count == 0:
            return 0
        first = int(first)
        if first < 0 or first + count > self.n_positions:
            raise ValueError(f"frames [{first}, {first + count}) outside the scan of {self.n_positions} positions")
        dt = frames.dtype
        tail = self._kernel_tail.get(dt)  # keyed by the frames' dtype, either byte order
        if tail is None:
            tail = self._kernel_tail[dt] = self._tail_for(dt.newbyteorder("="))
        if frames.size != count * self.npix:
            raise ValueError(f"frames of shape {frames.shape} do not hold {self.npix} pixels per frame")
        if not dt.isnative and dt.itemsize in (2, 4) and dt.kind == "u" and _frames_contiguous(frames):
            self._add_swapped(frames, count, first, tail)
        else:
            if not frames.flags.c_contiguous or not dt.isnative:
                frames = np.ascontiguousarray(frames, dtype=dt.newbyteorder("="))
            self._add_native(frames.reshape(count, self.npix), count, first, tail)
        if count == 1:
            dup = int(self.filled[first])
            self.filled[first] = True
            return dup
        seen = self.filled[first : first + count]
        dup = int(np.count_nonzero(seen))
        seen[:] = True
        return dup

    def _add_native(self, flat: np.ndarray, count: int, first: int, tail: tuple) -> None:
        """Native-endian C-contiguous (count, npix) frames: serial or thread-pool kernel."""
        if count < PARALLEL_MIN_FRAMES:
            _accumulate_serial(flat, *tail, first)
        else:
            wanted = self.choice.choose() if self.parallel is None else self.parallel
            use_pool = wanted and _PARALLEL_LOCK.acquire(blocking=False)
            t0 = time.perf_counter()
            if use_pool:
                try:
                    block = min(_BLOCK_MAX, max(_BLOCK_MIN, -(-count // (4 * numba.get_num_threads()))))
                    _accumulate_parallel(flat, *tail, first, block)
                finally:
                    _PARALLEL_LOCK.release()
            else:
                _accumulate_serial(flat, *tail, first)
            per_frame = (time.perf_counter() - t0) / count
            if self.parallel is None:
                self.choice.record(use_pool, per_frame)

    def _add_swapped(self, frames: np.ndarray, count: int, first: int, tail: tuple) -> None:
        """Big-endian unsigned frames (e.g. Merlin's, still in the receive buffer)."""
        isz = frames.dtype.itemsize
        rows = frames.reshape(count, self.npix).view(np.uint8)
        stride = rows.strides[0] if count > 1 else rows.shape[1]
        # all the frames' bytes as one flat array, then one native word view per byte
        # alignment (unaligned loads cost nothing extra on the CPUs this runs on)
        size = (count - 1) * stride + rows.shape[1]
        raw = np.lib.stride_tricks.as_strided(rows, shape=(size,), strides=(1,))
        native = frames.dtype.newbyteorder("=")
        words = tuple(raw[k:k + (size - k) // isz * isz].view(native) for k in range(isz))
        _zero, table, coef, exc_pix, exc_dw, wflat, pf_pix, images = tail
        if self._scratch is None or self._scratch.dtype != native:
            self._scratch = np.empty(self.npix, dtype=native)
        _accumulate_be(words, count, stride, self.npix, table, coef, exc_pix, exc_dw, wflat, pf_pix, images, first,
                       self._scratch)

    def _tail_for(self, dt: np.dtype) -> tuple:
        """Kernel arguments after the frames (up to ``first``) for frames of dtype dt."""
        if dt.name not in FRAME_DTYPES:
            raise TypeError(f"frame dtype {dt} is not one of {FRAME_DTYPES}")
        table, pf_pix = piece_table(self.plan, dt.itemsize)
        p = self.plan
        tail = (_zero_for(dt), table, p.coef, p.exc_pix, p.exc_dw, p.wflat, pf_pix, self.images)
        self._kernel_tail[dt] = tail
        return tail

    def fresh(self) -> "Accumulator":
        """A new Accumulator for the next scan: the same weights, plan and kernel choice
        (neither validated nor looked up again: ~2 ms for 8 x 256 x 256 weights), its own
        zeroed ``images`` and ``filled``; this one's buffers stay with whoever holds them."""
        new = copy.copy(self)
        new._kernel_tail = {}  # the kernels' arguments include the buffers
        new.images = np.zeros_like(self.images)
        new.filled = np.zeros_like(self.filled)
        return new

    def reset(self) -> None:
        """Zero the images and clear the filled mask (a new scan)."""
        self.images[:] = 0.0
        self.filled[:] = False
