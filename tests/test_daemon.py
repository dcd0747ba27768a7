"""The daemon on real ZeroMQ sockets: images equal a numpy reference; bad input is rejected,
counted and logged while the daemon keeps running and the run stays consistent."""

from __future__ import annotations

import logging

import h5py
import msgpack
import numpy as np
import pytest

from livestereo.compute.layouts import build_layout
from livestereo.daemon.results import read_scan, scan_path
from livestereo.protocol.codec import encode, encode_frames_header
from livestereo.protocol.messages import EndMessage
from tests.conftest import frames_parts, make_start, random_frames, reference_images


def _check_images(h, start, frames_by_scan):
    layout = build_layout(h.cfg.layout, start)
    weights = layout.weights_matrix()
    for scan, frames in frames_by_scan.items():
        ref = reference_images(frames, weights, 0, start.n_positions).reshape(-1, *start.scan_shape)
        path = scan_path(h.cfg.output_dir, start.run_id, scan)
        h.wait_for(path.exists)
        got = read_scan(path)
        np.testing.assert_allclose(got["images"], ref, rtol=1e-12)
        assert got["valid"].all() and got["complete"]
        assert got["names"] == layout.names
        with h5py.File(path, "r") as f:  # later scans copy the first one's compressed chunks
            w = f["layout/weights"]
            assert w.compression == "gzip" and w.shuffle
            np.testing.assert_array_equal(w[()].reshape(weights.shape), weights)


@pytest.mark.parametrize("batch", [1, 7, 30])
def test_images_equal_numpy_reference(harness, batch):
    h = harness()
    start = make_start(scan_shape=(6, 5))
    frames = random_frames(30)
    h.send_run(start, frames, batch=batch)
    h.wait_runs(1)
    _check_images(h, start, {0: frames})
    assert h.counters.rejected_total == 0 and h.counters.gaps == 0
    assert h.counters.frames == 30


def test_in_situ_series_gives_one_image_set_per_scan(harness):
    h = harness(layout={"kind": "multiview", "k": 4})
    start = make_start(scan_shape=(3, 4), repeat=3)
    h.send_msg(start)
    seq = 0
    per_scan = {}
    for scan in range(3):
        frames = random_frames(12, seed=scan)
        per_scan[scan] = frames
        for i in range(0, 12, 5):
            h.send(frames_parts("r1", seq, scan, i, frames[i:i + 5]))
            seq += 1
    h.send_msg(EndMessage("r1", 36, "complete"))
    h.wait_runs(1)
    _check_images(h, start, per_scan)
    assert h.daemon.runs_ended[0]["scans"] == [0, 1, 2]


def test_disc_found_when_start_has_no_calibration(harness):
    from tests.disc_helpers import disc_frames

    h = harness()
    start = make_start(scan_shape=(8, 8), frame_shape=(64, 64), disc_center_px=None, disc_radius_px=None, mrad_per_px=None)
    frames = disc_frames(64, (64, 64), center=(30.3, 33.6), radius=20.2)
    h.send_run(start, frames, batch=8)
    h.wait_runs(1)
    cal = h.daemon.runs_ended[0]["calibration"]
    assert abs(cal["disc_center_px"][0] - 30.3) < 0.3 and abs(cal["disc_center_px"][1] - 33.6) < 0.3
    assert abs(cal["disc_radius_px"] - 20.2) < 0.4
    path = scan_path(h.cfg.output_dir, "r1", 0)
    h.wait_for(path.exists)  # written by the results thread, after the run summary
    got = read_scan(path)
    assert got["valid"].all() and np.all(got["images"] > 0)


def _assert_alive(h, run_id="after", n_runs=None):
    """A good run after the bad input is still accumulated correctly."""
    start = make_start(run_id=run_id, scan_shape=(2, 3))
    frames = random_frames(6, seed=42)
    before = len(h.daemon.runs_ended)
    h.send_run(start, frames, batch=2)
    h.wait_runs(before + 1)
    _check_images(h, start, {0: frames})


def _rejected(h, reason, n=1):
    h.wait_for(lambda: h.counters.rejected[reason] >= n)
    return h.counters.rejected[reason]


def test_not_msgpack_and_unknown_type(harness, caplog):
    h = harness()
    with caplog.at_level(logging.WARNING, "livestereo.ingest"):
        h.send([b"\xc1garbage"])
        h.send([msgpack.packb({"type": "bogus"})])
        _rejected(h, "not_msgpack")
        _rejected(h, "unknown_type")
    assert "not a msgpack map" in caplog.text and "unknown message type 'bogus'" in caplog.text
    _assert_alive(h)


