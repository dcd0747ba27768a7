"""Pieces every detector source shares (livestereo.detectors.common)."""

from __future__ import annotations

import numpy as np

from livestereo.detectors.common import BatchPool, PixelMask, RunBuilder


def test_batch_pool_reuses_only_batches_nobody_holds():
    pool = BatchPool(max_batches=2)
    a = pool.get((4, 3), np.uint16)
    a_id = id(a)
    del a
    b = pool.get((4, 3), np.uint16)
    assert id(b) == a_id and pool.allocated == 1  # nothing held it: reused
    view = b[1:3]  # a frames message keeps a view
    del b
    c = pool.get((4, 3), np.uint16)
    assert id(c) != a_id and pool.allocated == 2  # held: a new one
    c[...] = 7
    assert view.base is not None and not np.shares_memory(view, c)
    d = pool.get((5, 3), np.uint16)  # another shape: allocated, the oldest left to its holder
    assert d.shape == (5, 3) and pool.allocated == 3
    del view, c, d


def test_pixel_mask_zeroes_views_in_place():
    """Frames may be big-endian views of a receive buffer: zeroed where they lie."""
    buf = bytearray(3 + 2 * 2 * 4 * 5)
    frames = np.ndarray((2, 4, 5), dtype=">u2", buffer=buf, offset=3, strides=(40, 10, 2))
    frames[...] = 1000
    mask = PixelMask((4, 5), pixels=[(1, 2), (3, 4), (9, 9)])
    mask.apply(frames)
    assert mask.count == 2
    assert frames[:, 1, 2].tolist() == [0, 0] and frames[:, 3, 4].tolist() == [0, 0]
    assert int(frames.sum()) == 1000 * (2 * 20 - 4)


def test_run_builder_keeps_big_endian_views_only_when_asked():
    rb = RunBuilder(run_id="r", scan_shape=(2, 2), frame_shape=(4, 5), dtype="uint16", calibration=None)
    be = np.arange(40, dtype=">u2").reshape(2, 4, 5)
    kept = rb.frames(be, 0, keep_byte_order=True)[0].data
    assert kept.dtype == np.dtype(">u2") and np.shares_memory(kept, be)
    copied = rb.frames(be, 2)[0].data
    assert copied.dtype == np.dtype("<u2") and np.array_equal(copied, be)
