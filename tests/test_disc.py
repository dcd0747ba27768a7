"""Bright-field disc finding (livestereo.compute.disc) on synthetic noisy frames."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from livestereo.compute.disc import DiscFit, DiscNotFound, find_disc


def disc_frames(shape, center, radius, n, inside, outside, seed, blur=0.0, dead=10, hot=10, dtype=np.uint16):
    """Poisson frames of an anti-aliased disc (8 x 8 supersampled coverage) with bad pixels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    yy = (np.arange(h)[:, None] + sub).reshape(-1)
    xx = (np.arange(w)[:, None] + sub).reshape(-1)
    cov = ((yy[:, None] - center[0]) ** 2 + (xx[None, :] - center[1]) ** 2 <= radius**2)
    cov = cov.reshape(h, 8, w, 8).mean(axis=(1, 3))
    if blur:
        cov = ndimage.gaussian_filter(cov, blur)
    frames = rng.poisson(outside + (inside - outside) * cov, size=(n, h, w))
    bad = rng.choice(h * w, dead + hot, replace=False)
    r, c = np.unravel_index(bad, shape)
    frames[:, r[:dead], c[:dead]] = 0
    frames[:, r[dead:], c[dead:]] = np.iinfo(dtype).max if np.dtype(dtype).kind in "ui" else 1e6
    return frames.astype(dtype)


@pytest.mark.parametrize(
    "center, radius, blur, seed",
    [
        ((127.3, 129.8), 60.4, 0.0, 0),
        ((101.77, 143.21), 37.65, 0.0, 1),
        ((140.5, 120.25), 48.9, 1.0, 2),  # detector blur (MTF)
        ((90.12, 95.93), 21.3, 0.7, 3),
    ],
)
def test_subpixel_centre_and_radius(center, radius, blur, seed):
    frames = disc_frames((256, 256), center, radius, 6, 30.0, 1.5, seed, blur=blur)
    fit = find_disc(frames)
    assert isinstance(fit, DiscFit) and fit.n_frames == 6
    assert abs(fit.center_px[0] - center[0]) < 0.2 and abs(fit.center_px[1] - center[1]) < 0.2
    assert abs(fit.radius_px - radius) < 0.3
    assert fit.contrast == pytest.approx((30.0 - 1.5) / 30.0, abs=0.03)


def test_many_sparse_frames():
    """Low dose: about 0.5 counts per disc pixel per frame, summed over 64 frames."""
    center, radius = (60.6, 70.2), 25.35
    frames = disc_frames((128, 144), center, radius, 64, 0.5, 0.02, 4, dead=3, hot=3, dtype=np.uint8)
    fit = find_disc(frames)
    assert np.hypot(fit.center_px[0] - center[0], fit.center_px[1] - center[1]) < 0.2
    assert abs(fit.radius_px - radius) < 0.3


def test_float_frames_and_single_frame():
    center, radius = (64.4, 63.1), 30.2
    frames = disc_frames((128, 128), center, radius, 1, 200.0, 5.0, 5, dtype=np.float32)
    for arg in (frames, frames[0]):
        fit = find_disc(arg)
        assert abs(fit.center_px[0] - center[0]) < 0.2 and abs(fit.radius_px - radius) < 0.3


def test_disc_cut_by_the_detector_edge():
    center, radius = (35.4, 128.7), 50.3
    fit = find_disc(disc_frames((256, 256), center, radius, 8, 30.0, 1.0, 6))
    assert np.hypot(fit.center_px[0] - center[0], fit.center_px[1] - center[1]) < 0.3
    assert abs(fit.radius_px - radius) < 0.3


@pytest.mark.parametrize(
    "frames, reason",
    [
        (np.random.default_rng(0).poisson(10.0, (8, 128, 128)), "do not separate"),
        (np.zeros((3, 64, 64), np.uint16), "flat"),
        (np.full((3, 64, 64), 7, np.uint16), "flat"),
        (disc_frames((256, 256), (-200.0, 128.0), 60.0, 8, 30.0, 1.0, 7), "do not separate"),
        (disc_frames((256, 256), (-48.0, 128.0), 60.0, 8, 30.0, 1.0, 8), "off the detector"),
        (disc_frames((64, 64), (32.0, 32.0), 60.0, 4, 30.0, 1.0, 9), "filling it"),
    ],
    ids=["noise", "zeros", "constant", "disc-far-off", "disc-mostly-off", "disc-fills-detector"],
)
def test_no_disc_raises_with_reason(frames, reason):
    with pytest.raises(DiscNotFound, match=reason):
        find_disc(frames)


def test_disc_not_found_is_a_value_error():
    assert issubclass(DiscNotFound, ValueError)
    with pytest.raises(ValueError):
        find_disc(np.zeros((2, 3, 4, 5)))
