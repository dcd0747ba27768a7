"""Robust per-view normalisation shared by the synthetic data and the inference pipeline."""

from __future__ import annotations

import numpy as np


def normalise_view(img: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Centre on the median and scale by the 1-99 percentile range (float32).

    Args:
        img: (ny, nx) image (any real dtype).
        valid: optional (ny, nx) bool mask; only these pixels set the statistics, and the
            others are set to 0 (the median) in the output.

    Returns:
        (img - p50) / (p99 - p1) as float32; a flat image gives zeros.
    """
    a = np.asarray(img, dtype=np.float32)
    sample = a[valid] if valid is not None else a.ravel()
    if sample.size == 0:
        return np.zeros_like(a)
    if sample.size > 65536:  # percentiles of a strided subsample are plenty and much cheaper
        sample = sample[:: sample.size // 65536]
    p1, p50, p99 = np.percentile(sample, (1.0, 50.0, 99.0))
    scale = float(p99 - p1)
    if not np.isfinite(scale) or scale <= 1e-12:
        out = np.zeros_like(a)
    else:
        out = (a - np.float32(p50)) * np.float32(1.0 / scale)
    if valid is not None:
        out = np.where(valid, out, np.float32(0.0))
    return out.astype(np.float32, copy=False)
