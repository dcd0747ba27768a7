"""The live window's model (numpy only, no GL): overlays, dropped counts, tolerance, 3D geometry."""

from __future__ import annotations

import numpy as np

from livestereo.protocol.live import decode_live, encode_live
from livestereo.view.model import (PARTICLE_RGB, UNFILLED_RGB, ViewState, depth_colors, display_shape,
                                   resample)
from livestereo.view.synthetic import dislocation_scan, particle_scan


def fed(*msg_lists) -> ViewState:
    st = ViewState()
    for msgs in msg_lists:
        st.feed_batch([decode_live(m) for m in msgs])
    return st


def is_overlay(px) -> np.ndarray:
    """Magenta-tinted over any grey level (the overlay is semi-transparent): red and blue
    well above green."""
    px = np.asarray(px, np.int32)
    return (px[..., 0] - px[..., 1] > 60) & (px[..., 2] - px[..., 1] > 40)


def test_overlay_drawn_where_lines_were_detected_and_unfilled_part_hatched():
    s = dislocation_scan(fill=0.6, n_lines=3, shape=(128, 160))
    st = fed(s.messages)
    assert len(st.panels) == 2 and [p.name for p in st.panels] == ["view 0", "view 1"]
    for p in st.panels:
        rgba = p.rgba
        assert rgba.shape == (128, 160, 4) and rgba.dtype == np.uint8
        on = np.concatenate(s.line_pixels)
        assert is_overlay(rgba[on[:, 1], on[:, 0]]).all()
        # away from the lines, in the filled part: grey (r == g == b) with contrast
        filled = np.zeros((128, 160), bool)
        filled.reshape(-1)[: int(0.6 * 128 * 160)] = True
        mask = filled.copy()
        mask[on[:, 1], on[:, 0]] = False
        grey = rgba[mask][:, :3]
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all() and grey[:, 0].std() > 30
        # the unscanned part: the hatch (or the overlay where a line crosses it)
        rest = rgba[~filled & ~is_overlay(rgba)][:, :3]
        assert len(rest) and np.isin(rest[:, 0], [UNFILLED_RGB[0][0], UNFILLED_RGB[1][0]]).all()
    assert "filled 60 %" in st.header_text and "scan 0" in st.header_text
    assert "track 10" in st.info_text and "v = 0.50 nm/s" in st.info_text


def test_mean_pattern_has_region_outlines_in_detector_colours():
    st = fed(dislocation_scan().messages)
    pat = st.pattern
    assert pat is not None and pat.shape == (64, 64, 4)
    colours = {tuple(c) for c in pat[..., :3].reshape(-1, 3)}
    assert (255, 80, 80) in colours and (80, 170, 255) in colours


def test_overlay_survives_binned_snapshot_images():
    """prob at full scan resolution, images binned 2x: a 1-px line stays visible (block max)."""
    s = dislocation_scan(shape=(256, 256), binning=2, n_lines=2)
    st = fed(s.messages)
    rgba = st.panels[0].rgba
    assert rgba.shape[:2] == (128, 128)
    on = np.concatenate(s.line_pixels) // 2
    assert is_overlay(rgba[on[:, 1], on[:, 0]]).mean() > 0.99


def test_large_images_are_shrunk_for_display():
    assert display_shape(1024, 1024) == (512, 512)
    assert display_shape(1000, 300) == (500, 150)
    a = np.zeros((1024, 1024), np.uint8)
    a[500, :] = 200
    r = resample(a, (512, 512), "max")
    assert r.shape == (512, 512) and r[250].min() == 200


def test_dropped_counted_from_pub_seq_gaps_and_restart():
    st = ViewState()
    for seq in (0, 1, 2, 6, 7, 10):
        st.feed(decode_live(encode_live("status", seq, {"frames": seq})))
    assert st.received == 6 and st.dropped == 3 + 2
    st.feed(decode_live(encode_live("status", 0, {})))  # the publisher restarted
    st.feed(decode_live(encode_live("status", 1, {})))
    assert st.dropped == 5
    assert "dropped 5" in st.status_text()


def test_batch_folds_only_the_newest_of_each_topic_but_counts_all():
    a = dislocation_scan(scan=0, pub_seq=0, status=False)
    b = dislocation_scan(scan=1, pub_seq=2, status=False)
    st = fed(a.messages + b.messages)
    assert st.received == 4 and st.dropped == 0
    assert st.latest["snapshot"].scan == 1 and st.latest["dislocations"].scan == 1


def test_status_line():
    s = dislocation_scan()
    st = fed(s.messages)
    line = st.status_text()
    assert "12.3 k frames/s" in line and "1.60 GB/s" in line and "dropped 0" in line and "latency 0.12 s" in line
    st.last_receive_time -= 10
    assert "no message for 10 s" in st.status_text()


