"""Low-dose denoising of segment images (Poisson counts, a few to tens per pixel).

All functions take one image (ny, nx) of counts and return a float32 image of the same shape.
The variance-stabilising Anscombe transform a = 2 sqrt(I + 3/8) turns Poisson counts into
values of unit noise sigma, so the library denoisers (skimage.restoration) can use a fixed,
dose-independent strength.
"""

from __future__ import annotations

import numpy as np

__all__ = ["anscombe", "denoise_image"]


def anscombe(counts: np.ndarray) -> np.ndarray:
    """Anscombe transform 2 sqrt(I + 3/8) (float32): Poisson counts -> unit-variance values."""
    return (2.0 * np.sqrt(np.maximum(counts, 0).astype(np.float32) + np.float32(0.375))).astype(np.float32)


def denoise_image(counts: np.ndarray, method: str = "anscombe", tv_weight: float = 0.15) -> np.ndarray:
    """Denoise one segment image of counts (ny, nx); returns Anscombe-domain float32 values.

    method: 'anscombe' (transform only; the blob filter that follows is the smoothing),
    'tv' (skimage.restoration.denoise_tv_chambolle, weight ``tv_weight``), 'nlm'
    (skimage.restoration.denoise_nl_means, fast mode, sigma 1), 'none' (counts as float32).
    """
    if method == "none":
        return np.asarray(counts, dtype=np.float32)
    a = anscombe(counts)
    if method == "anscombe":
        return a
    if method == "tv":
        from skimage.restoration import denoise_tv_chambolle

        m = float(a.mean())
        return (denoise_tv_chambolle(a - m, weight=tv_weight) + m).astype(np.float32)
    if method == "nlm":
        from skimage.restoration import denoise_nl_means

        return denoise_nl_means(a, patch_size=5, patch_distance=6, h=0.8, sigma=1.0, fast_mode=True).astype(np.float32)
    raise ValueError(f"unknown denoise method {method!r}: use 'anscombe', 'tv', 'nlm' or 'none'")
