"""Virtual detector layouts (livestereo.compute.layouts) and stereo geometry (E1-E4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from livestereo.compute import stereo_geometry as sg
from livestereo.compute.layouts import LayoutSpec, build_layout
from livestereo.protocol.messages import Calibration, StartMessage

ALPHA = 25.0
R_PX = 60.0
CENTER = (127.4, 128.7)


def start(detector="pixelated", frame_shape=(256, 256), n_segments=None, **cal):
    c = dict(convergence_semiangle_mrad=ALPHA, scan_step_nm=1.0, disc_center_px=CENTER, disc_radius_px=R_PX)
    c.update(cal)
    return StartMessage(
        version=1, run_id="t", detector=detector, scan_shape=(8, 8),
        frame_shape=frame_shape if detector == "pixelated" else None, n_segments=n_segments,
        dtype="uint16", calibration=Calibration(**c),
    )


def independent_centroid(w, st, center):
    rows, cols = np.mgrid[0 : w.shape[0], 0 : w.shape[1]]
    mpp = st.calibration.mrad_per_px or ALPHA / R_PX
    phi = math.radians(st.calibration.scan_rotation_deg)
    dx, dy = (cols - center[1]) * mpp, (rows - center[0]) * mpp
    tx, ty = math.cos(phi) * dx - math.sin(phi) * dy, math.sin(phi) * dx + math.cos(phi) * dy
    return (w * tx).sum() / w.sum(), (w * ty).sum() / w.sum()


def test_stereo_default_regions():
    st = start()
    lay = build_layout(LayoutSpec(), st)
    assert lay.names == ["view0", "view1"] and lay.view_indices == [0, 1]
    assert lay.item_shape == (256, 256) and lay.disc_center_px == CENTER and lay.disc_radius_px == R_PX
    r = 0.35 * ALPHA
    c = lay.centroids_mrad
    np.testing.assert_allclose(c[0], [ALPHA - r, 0.0], atol=0.02)
    np.testing.assert_allclose(c[1], [-(ALPHA - r), 0.0], atol=0.02)
    mpp = ALPHA / R_PX
    for d in lay.detectors:
        assert d.weights.dtype == np.float32 and d.weights.shape == (256, 256)
        assert d.weights.min() >= 0 and d.weights.max() <= 1
        assert 0 < np.count_nonzero((d.weights > 0) & (d.weights < 1))  # anti-aliased edge
        assert d.n_pixels == pytest.approx(math.pi * (r / mpp) ** 2, rel=2e-3)
        np.testing.assert_allclose(d.centroid_mrad, independent_centroid(d.weights, st, CENTER), atol=1e-9)
    wm = lay.weights_matrix()
    assert wm.shape == (2, 256 * 256) and wm.dtype == np.float32 and wm.flags.c_contiguous
    assert len(lay.describe().splitlines()) == 2 and "view0" in lay.describe()


@pytest.mark.parametrize("rotation", [0.0, 30.0, -117.0])
@pytest.mark.parametrize("angle", [0.0, 90.0, 33.0])
def test_first_view_points_along_angle_in_scan_axes(rotation, angle):
    st = start(scan_rotation_deg=rotation)
    lay = build_layout(LayoutSpec(radius_mrad=6.0, offset_mrad=15.0, angle_deg=angle), st)
    c0, c1 = lay.centroids_mrad
    assert math.degrees(math.atan2(c0[1], c0[0])) == pytest.approx((angle + 180) % 360 - 180, abs=0.1)
    assert np.hypot(*c0) == pytest.approx(15.0, abs=0.03)
    np.testing.assert_allclose(c1, -c0, atol=0.03)
    np.testing.assert_allclose(c0, independent_centroid(lay.detectors[0].weights, st, CENTER), atol=1e-9)


def test_region_is_clipped_to_the_bf_disc():
    lay = build_layout(LayoutSpec(radius_mrad=10.0, offset_mrad=20.0), start())
    c = np.hypot(*lay.centroids_mrad[0])
    assert c < 20.0 - 0.5  # the part outside the disc is dropped: centroid moves inwards
    assert c == pytest.approx(sg.circle_region_centroid_mrad(20.0, 10.0, ALPHA), abs=0.05)


def test_multiview_regions_even_and_disjoint():
    lay = build_layout(LayoutSpec(kind="multiview", k=8, angle_deg=10.0), start())
    assert lay.names == [f"view{i}" for i in range(8)]
    c = lay.centroids_mrad
    rad = np.hypot(c[:, 0], c[:, 1])
    np.testing.assert_allclose(rad, rad.mean(), atol=0.03)
    ang = np.degrees(np.arctan2(c[:, 1], c[:, 0]))
    np.testing.assert_allclose((ang - 10.0 - 45.0 * np.arange(8) + 180) % 360 - 180, 0, atol=0.2)
    assert lay.weights_matrix().sum(axis=0).max() <= 1.0 + 1e-6  # no overlap


def test_bf_adf_appended():
    lay = build_layout(LayoutSpec(with_bf_adf=True, adf_inner_factor=1.2, adf_outer_factor=1.8), start())
    assert lay.names == ["view0", "view1", "bf", "adf"]
    assert [d.role for d in lay.detectors] == ["view", "view", "bf", "adf"]
    assert lay.view_indices == [0, 1]
    bf, adf = lay.detectors[2], lay.detectors[3]
    assert bf.centroid_mrad == (0.0, 0.0) and adf.centroid_mrad == (0.0, 0.0)
    assert bf.n_pixels == pytest.approx(math.pi * R_PX**2, rel=1e-3)
    assert adf.n_pixels == pytest.approx(math.pi * R_PX**2 * (1.8**2 - 1.2**2), rel=2e-3)
    only = build_layout(LayoutSpec(kind="bf_adf", adf_outer_factor=5.0), start())
    assert only.names == ["bf", "adf"] and only.view_indices == []
    assert only.detectors[1].n_pixels < math.pi * R_PX**2 * (25 - 1.21)  # clipped to the detector


def test_segments_on_pixelated_detector_are_disc_sectors():
    halves = build_layout(LayoutSpec(kind="segments", k=2), start())
    assert halves.names == ["seg0", "seg1"]
    assert halves.centroids_mrad[0, 0] == pytest.approx(sg.half_disc_centroid_mrad(ALPHA), rel=2e-3)
    quads = build_layout(LayoutSpec(kind="segments", k=4), start())
    rc = sg.annular_sector_centroid_radius(0.0, ALPHA, math.pi / 2)
    np.testing.assert_allclose(np.hypot(*quads.centroids_mrad.T), rc, rtol=3e-3)
    np.testing.assert_allclose(quads.weights_matrix().sum(axis=0).max(), 1.0, atol=1e-6)


def test_segmented_detector_is_pass_through():
    angles = ((10.0, 0.0), (0.0, 10.0), (-10.0, 0.0), (0.0, -10.0))
    st = start("segmented", n_segments=4, segment_angles_mrad=angles)
    lay = build_layout(LayoutSpec(kind="stereo"), st)
    assert lay.names == ["seg0", "seg1", "seg2", "seg3"] and lay.item_shape == (4,)
    np.testing.assert_array_equal(lay.weights_matrix(), np.eye(4, dtype=np.float32))
    np.testing.assert_allclose(lay.centroids_mrad, angles)
    assert lay.disc_center_px is None and lay.view_indices == [0, 1, 2, 3]
    bare = build_layout(LayoutSpec(), start("segmented", n_segments=2))
    np.testing.assert_array_equal(bare.centroids_mrad, 0.0)


def test_disc_from_arguments_and_mrad_per_px():
    st = start(disc_center_px=None, disc_radius_px=None, mrad_per_px=ALPHA / 50.0)
    with pytest.raises(ValueError, match="disc centre"):
        build_layout(LayoutSpec(), st)
    lay = build_layout(LayoutSpec(), st, disc_center_px=(100.0, 110.0))
    assert lay.disc_radius_px == pytest.approx(50.0)
    # mrad_per_px from alpha / radius when the calibration has none
    st2 = start(disc_center_px=None, disc_radius_px=None)
    with pytest.raises(ValueError, match="mrad_per_px"):
        build_layout(LayoutSpec(), st2, disc_center_px=(100.0, 110.0))
    lay2 = build_layout(LayoutSpec(), st2, disc_center_px=(100.0, 110.0), disc_radius_px=50.0)
    np.testing.assert_array_equal(lay.weights_matrix(), lay2.weights_matrix())
    # arguments override the calibration
    lay3 = build_layout(LayoutSpec(), start(), disc_center_px=(100.0, 110.0), disc_radius_px=50.0)
    np.testing.assert_array_equal(lay3.weights_matrix(), lay2.weights_matrix())


def test_spec_validation():
    with pytest.raises(ValidationError):
        LayoutSpec(radious_mrad=3.0)
    with pytest.raises(ValidationError):
        LayoutSpec(adf_inner_factor=2.0, adf_outer_factor=1.5)
    with pytest.raises(ValidationError):
        LayoutSpec(radius_mrad=-1.0)
    with pytest.raises(ValueError, match="covers no detector pixel"):
        build_layout(LayoutSpec(radius_mrad=2.0, offset_mrad=200.0), start())


# ------------------------------------------------------------------ stereo geometry (E1-E4)


def test_disparity_and_depth_round_trip():
    ta, tb = (40.0, 10.0), (-35.0, -20.0)
    p = 0.8
    dz = np.array([-100.0, 0.0, 37.5, 120.0])
    d = sg.disparity_px(ta, tb, dz, p)
    assert d.shape == (4, 2)
    np.testing.assert_allclose(d[2], (np.subtract(tb, ta)) * 1e-3 * 37.5 / p)
    along = d @ sg.baseline_unit(ta, tb)
    np.testing.assert_allclose(sg.depth_nm(along, ta, tb, p), dz, atol=1e-9)
    assert isinstance(sg.depth_nm(1.0, ta, tb, p), float)
    assert sg.disparity_px(ta, tb, 10.0, p).shape == (2,)


def test_design_numbers():
    # beta = 6 deg = 105 mrad needs centroids at +-52 mrad; 1 px disparity = 9.55 p of depth
    beta = sg.stereo_angle_mrad((52.36, 0.0), (-52.36, 0.0))
    assert math.degrees(beta * 1e-3) == pytest.approx(6.0, abs=0.01)
    assert sg.depth_nm(1.0, (52.36, 0.0), (-52.36, 0.0), 1.0) == pytest.approx(9.55, abs=0.01)
    assert sg.half_disc_centroid_mrad(60.0) == pytest.approx(25.46, abs=0.01)
    assert sg.annular_sector_centroid_radius(0.0, 60.0, math.pi) == pytest.approx(25.46, abs=0.01)
    assert sg.annular_sector_centroid_radius(30.0, 60.0, 2 * math.pi) == pytest.approx(0.0, abs=1e-12)
    assert sg.circle_region_centroid_mrad(30.0, 10.0) == 30.0
    with pytest.raises(ValueError):
        sg.depth_nm(1.0, (1.0, 2.0), (1.0, 2.0), 1.0)