def test_tolerates_missing_keys_and_arrays():
    st = ViewState()
    msgs = [
        encode_live("snapshot", 0, {}, {"images": np.random.rand(2, 8, 8).astype(np.float32)}),
        encode_live("dislocations", 1, {}),
        encode_live("particles", 2, {}),
        encode_live("scan_done", 3, {}),
        encode_live("status", 4, {}),
        encode_live("dislocations", 5, {"lines": [{}, {"id": 1, "velocity_nm_s": [3.0, 4.0, 0.0]}, "junk"]},
                    {"line_points_nm": np.zeros((3, 3), np.float32)}),
        encode_live("snapshot", 6, {"names": None, "scan_shape": "bad"}, {"images": np.zeros((1, 4, 4), np.float32),
                                                                         "valid": np.zeros((3, 3), bool)}),
    ]
    for m in msgs:
        st.feed(decode_live(m))
    assert st.decode_errors == 0
    assert len(st.panels) == 1 and st.panels[0].rgba.shape == (4, 4, 4)
    assert "v = 5.00 nm/s" in st.info_text
    assert isinstance(st.status_text(), str)
    assert st.scene is not None and len(st.scene.line_connect) == 2  # no offsets: one line of 3 points


def test_malformed_content_counts_an_error_and_keeps_the_window_alive():
    st = ViewState()
    st.feed(decode_live(encode_live("dislocations", 0, {"thickness_nm": 50}, {
        "line_points_nm": np.zeros((4, 3), np.float32), "line_offsets": np.array([0, 2, 99, 1], np.int64)})))
    assert st.scene is not None  # clipped offsets, no crash
    st.feed(decode_live(encode_live("snapshot", 1, {}, {"images": np.zeros((5,), np.float32)})))
    assert st.panels == []


def test_3d_lines_coloured_by_depth_and_never_joined_across_lines():
    s = dislocation_scan(n_lines=3, thickness_nm=100)
    st = fed(s.messages)
    sc = st.scene
    off = st.latest["dislocations"].arrays["line_offsets"]
    line_of = np.searchsorted(off, np.arange(off[-1]), side="right") - 1
    assert (line_of[sc.line_connect[:, 0]] == line_of[sc.line_connect[:, 1]]).all()
    assert len(sc.line_connect) == off[-1] - 3
    assert sc.z_range == (-50.0, 50.0)
    np.testing.assert_allclose(sc.box_hi[:2], [256, 256])
    deep, shallow = np.argmin(sc.line_pos[:, 2]), np.argmax(sc.line_pos[:, 2])
    assert sc.line_color[deep, 2] > sc.line_color[deep, 0]  # blue
    assert sc.line_color[shallow, 0] > sc.line_color[shallow, 2]  # red
    c = depth_colors(np.array([-50, 0, 50, np.nan]), (-50, 50))
    assert c.shape == (4, 4) and np.isfinite(c).all()


def test_crystal_axes_from_orientation():
    u = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)
    st = fed(dislocation_scan(orientation_U=u).messages)
    np.testing.assert_allclose(st.scene.crystal_axes, u)
    assert fed(dislocation_scan().messages).scene.crystal_axes is None


def test_overlay_only_on_the_scan_it_belongs_to_and_new_run_resets():
    a = dislocation_scan(scan=0, pub_seq=0)
    st = fed(a.messages)
    nxt = dislocation_scan(scan=1, pub_seq=3, fill=0.2, status=False)
    st.feed(decode_live(nxt.messages[0]))  # only the new scan's snapshot so far
    on = np.concatenate(a.line_pixels)
    assert not is_overlay(st.panels[0].rgba[on[:, 1], on[:, 0]]).any()
    other = dislocation_scan(scan=0, pub_seq=10, run_id="other", status=False)
    st.feed(decode_live(other.messages[0]))
    assert "dislocations" not in st.latest and "run other" in st.header_text


def test_particles_circles_on_each_segment_and_scatter_in_slab():
    s = particle_scan(n=8, n_seg=4)
    st = fed(s.messages)
    assert len(st.panels) == 4 and st.pattern is None
    radius = st.latest["particles"].arrays["radius_nm"]
    for seg, p in enumerate(st.panels):
        xy = s.particles_xy[:, seg]
        hits = 0
        for (x, y), r in zip(xy, radius):
            yy, xx = np.rint(y).astype(int), np.rint(x + r).astype(int)
            win = p.rgba[yy - 1:yy + 2, xx - 1:xx + 2, :3].reshape(-1, 3)
            hits += any(tuple(c) == PARTICLE_RGB for c in win)
        assert hits == len(xy)
    sc = st.scene
    assert len(sc.particle_pos) == 8 and sc.z_range == (-30.0, 30.0)
    assert (sc.particle_pos[:, 2] >= -30).all() and (sc.particle_pos[:, 2] <= 30).all()
    assert "8 particle(s)" in st.info_text


