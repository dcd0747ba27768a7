"""Rectification of stereo pairs for any epipolar direction (livestereo.compute.rectify)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from livestereo.compute.rectify import rectification_for, rectification_from_angle, rectify_pair
from livestereo.compute.stereo_geometry import baseline_unit, disparity_px

ANGLES = (0.0, 30.0, 90.0, 135.0)


def _smooth_image(shape=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.5) * 10 + 5


def _blobs(shape, centres_xy, sigma=1.5):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for x, y in centres_xy:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img


def _centroid_xy(img, around_xy, r=5):
    x0, y0 = np.rint(around_xy).astype(int)
    sub = img[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    sub = np.clip(sub - 0.05 * sub.max(), 0, None)
    yy, xx = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    return np.array([(sub * xx).sum(), (sub * yy).sum()]) / sub.sum()


@pytest.mark.parametrize("deg", ANGLES)
def test_point_mapping_round_trip_and_baseline_onto_x(deg):
    r = rectification_from_angle(math.radians(deg), (50, 70))
    pts = np.random.default_rng(1).uniform(0, 50, (20, 2))
    assert np.allclose(r.to_scan(r.to_rectified(pts)), pts)
    u = r.baseline_unit
    d = r.to_rectified(pts + 3.0 * u) - r.to_rectified(pts)
    assert np.allclose(d, [3.0, 0.0])
    assert np.allclose(r.vector_to_scan([3.0, 0.0]), 3.0 * u)
    # the rotated scan fits in the rectified image
    corners = np.array([[0, 0], [69, 0], [0, 49], [69, 49]], float)
    rc = r.to_rectified(corners)
    assert rc.min() > -0.51 and rc[:, 0].max() < r.rect_shape[1] - 0.49 and rc[:, 1].max() < r.rect_shape[0] - 0.49


@pytest.mark.parametrize("deg", ANGLES)
def test_image_round_trip(deg):
    img = _smooth_image()
    r = rectification_from_angle(math.radians(deg), img.shape)
    ri, rv = r.rectify(img)
    back, bv = r.unrectify(ri, rv, order=3)
    assert bv[4:-4, 4:-4].all()  # only a thin border is lost
    assert np.nanmax(np.abs(back - img)[bv]) < 0.05 * np.ptp(img)
    assert np.isnan(back[~bv]).all()
    if deg in (0.0, 90.0):  # pixel-exact rotations
        assert np.allclose(back[bv], img[bv], atol=1e-9)


@pytest.mark.parametrize("deg", ANGLES)
def test_pair_matches_lie_on_one_row_with_positive_disparity(deg):
    """Views A, B of angle theta_A, theta_B: a feature at height dz is shifted by
    (theta_B - theta_A) dz / p between them; after rectification only along +x."""
    beta, p, dz = 105.0, 1.0, 40.0
    u = np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])
    th_a, th_b = -0.5 * beta * u, 0.5 * beta * u  # theta_B - theta_A along u
    assert np.allclose(baseline_unit(th_a, th_b), u)
    shape = (60, 72)
    feats = np.array([[30.0, 25.0], [45.0, 38.0]])  # (x, y) at theta = 0
    pos_a = feats - th_a * 1e-3 * dz / p
    pos_b = feats - th_b * 1e-3 * dz / p
    assert np.allclose((pos_a - pos_b)[0], disparity_px(th_a, th_b, dz, p))
    pair = rectify_pair(_blobs(shape, pos_a), _blobs(shape, pos_b), th_a, th_b)
    d_expected = beta * 1e-3 * dz / p  # 4.2 px
    for fa, fb in zip(pos_a, pos_b):
        ca = _centroid_xy(pair.a, pair.rectification.to_rectified(fa))
        cb = _centroid_xy(pair.b, pair.rectification.to_rectified(fb))
        assert ca[1] == pytest.approx(cb[1], abs=0.02)  # same rectified row
        assert ca[0] - cb[0] == pytest.approx(d_expected, abs=0.05)
    # a rectified disparity map maps back onto A's scan grid unchanged (a scalar along u)
    dmap = np.full(pair.a.shape, d_expected)
    back, ok = pair.disparity_to_scan(dmap, pair.valid)
    assert ok[5:-5, 5:-5].all()
    assert np.allclose(back[ok], d_expected)


def test_valid_mask_and_nan_pixels():
    img = _smooth_image((48, 48))
    valid = np.ones_like(img, dtype=bool)
    valid[30:, :] = False  # scan not finished: last rows missing
    img[40, 10] = np.nan
    img[5, 5] = np.inf  # a bad pixel inside the valid region counts as invalid
    r = rectification_from_angle(math.radians(30), img.shape)
    ri, rv = r.rectify(img, valid)
    assert np.isfinite(ri).all()
    pts = r.to_rectified(np.array([[20.0, 40.0], [20.0, 10.0], [5.0, 5.0]]))
    ij = np.rint(pts[:, ::-1]).astype(int)
    assert not rv[ij[0, 0], ij[0, 1]]  # unscanned region
    assert rv[ij[1, 0], ij[1, 1]]  # scanned region
    assert not rv[ij[2, 0], ij[2, 1]]  # the inf pixel


def test_errors():
    with pytest.raises(ValueError, match="same incident angle"):
        rectification_for((10.0, 0.0), (10.0, 0.0), (8, 8))
    with pytest.raises(ValueError, match="same shape"):
        rectify_pair(np.zeros((8, 8)), np.zeros((8, 9)), (0, 0), (1, 0))
    r = rectification_for((0, 0), (1, 1), (8, 8))
    with pytest.raises(ValueError, match="does not match"):
        r.rectify(np.zeros((9, 8)))


@pytest.mark.parametrize("deg", [0.0, 17.0, 35.0, 90.0, 151.0, -63.0])
def test_linear_warp_equals_scipy_affine_transform(deg):
    """The compiled bilinear warp (order=1, the pipeline's) gives scipy's numbers and mask."""
    from scipy import ndimage

    rng = np.random.default_rng(int(deg) + 200)
    rect = rectification_from_angle(math.radians(deg), (37, 52))
    img = rng.normal(size=(37, 52))
    valid = rng.random((37, 52)) > 0.1
    for forward in (True, False):
        src_img = img if forward else rng.normal(size=rect.rect_shape)
        src_ok = valid if forward else rng.random(rect.rect_shape) > 0.1
        out, okw = rect._warp(src_img, src_ok, forward, 1, None)
        fill = float(src_img[src_ok].mean())
        m, off, shape = rect._affine(forward)
        ref = ndimage.affine_transform(np.where(src_ok, src_img, fill), m, offset=off, output_shape=shape, order=1,
                                       mode="constant", cval=fill, prefilter=False)
        ref_ok = ndimage.affine_transform(src_ok.astype(np.float64), m, offset=off, output_shape=shape, order=1,
                                          mode="constant", cval=0.0) > 1.0 - 1e-6
        assert out.shape == shape and okw.sum() > 0.2 * okw.size
        np.testing.assert_array_equal(okw, ref_ok)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
