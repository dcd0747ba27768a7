"""Accumulation kernels (livestereo.compute.accumulate) against an independent numpy reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from livestereo.compute.accumulate import FRAME_DTYPES, Accumulator, piece_table, plan_pieces, prefetch_schedule
from livestereo.compute.layouts import LayoutSpec, build_layout
from livestereo.protocol.messages import Calibration, StartMessage

SHAPE = (24, 26)
NPIX = SHAPE[0] * SHAPE[1]


def layout_weights(kind: str, k: int = 2) -> np.ndarray:
    cal = Calibration(convergence_semiangle_mrad=20.0, scan_step_nm=1.0, disc_center_px=(11.3, 12.6),
                      disc_radius_px=8.0)
    st = StartMessage(version=1, run_id="t", detector="pixelated", scan_shape=(4, 4), frame_shape=SHAPE,
                      dtype="uint16", calibration=cal)
    return build_layout(LayoutSpec(kind=kind, k=k, with_bf_adf=kind == "multiview"), st).weights_matrix()


def mixed_weights(seed: int = 0) -> np.ndarray:
    """8 detectors exercising every kind of piece: plateaus, exceptions, smooth, empty, overlaps."""
    rng = np.random.default_rng(seed)
    w = np.zeros((8, NPIX), dtype=np.float32)
    w[0, : NPIX // 2] = 1.0  # binary half: one long summed piece
    w[1] = layout_weights("stereo")[0]  # anti-aliased disc region
    w[2] = rng.random(NPIX, dtype=np.float32)  # smooth: per-pixel weights
    # w[3] stays empty
    w[4, 100:400] = 0.5  # plateau with exceptions
    w[4, rng.integers(100, 400, 20)] = rng.random(20, dtype=np.float32)
    w[5, rng.integers(0, NPIX, 30)] = rng.random(30, dtype=np.float32) + 0.1  # sparse pixels
    w[6] = 1.0  # everything
    w[7] = layout_weights("multiview", 4)[-1]  # ADF ring, clipped
    return w


def frames_of(dtype: str, count: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.standard_normal((count, *SHAPE)) * 1e3).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=(count, *SHAPE), endpoint=True, dtype=dt)


def reference(w: np.ndarray, frames: np.ndarray) -> np.ndarray:
    return np.einsum("dp,np->dn", w.astype(np.float64), frames.reshape(len(frames), -1).astype(np.float64))


WEIGHTS = {
    "stereo2": lambda: layout_weights("stereo"),
    "multiview8": lambda: layout_weights("multiview", 6),  # 6 views + bf + adf
    "mixed8": mixed_weights,
}


@pytest.mark.parametrize("dtype", FRAME_DTYPES)
@pytest.mark.parametrize("wname", sorted(WEIGHTS))
def test_matches_numpy_reference(dtype, wname):
    w = WEIGHTS[wname]()
    assert w.shape[0] in (2, 8)
    n = 80
    acc = Accumulator(w, n)
    frames = frames_of(dtype, n)
    ref = reference(w, frames)
    scale = np.abs(ref).max()
    # count = 1, a small serial batch, a parallel batch, the rest
    assert acc.add(frames[:1], 0) == 0
    assert acc.add(frames[1:4], 1) == 0
    assert acc.add(frames[4:60], 4) == 0
    assert acc.add(frames[60:], 60) == 0
    np.testing.assert_allclose(acc.images, ref, rtol=1e-12, atol=1e-12 * scale)
    assert acc.filled.all()


def test_read_only_and_non_contiguous_frames():
    w = mixed_weights()
    frames = frames_of("uint16", 20)
    ro = np.frombuffer(frames.tobytes(), dtype=np.uint16).reshape(frames.shape)
    assert not ro.flags.writeable
    acc = Accumulator(w, 40)
    acc.add(ro, 0)
    acc.add(ro[:3], 20)
    big = frames_of("uint16", 40, seed=5)
    acc.add(big[::2][:10], 30)  # not C-contiguous
    ref = reference(w, np.concatenate([frames, frames[:3], big[::2][:10]]))
    np.testing.assert_allclose(acc.images[:, :23], ref[:, :23], rtol=1e-12)
    np.testing.assert_allclose(acc.images[:, 30:40], ref[:, 23:], rtol=1e-12)
    assert acc.filled.sum() == 33


def big_endian_in_buffer(frames: np.ndarray, gap: int, offset: int) -> np.ndarray:
    """``frames`` as a detector stream holds them: big-endian, each frame's pixels
    contiguous, ``gap`` header bytes between frames, starting ``offset`` bytes into a
    buffer (odd values put frames at every byte alignment)."""
    n, isz = frames.shape[0], frames.dtype.itemsize
    fbytes = frames[0].size * isz
    stride = fbytes + gap
    buf = bytearray(offset + n * stride)
    view = np.ndarray(frames.shape, dtype=frames.dtype.newbyteorder(">"), buffer=buf, offset=offset,
                      strides=(stride, frames.shape[2] * isz, isz))
    view[...] = frames
    return view


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
@pytest.mark.parametrize("gap", [0, 399, 401])
def test_big_endian_frames_read_in_place_give_the_same_bits(dtype, gap):
    """Big-endian frames lying apart in a receive buffer (Merlin) are reduced where they
    lie: the same bits as the native frames, against the numpy reference."""
    w = mixed_weights(4)
    n = 37
    frames = frames_of(dtype, n, seed=11)
    be = big_endian_in_buffer(frames, gap, offset=3)
    assert be.dtype.byteorder == ">" and be.flags.c_contiguous == (gap == 0)
    native, swapped = Accumulator(w, n, parallel=False), Accumulator(w, n)
    native.add(frames[:1], 0)
    native.add(frames[1:], 1)
    swapped.add(be[:1], 0)
    swapped.add(be[1:], 1)
    np.testing.assert_allclose(swapped.images, reference(w, frames), rtol=1e-12)
    assert swapped.images.tobytes() == native.images.tobytes()
    assert swapped.filled.all()


def test_assigns_and_counts_duplicates():
    w = layout_weights("stereo")
    acc = Accumulator(w, 10)
    a, b = frames_of("uint16", 6, seed=1), frames_of("uint16", 6, seed=2)
    assert acc.add(a, 0) == 0
    assert acc.filled.tolist() == [True] * 6 + [False] * 4
    assert acc.add(b[:1], 5) == 1
    assert acc.add(b, 2) == 4  # positions 2..5 were filled; 6, 7 new
    expect = reference(w, np.concatenate([a[:2], b]))
    np.testing.assert_allclose(acc.images[:, :8], expect, rtol=1e-12)  # overwritten, not added
    assert (acc.images[:, 8:] == 0).all()
    assert acc.add(b[:0], 3) == 0
    acc.reset()
    assert not acc.filled.any() and not acc.images.any()


def test_fresh_accumulator_for_the_next_scan():
    """The next scan's accumulator shares the plan but never the buffers of the finished one."""
    w = mixed_weights()
    first = Accumulator(w, 8)
    a, b = frames_of("uint16", 8, seed=3), frames_of("uint16", 8, seed=4)
    first.add(a, 0)
    kept = first.images  # handed downstream with the finished scan
    snapshot = kept.copy()
    nxt = first.fresh()
    assert nxt.plan is first.plan and nxt.choice is first.choice
    assert nxt.images is not kept and not nxt.images.any() and not nxt.filled.any()
    nxt.add(b, 0)
    np.testing.assert_array_equal(kept, snapshot)  # the finished scan's images are untouched
    new = Accumulator(w, 8)
    new.add(b, 0)
    np.testing.assert_array_equal(nxt.images, new.images)  # the same bits as a new accumulator
    np.testing.assert_allclose(nxt.images, reference(w, b), rtol=1e-12)


