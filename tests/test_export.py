"""Export of recordings to HDF5 4D arrays."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from livestereo.protocol import codec
from livestereo.protocol.messages import Calibration, EndMessage, FramesMessage, StartMessage
from livestereo.recording import export as export_mod
from livestereo.recording.export import export_hdf5
from livestereo.recording.format import RecordingError, RecordingReader, RecordingWriter

NY, NX, H, W = 4, 5, 8, 6
MISSING = 13  # flat index never sent in scan 0


def _start(run="run-A", detector="pixelated", dtype="uint16", repeat=2):
    cal = Calibration(
        convergence_semiangle_mrad=21.4, scan_step_nm=0.75, mrad_per_px=2.0 if detector == "pixelated" else None,
        disc_center_px=(4.0, 3.0) if detector == "pixelated" else None, high_tension_kv=200,
        segment_angles_mrad=((1, 0), (0, 1), (-1, 0), (0, -1)) if detector == "segmented" else None,
    )
    if detector == "pixelated":
        return StartMessage(version=1, run_id=run, detector=detector, scan_shape=(NY, NX), frame_shape=(H, W),
                            dtype=dtype, repeat=repeat, calibration=cal)
    return StartMessage(version=1, run_id=run, detector=detector, scan_shape=(NY, NX), n_segments=4,
                        dtype=dtype, repeat=repeat, calibration=cal)


def _batches(rng, indices):
    """Split sorted flat indices into messages of consecutive positions, random sizes 1-5."""
    out, i = [], 0
    while i < len(indices):
        n = int(rng.integers(1, 6))
        run = [indices[i]]
        while len(run) < n and i + len(run) < len(indices) and indices[i + len(run)] == run[-1] + 1:
            run.append(indices[i + len(run)])
        out.append((run[0], len(run)))
        i += len(run)
    return out


def _make(path, rng, *, shuffle=True, detector="pixelated", dtype="uint16", extras=True):
    """A recording of run-A (2 scans, MISSING never sent in scan 0) with noise around it."""
    start = _start(detector=detector, dtype=dtype)
    item = start.item_shape
    if np.dtype(dtype).kind == "f":
        truth = rng.normal(size=(2, NY, NX, *item)).astype(dtype)
    else:
        truth = rng.integers(1, np.iinfo(dtype).max, size=(2, NY, NX, *item), dtype=dtype)
    truth[0].reshape(NY * NX, *item)[MISSING] = 0
    msgs = [codec.encode(start)]
    if extras:  # a second run interleaved: not exported unless asked for
        msgs.append(codec.encode(_start("other-run")))
    seq = 0
    for scan in range(2):
        idx = [i for i in range(NY * NX) if not (scan == 0 and i == MISSING)]
        batches = _batches(rng, idx)
        if shuffle:
            rng.shuffle(batches)
        flat = truth[scan].reshape(NY * NX, *item)
        for first, count in batches:
            msgs.append(codec.encode(FramesMessage("run-A", seq, scan, first, flat[first:first + count])))
            seq += 1
            if extras and seq == 3:
                msgs.append([b"\xc1 garbage"])
                msgs.append(codec.encode(FramesMessage("run-A", 99, 0, 0, np.ones((1, *item), np.uint32))))  # wrong dtype
                msgs.append(codec.encode(FramesMessage("run-A", 99, 0, NY * NX - 1, flat[:2])))  # beyond the scan
                msgs.append(codec.encode(FramesMessage("other-run", 0, 0, 0, flat[:1] + 1)))
    msgs.append(codec.encode(EndMessage("run-A", 2 * NY * NX - 1, "complete")))
    with RecordingWriter(path, fsync_every_s=None) as w:
        for i, m in enumerate(msgs):
            w.write(m, 1000.0 + i)
    return truth


@pytest.mark.parametrize("chunk_bytes,pending_bytes", [(None, None), (2 * H * W * 2, None), (2 * H * W * 2, 1)])
def test_export_one_scan(tmp_path, monkeypatch, chunk_bytes, pending_bytes):
    """Default export equals the array built, whatever the chunking and memory limit."""
    if chunk_bytes:
        monkeypatch.setattr(export_mod, "CHUNK_BYTES", chunk_bytes)
    if pending_bytes:
        monkeypatch.setattr(export_mod, "PENDING_BYTES", pending_bytes)
    rng = np.random.default_rng(5)
    rec = tmp_path / "r.lsrec"
    truth = _make(rec, rng)
    out = tmp_path / "out.h5"
    s = export_hdf5(rec, out)
    assert s.datasets == ["/data"] and s.scans == [0] and s.shape == (NY, NX, H, W) and s.dtype == "uint16"
    assert s.positions_valid == NY * NX - 1 and s.positions_missing == 1 and s.frames_written == NY * NX - 1
    assert s.skipped == {"not_msgpack": 1, "mismatch": 1, "out_of_range": 1} and s.bad_messages == 3
    assert s.other["other_run"] == 1 and s.other["other_scan"] > 0
    assert s.end_reason == "complete" and s.stop_reason == "end of file" and s.run_id == "run-A"
    assert "1 missing" in str(s)
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert data.shape == (NY, NX, H, W) and data.dtype == np.dtype("<u2")
        np.testing.assert_array_equal(data[()], truth[0])
        valid = f["valid"][()]
        expected_valid = np.ones((NY, NX), bool)
        expected_valid.flat[MISSING] = False
        np.testing.assert_array_equal(valid, expected_valid)
        assert data.chunks[0] == 1 and data.chunks[2:] == (H, W)
        assert data.chunks[1] == (NX if chunk_bytes is None else 2)
        a = data.attrs
        assert list(a["axes"]) == ["scan_y", "scan_x", "det_y", "det_x"]
        assert list(a["units"]) == ["nm", "nm", "mrad", "mrad"]
        np.testing.assert_allclose(a["scale"], [0.75, 0.75, 2.0, 2.0])
        np.testing.assert_allclose(a["offset"], [0, 0, -8.0, -6.0])
        assert a["convergence_semiangle_mrad"] == 21.4 and a["mrad_per_px"] == 2.0 and a["high_tension_kv"] == 200
        assert a["scan"] == 0 and a["n_valid"] == NY * NX - 1 and a["run_id"] == "run-A"
        start = json.loads(f.attrs["start_message_json"])
        assert start["scan_shape"] == [NY, NX] and f.attrs["end_reason"] == "complete"
    assert not (tmp_path / "out.h5.partial").exists()


def test_export_all_scans_and_scan_choice(tmp_path):
    rng = np.random.default_rng(6)
    rec = tmp_path / "r.lsrec"
    truth = _make(rec, rng)
    s = export_hdf5(rec, tmp_path / "all.h5", all_scans=True)
    assert s.datasets == ["/scan_0000/data", "/scan_0001/data"] and s.positions_missing == 1
    with h5py.File(tmp_path / "all.h5", "r") as f:
        for scan in range(2):
            np.testing.assert_array_equal(f[f"scan_{scan:04d}/data"][()], truth[scan])
        assert f["scan_0001/valid"][()].all() and not f["scan_0000/valid"][()].all()
        assert f["scan_0001/data"].attrs["scan"] == 1
    s = export_hdf5(rec, tmp_path / "one.h5", scan=1)
    with h5py.File(tmp_path / "one.h5", "r") as f:
        np.testing.assert_array_equal(f["data"][()], truth[1])
        assert f["valid"][()].all()
    assert s.positions_missing == 0
    with pytest.raises(RecordingError, match=r"r\.lsrec.*no frames for scan 7"):
        export_hdf5(rec, tmp_path / "none.h5", scan=7)
    assert not (tmp_path / "none.h5").exists() and not (tmp_path / "none.h5.partial").exists()
    with pytest.raises(FileExistsError, match="one.h5"):
        export_hdf5(rec, tmp_path / "one.h5", scan=1)
    export_hdf5(rec, tmp_path / "one.h5", scan=1, overwrite=True)
    s = export_hdf5(rec, tmp_path / "other.h5", run_id="other-run")
    assert s.run_id == "other-run" and s.positions_valid == 1


def test_export_segmented(tmp_path):
    rng = np.random.default_rng(7)
    rec = tmp_path / "seg.lsrec"
    truth = _make(rec, rng, detector="segmented", dtype="float32", extras=False)
    s = export_hdf5(rec, tmp_path / "seg.h5", scan=None)
    assert s.shape == (NY, NX, 4) and s.scans == [0]
    with h5py.File(tmp_path / "seg.h5", "r") as f:
        np.testing.assert_array_equal(f["data"][()], truth[0])
        assert list(f["data"].attrs["axes"]) == ["scan_y", "scan_x", "segment"]
        np.testing.assert_allclose(f["data"].attrs["segment_angles_mrad"], [[1, 0], [0, 1], [-1, 0], [0, -1]])


@pytest.mark.parametrize("compression", ["gzip", "lzf", "bitshuffle", "zstd"])
def test_export_compressed(tmp_path, compression):
    import hdf5plugin  # noqa: F401 - registers the plugin filters for reading

    rng = np.random.default_rng(8)
    rec = tmp_path / "c.lsrec"
    truth = _make(rec, rng, shuffle=False, extras=False)
    export_hdf5(rec, tmp_path / "c.h5", compression=compression)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        np.testing.assert_array_equal(f["data"][()], truth[0])
    with pytest.raises(ValueError, match="unknown compression"):
        export_hdf5(rec, tmp_path / "d.h5", compression="rar")


def test_export_truncated_recording(tmp_path):
    rng = np.random.default_rng(9)
    rec = tmp_path / "t.lsrec"
    truth = _make(rec, rng, shuffle=False, extras=False)
    with RecordingReader(rec) as r:
        offsets = [x.offset for x in r]
    # cut inside the 4th record (start + 3 frames messages complete)
    rec.write_bytes(rec.read_bytes()[: offsets[4] + 40])
    s = export_hdf5(rec, tmp_path / "t.h5")
    assert s.stop_reason.startswith("truncated") and s.stop_offset == offsets[4]
    assert s.end_reason is None
    with h5py.File(tmp_path / "t.h5", "r") as f:
        valid = f["valid"][()].reshape(-1)
        data = f["data"][()].reshape(NY * NX, H, W)
        n = int(valid.sum())
        assert n == s.positions_valid and valid[:n].all() and not valid[n:].any()
        np.testing.assert_array_equal(data[:n], truth[0].reshape(NY * NX, H, W)[:n])
        assert not data[n:].any()
        assert f.attrs["end_reason"] == "no end message"


def test_export_errors(tmp_path):
    rec = tmp_path / "nostart.lsrec"
    with RecordingWriter(rec) as w:
        w.write(codec.encode(FramesMessage("x", 0, 0, 0, np.zeros((1, 2, 2), np.uint16))), 1.0)
    with pytest.raises(RecordingError, match=r"nostart\.lsrec: no start message"):
        export_hdf5(rec, tmp_path / "o.h5")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(RecordingError, match="not a livestereo recording"):
        export_hdf5(bad, tmp_path / "o.h5")
    assert not (tmp_path / "o.h5").exists()