def test_pull_returns_only_what_changed():
    st = fed(dislocation_scan().messages)
    seen: dict[str, int] = {}
    first = st.pull(seen)
    assert {"panels", "pattern", "scene", "header"} <= set(first)
    assert st.pull(seen) == {}
    st.feed(decode_live(encode_live("status", 3, {"frames_per_s": 5})))
    assert "panels" not in st.pull(seen)


class _Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_finished_scan_result_kept_over_a_later_preview_in_the_same_batch():
    done = dislocation_scan(scan=0, fill=1.0, pub_seq=0, status=False)
    preview = dislocation_scan(scan=1, fill=0.3, pub_seq=2, status=False)
    st = fed(done.messages + preview.messages)
    assert st.latest["dislocations"].scan == 0 and st.latest["dislocations"].data["final"]
    assert st.latest["snapshot"].scan == 1 and st.finals == 1 and st.received == 4
    st.feed_batch([decode_live(m) for m in dislocation_scan(scan=1, fill=0.5, pub_seq=4, status=False).messages])
    assert st.latest["dislocations"].scan == 1  # the next batch's preview replaces it


def test_window_holds_from_a_finished_scan_until_its_result():
    from livestereo.view.app import RedrawPacer

    clock = _Clock()
    st = ViewState(clock=clock)
    pacer = RedrawPacer(st, rate_hz=20.0, idle_s=0.5, clock=clock)
    done = dislocation_scan(scan=0, fill=1.0, pub_seq=0, status=False)
    st.feed_batch([decode_live(done.messages[0])])  # a final snapshot, no live results yet: no hold
    assert not st.holding() and pacer.due()
    st.feed_batch([decode_live(m) for m in dislocation_scan(scan=0, fill=0.6, pub_seq=2, status=False).messages])
    clock.t += 0.1
    assert pacer.due()
    # the scan finishes: its images wait for its 3D result
    st.feed_batch([decode_live(done.messages[0])])
    clock.t += 0.1
    assert st.holding() and not pacer.due() and st.changed.is_set()
    st.feed_batch([decode_live(dislocation_scan(scan=1, fill=0.05, pub_seq=5, status=False).messages[0])])
    clock.t += 0.1
    assert st.holding() and not pacer.due()
    st.feed_batch([decode_live(done.messages[1])])  # the final result: drawn at once
    assert not st.holding() and pacer.due()
    # no result ever comes (e.g. the analysis failed): scan_done ends the hold, else hold_s does
    st.feed_batch([decode_live(dislocation_scan(scan=1, fill=1.0, pub_seq=7, status=False).messages[0])])
    assert st.holding()
    st.feed_batch([decode_live(encode_live("scan_done", 9, {"complete": True}, run_id="synthetic", scan=1))])
    assert not st.holding()
    st.feed_batch([decode_live(dislocation_scan(scan=2, fill=1.0, pub_seq=10, status=False).messages[0])])
    assert st.holding()
    clock.t += st.hold_s + 0.01
    assert not st.holding()


def test_redraw_pacer_wakes_on_arrival_capped_at_the_rate():
    import threading
    import time

    from livestereo.view.app import RedrawPacer

    clock = _Clock()
    st = ViewState(clock=clock)
    pacer = RedrawPacer(st, rate_hz=20.0, idle_s=0.5, clock=clock)
    assert pacer.due()  # first update at once
    assert not pacer.due()
    st.changed.set()
    clock.t += 0.02
    assert not pacer.due()  # at most 20 per second
    clock.t += 0.04
    assert pacer.due() and not st.changed.is_set()
    clock.t += 0.2
    assert not pacer.due()  # nothing new
    clock.t += 0.31
    assert pacer.due()  # but at least every idle_s (status ages)
    # blocking: wakes as soon as a batch is folded in, long before idle_s
    st2 = ViewState()
    p2 = RedrawPacer(st2, rate_hz=20.0, idle_s=5.0)
    assert p2.wait()
    msgs = [decode_live(m) for m in dislocation_scan(scan=0, fill=0.5, status=False).messages]
    threading.Timer(0.2, st2.feed_batch, args=(msgs,)).start()
    t0 = time.monotonic()
    assert p2.wait()
    assert 0.15 < time.monotonic() - t0 < 1.5
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    assert not p2.wait(stop)