def test_unknown_version_and_bad_fields(harness):
    h = harness()
    d = make_start().model_dump(mode="json")
    d["version"] = 9
    h.send([msgpack.packb(d)])
    d = make_start().model_dump(mode="json")
    d["scan_shape"] = "big"
    h.send([msgpack.packb(d)])
    _rejected(h, "bad_version")
    _rejected(h, "bad_start")
    h.send_msg(make_start())
    h.send([msgpack.packb(dict(type="frames", run_id="r1", seq="x", scan=0, first=0, count=1, dtype="uint16", shape=[16, 16])), bytes(512)])
    h.send([msgpack.packb(dict(type="frames", run_id="r1", scan=0, first=0, count=1, dtype="uint16", shape=[16, 16])), bytes(512)])
    _rejected(h, "bad_field")
    _rejected(h, "missing_field")
    h.send_msg(EndMessage("r1", 0, "complete"))
    h.wait_runs(1)
    _assert_alive(h)


def test_payload_mismatch_and_wrong_shape_dtype(harness):
    h = harness()
    start = make_start(scan_shape=(2, 2))
    frames = random_frames(4)
    h.send_msg(start)
    h.send([encode_frames_header("r1", 0, 0, 0, 2, "uint16", (16, 16)), frames[:1].tobytes()])  # 1 frame, says 2
    h.send(frames_parts("r1", 1, 0, 0, random_frames(1, shape=(8, 8))))
    h.send(frames_parts("r1", 2, 0, 0, frames[:1].astype(np.uint32)))
    h.send(frames_parts("r1", 3, 0, 0, frames))
    h.send_msg(EndMessage("r1", 4, "complete"))
    h.wait_runs(1)
    assert h.counters.rejected["bad_payload"] == 1
    assert h.counters.rejected["wrong_shape"] == 1
    assert h.counters.rejected["wrong_dtype"] == 1
    _check_images(h, start, {0: frames})  # the run stayed consistent


def test_scan_index_out_of_range(harness):
    h = harness()
    start = make_start(scan_shape=(2, 2), repeat=1)
    frames = random_frames(4)
    h.send_msg(start)
    h.send(frames_parts("r1", 0, 0, 3, frames[:2]))  # positions 3,4 of 4
    h.send(frames_parts("r1", 1, 5, 0, frames[:1]))  # scan 5 of a 1-scan series
    h.send(frames_parts("r1", 2, 0, 0, frames))
    h.send_msg(EndMessage("r1", 4, "complete"))
    h.wait_runs(1)
    assert h.counters.rejected["index_out_of_range"] == 1
    assert h.counters.rejected["scan_out_of_range"] == 1
    _check_images(h, start, {0: frames})


def test_frames_before_start_and_after_end(harness):
    h = harness()
    frames = random_frames(4)
    h.send(frames_parts("r1", 0, 0, 0, frames))
    _rejected(h, "no_run")
    start = make_start(scan_shape=(2, 2))
    h.send_run(start, frames)
    h.wait_runs(1)
    h.send(frames_parts("r1", 5, 0, 0, frames))
    _rejected(h, "after_end")
    _check_images(h, start, {0: frames})
    _assert_alive(h)


def test_second_start_mid_run_is_rejected(harness):
    h = harness()
    start = make_start(scan_shape=(2, 2))
    frames = random_frames(4)
    h.send_msg(start)
    h.send(frames_parts("r1", 0, 0, 0, frames[:2]))
    h.send_msg(start)  # duplicate
    h.send_msg(make_start(run_id="intruder"))
    h.send(frames_parts("r1", 1, 0, 2, frames[2:]))
    h.send_msg(EndMessage("r1", 4, "complete"))
    h.wait_runs(1)
    assert h.counters.rejected["start_mid_run"] == 2
    _check_images(h, start, {0: frames})


def test_declared_shape_meant_to_exhaust_memory(harness):
    h = harness()
    h.send_msg(make_start(run_id="huge", scan_shape=(100_000, 100_000)))
    h.send_msg(make_start(run_id="huge2", frame_shape=(65_536, 65_536), disc_center_px=(0, 0)))
    _rejected(h, "too_large", 2)
    assert h.daemon.ingest.run is None
    _assert_alive(h)


def test_sender_disappears_mid_scan(harness, caplog):
    h = harness(idle_timeout_s=0.5)
    start = make_start(scan_shape=(3, 3))
    frames = random_frames(9)
    with caplog.at_level(logging.WARNING):
        h.send_msg(start)
        h.send(frames_parts("r1", 0, 0, 0, frames[:4]))
        h.send(frames_parts("r1", 2, 0, 6, frames[6:8]))  # seq 1 lost: a gap
        h.wait_runs(1, timeout=10)
    summary = h.daemon.runs_ended[0]
    assert summary["reason"] == "sender_lost" and summary["gaps"] == 1
    path = scan_path(h.cfg.output_dir, "r1", 0)
    h.wait_for(path.exists)
    got = read_scan(path)
    assert not got["complete"]
    assert got["positions_missing"] == 3 and got["gaps"] == 1
    assert got["valid"].ravel().tolist() == [True] * 4 + [False, False, True, True, False]
    assert "INCOMPLETE: 3 of 9 positions never filled" in caplog.text
    assert "(1,1)..(1,2)" in caplog.text and "(2,2)" in caplog.text
    _assert_alive(h)