def test_bit_identical_whatever_the_batching():
    w = mixed_weights(3)
    frames = frames_of("float32", 64, seed=7)  # floats: rounding depends on the order
    one = Accumulator(w, 64)
    one.add(frames, 0)
    singles = Accumulator(w, 64)
    for i in range(64):
        singles.add(frames[i : i + 1], i)
    odd = Accumulator(w, 64)
    for a, b in ((0, 9), (9, 10), (10, 41), (41, 64)):
        odd.add(frames[a:b], a)
    assert one.images.tobytes() == singles.images.tobytes() == odd.images.tobytes()


def test_serial_only_and_concurrent_threads_agree():
    import threading

    w = mixed_weights(4)
    frames = frames_of("uint16", 200, seed=11)
    serial = Accumulator(w, 200, parallel=False)
    assert Accumulator(w, 200, parallel=True).parallel is True and Accumulator(w, 1).parallel is None
    serial.add(frames, 0)
    np.testing.assert_allclose(serial.images, reference(w, frames), rtol=1e-12)
    accs = [Accumulator(w, 200) for _ in range(3)]

    def work(acc):
        for i in range(0, 200, 25):
            acc.add(frames[i : i + 25], i)

    threads = [threading.Thread(target=work, args=(a,)) for a in accs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a in accs:  # some batches ran on the pool, some serially (pool busy): same bits
        assert a.images.tobytes() == serial.images.tobytes()


def test_auto_choice_follows_measured_cost():
    from livestereo.compute.accumulate import _PROBE_EVERY, KernelChoice

    c = KernelChoice()
    assert c.choose() is True  # nothing measured yet: try the pool first
    c.record(True, 1.0)  # first batch of a kernel: not measured (may include loading it)
    assert c.choose() is True
    c.record(True, 2e-6)
    assert c.choose() is False  # then the serial kernel
    c.record(False, 1.0)
    c.record(False, 1e-6)
    picks = []
    for _ in range(3000):  # the pool stays slower (busy machine): probes get rarer
        p = c.choose()
        picks.append(p)
        c.record(p, 2e-6 if p else 1e-6)
    probes = [i for i, p in enumerate(picks) if p]
    assert probes[0] == _PROBE_EVERY - 1 and len(probes) < 8
    assert np.all(np.diff(probes) > _PROBE_EVERY)
    for _ in range(50):  # the pool gets cheaper: after a probe sees it, switch
        p = c.choose()
        c.record(p, 0.5e-6 if p else 1e-6)
    for _ in range(2100):
        p = c.choose()
        c.record(p, 0.5e-6 if p else 1e-6)
    assert c.choose() is True


def test_choice_is_shared_per_plan():
    w = layout_weights("stereo")
    a, b = Accumulator(w, 64), Accumulator(w.copy(), 64)
    assert a.choice is b.choice
    a.add(frames_of("uint16", 16), 0)
    a.add(frames_of("uint16", 16), 16)
    assert b.choice.cost[True] is not None
    assert Accumulator(w, 1, parallel=False).parallel is False


def test_plan_is_reused_for_equal_weights():
    w = mixed_weights(5)
    assert Accumulator(w, 2).plan is Accumulator(w.copy(), 3).plan
    w2 = w.copy()
    w2[2, 7] += 0.25
    assert Accumulator(w2, 2).plan is not Accumulator(w, 2).plan


def test_segmented_pass_through():
    acc = Accumulator(np.eye(4, dtype=np.float32), 8)
    f = frames_of("int32", 8)[:, 0, :4].copy()
    acc.add(f, 0)
    np.testing.assert_array_equal(acc.images, f.T.astype(np.float64))


def test_support_and_plan():
    w = layout_weights("stereo")
    acc = Accumulator(w, 1)
    assert acc.support_fraction == pytest.approx(np.count_nonzero(w.any(axis=0)) / NPIX)
    plan = plan_pieces(w)
    assert (np.diff(plan.start) >= 0).all() and (plan.stop > plan.start).all()
    pix, lo, hi = prefetch_schedule(plan, 2)
    assert lo.shape == hi.shape == (plan.n_pieces,) and hi[-1] == pix.size
    assert ((pix >= 0) & (pix < NPIX)).all()
    table, pf_pix = piece_table(plan, 2)
    assert table.shape == (plan.n_pieces, 8) and table.dtype == np.int64 and (pf_pix == pix).all()
    again = piece_table(plan, 2)
    assert again[0] is table and again[1] is pf_pix  # built once per plan and itemsize
    assert piece_table(plan, 4)[0] is not table
    empty = Accumulator(np.zeros((2, NPIX), np.float32), 3)
    empty.add(frames_of("uint8", 3), 0)
    assert not empty.images.any() and empty.filled.all()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        Accumulator(-np.ones((2, 4), np.float32), 4)
    with pytest.raises(ValueError):
        Accumulator(np.ones(4, np.float32), 4)
    acc = Accumulator(np.ones((2, NPIX), np.float32), 4)
    with pytest.raises(TypeError):
        acc.add(np.zeros((1, *SHAPE), np.float64), 0)
    with pytest.raises(ValueError):
        acc.add(np.zeros((1, 5, 5), np.uint16), 0)
    with pytest.raises(ValueError):
        acc.add(np.zeros((2, *SHAPE), np.uint16), 3)


_NOJIT_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import numba
    assert numba.config.DISABLE_JIT
    sys.path.insert(0, sys.argv[2])
    from test_accumulate import big_endian_in_buffer, mixed_weights, frames_of
    from livestereo.compute.accumulate import Accumulator
    out = {}
    for dtype in ("uint16", "int32", "float32"):
        acc = Accumulator(mixed_weights(3), 12)
        fr = frames_of(dtype, 12, seed=9)
        acc.add(fr[:9], 0)   # parallel kernel (prange runs as range)
        acc.add(fr[9:], 9)   # serial kernel
        out[dtype] = acc.images
    for dtype in ("uint16", "uint32"):  # big-endian frames read in place
        acc = Accumulator(mixed_weights(3), 12)
        acc.add(big_endian_in_buffer(frames_of(dtype, 12, seed=9), 401, 3), 0)
        out["be_" + dtype] = acc.images
    np.savez(sys.argv[1], **out)
    """
)


def test_kernels_with_jit_disabled_give_the_same_bits(tmp_path):
    """The pure-Python path (NUMBA_DISABLE_JIT=1) runs the same code: same bits as the JIT."""
    script = tmp_path / "nojit.py"
    script.write_text(_NOJIT_SCRIPT)
    out = tmp_path / "nojit.npz"
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    res = subprocess.run([sys.executable, str(script), str(out), os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    got = np.load(out)
    for dtype in ("uint16", "int32", "float32"):
        acc = Accumulator(mixed_weights(3), 12)
        fr = frames_of(dtype, 12, seed=9)
        acc.add(fr[:9], 0)
        acc.add(fr[9:], 9)
        np.testing.assert_allclose(got[dtype], reference(mixed_weights(3), fr), rtol=1e-12)
        assert got[dtype].tobytes() == acc.images.tobytes(), dtype
    for dtype in ("uint16", "uint32"):
        acc = Accumulator(mixed_weights(3), 12)
        acc.add(frames_of(dtype, 12, seed=9), 0)
        assert got["be_" + dtype].tobytes() == acc.images.tobytes(), dtype
