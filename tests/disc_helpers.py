"""Synthetic BF-disc frames for daemon tests (anti-aliased disc, Poisson noise, bad pixels)."""

import numpy as np


def disc_frames(n, shape, center, radius, level=40.0, background=1.0, seed=1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    sub = 4
    acc = np.zeros(shape)
    for dy in range(sub):
        for dx in range(sub):
            r = np.hypot(yy + (dy + 0.5) / sub - 0.5 - center[0], xx + (dx + 0.5) / sub - 0.5 - center[1])
            acc += r <= radius
    mean = background + level * acc / sub**2
    frames = rng.poisson(mean, size=(n, *shape)).astype(np.uint16)
    frames[:, 3, 5] = 0          # dead pixel
    frames[:, 50, 7] = 65000     # hot pixel
    return frames