def test_duplicates_counted_and_last_value_kept(harness):
    h = harness()
    start = make_start(scan_shape=(2, 2))
    frames = random_frames(4)
    h.send_msg(start)
    h.send(frames_parts("r1", 0, 0, 0, random_frames(2, seed=9)))
    h.send(frames_parts("r1", 1, 0, 0, frames))
    h.send_msg(EndMessage("r1", 6, "complete"))
    h.wait_runs(1)
    assert h.counters.duplicates == 2
    _check_images(h, start, {0: frames})


def test_bad_config_names_key_and_type(tmp_path):
    from livestereo.config import ConfigError, load_toml
    from livestereo.daemon.config import DaemonConfig

    p = tmp_path / "d.toml"
    p.write_text('endpoint = "tcp://127.0.0.1:5555"\n[layout]\nradius_mrad = "wide"\n')
    with pytest.raises(ConfigError, match=r"layout\.radius_mrad: .*number.*'wide'"):
        load_toml(p, DaemonConfig)
    p.write_text("idle_timeout = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'idle_timeout'"):
        load_toml(p, DaemonConfig)
    p.write_text("endpoint = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(p, DaemonConfig)
    p.write_text('detector_precision = "half"\n')
    with pytest.raises(ConfigError, match=r"detector_precision: .*'auto', 'float32' or 'bfloat16'"):
        load_toml(p, DaemonConfig)
    p.write_text('detector_precision = "float32"\n')
    assert load_toml(p, DaemonConfig).detector_precision == "float32"


def test_snapshots_are_latest_wins_with_valid_mask(harness):
    h = harness(snapshot_interval_s=0.0)
    start = make_start(scan_shape=(4, 4))
    frames = random_frames(16)
    h.send_msg(start)
    h.send(frames_parts("r1", 0, 0, 0, frames[:5]))
    h.wait_for(lambda: h.daemon.snapshots.peek() is not None)
    snap = h.daemon.snapshots.get(1)
    assert not snap.final and snap.valid.sum() == 5 and snap.run_id == "r1" and snap.seq == 0
    h.send(frames_parts("r1", 1, 0, 5, frames[5:]))
    h.send_msg(EndMessage("r1", 16, "complete"))
    h.wait_runs(1)
    last = h.daemon.snapshots.get(1)
    assert last.final and last.complete and last.valid.all()


def test_scan_files_of_interleaved_runs_get_their_own_layout_and_calibration(tmp_path):
    """Each run's /layout and /calibration are built once and copied into its scan files:
    runs whose layouts differ by one weight pixel never get each other's."""
    from livestereo.daemon.products import LayoutInfo, ScanImages
    from livestereo.daemon.results import write_scan
    from livestereo.protocol.messages import Calibration

    rng = np.random.default_rng(3)
    a = (rng.random((3, 20, 24)) * (rng.random((3, 20, 24)) > 0.7)).astype(np.float32)
    b = a.copy()
    b[1, 5, 5] += 0.5
    runs = {}
    for name, w, step in (("ra", a, 1.0), ("rb", b, 2.5)):
        lay = LayoutInfo(("x", "y", "z"), ("view", "view", "bf"), rng.normal(size=(3, 2)), w, (9.5, 11.0), 7.0)
        runs[name] = (lay, Calibration(convergence_semiangle_mrad=30.0, scan_step_nm=step))
    for i, name in enumerate(["ra", "ra", "rb", "ra", "rb"]):
        lay, cal = runs[name]
        scan = ScanImages(name, i, 1, rng.random((3, 4, 5)), np.ones((4, 5), bool), lay, cal, {}, True, True, {"frames": 20})
        path = write_scan(scan, tmp_path / f"{i}.h5")
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f["layout/weights"][()], lay.weights)
            assert f["layout/weights"].chunks == (1, 20, 24) and f["layout/weights"].compression == "gzip"
            np.testing.assert_array_equal(f["layout/centroids_mrad"][()], lay.centroids_mrad)
            assert [n.decode() for n in f["layout/names"][()]] == ["x", "y", "z"]
            assert tuple(f["layout"].attrs["disc_center_px"]) == (9.5, 11.0) and f["layout"].attrs["disc_radius_px"] == 7.0
            assert f["calibration"].attrs["scan_step_nm"] == cal.scan_step_nm
            np.testing.assert_array_equal(f["images"][()], scan.images)
