"""4D files as sources: sniffing by content, .npy, HDF5 (plain and DECTRIS master/data with
the bitshuffle filter), errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest

from livestereo.detectors.files import IsLivestereoRecording, open_file_source, sniff
from livestereo.detectors.merlin import mib
from livestereo.protocol.messages import Calibration, EndMessage, FramesMessage, StartMessage

CAL = Calibration(convergence_semiangle_mrad=25.0, scan_step_nm=0.5, mrad_per_px=1.0)
RNG = np.random.default_rng(5)
DATA = RNG.integers(0, 3000, size=(4, 6, 10, 12)).astype(np.uint16)


def read_all(path, **kw):
    src = open_file_source(path, **kw)
    try:
        items = list(src)
        with pytest.raises(EOFError):
            src.receive(0.0)
        return items
    finally:
        src.close()


def frames_of(items):
    return np.concatenate([i.message.data for i in items if isinstance(i.message, FramesMessage)])


def check_run(items, data4d, fpm):
    start = items[0].message
    assert isinstance(start, StartMessage)
    assert start.scan_shape == data4d.shape[:2] and start.frame_shape == data4d.shape[2:]
    msgs = [i.message for i in items if isinstance(i.message, FramesMessage)]
    assert [m.seq for m in msgs] == list(range(len(msgs))) and all(m.count <= fpm for m in msgs)
    assert msgs[0].data.dtype.byteorder in ("=", "<", "|")
    assert np.array_equal(frames_of(items), data4d.reshape(-1, *data4d.shape[2:]))
    assert items[-1].message == EndMessage(start.run_id, data4d.shape[0] * data4d.shape[1], "complete")
    assert not [i.error for i in items if i.error]
    return start


def test_npy_4d_and_calibration(tmp_path):
    p = tmp_path / "scan.npy"
    np.save(p, DATA)
    start = check_run(read_all(p, calibration=CAL, frames_per_message=5), DATA, 5)
    assert start.calibration == CAL and start.dtype == "uint16"
    assert start.metadata["source_format"] == "npy"
    assert "calibration_placeholder" not in start.metadata


def test_npy_3d_big_endian_and_float64(tmp_path):
    p = tmp_path / "frames.npy"
    np.save(p, DATA.reshape(-1, 10, 12).astype(">u2"))
    items = read_all(p, scan_shape=(4, 6))
    check_run(items, DATA, 64)
    assert items[0].message.dtype == "uint16"
    p2 = tmp_path / "f.npy"
    np.save(p2, DATA.astype(np.float64))
    items = read_all(p2)
    assert items[0].message.dtype == "float32"
    assert np.array_equal(frames_of(items), DATA.reshape(-1, 10, 12).astype(np.float32))
    items = read_all(tmp_path / "frames.npy")
    assert items[0].message.scan_shape == (1, 24) and items[0].message.metadata["scan_shape_guessed"] is True
    with pytest.raises(ValueError, match="frames.npy: 24 frames are not a whole number"):
        open_file_source(p, scan_shape=(5, 5))


def test_sniff_by_content_not_extension(tmp_path):
    p = tmp_path / "data.h5"
    np.save(tmp_path / "x.npy", DATA)
    p.write_bytes((tmp_path / "x.npy").read_bytes())  # an .npy named .h5
    assert sniff(p) == "npy"
    check_run(read_all(p), DATA, 64)
    m = tmp_path / "frames.dat"
    blob = b"".join(mib.make_frame_header(i + 1, (10, 12), "U16") + mib.encode_payload(f, "U16")
                    for i, f in enumerate(DATA.reshape(-1, 10, 12)))
    m.write_bytes(blob)
    assert sniff(m) == "mib"
    check_run(read_all(m, scan_shape=(4, 6)), DATA, 64)


def test_recording_and_unknown_formats(tmp_path):
    rec = tmp_path / "run.lsrec"
    rec.write_bytes(b"LSREC\x00\x01" + bytes(100))
    with pytest.raises(IsLivestereoRecording) as ei:
        open_file_source(rec)
    assert str(rec) in str(ei.value)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world, not a 4D file")
    with pytest.raises(ValueError, match=r"junk\.bin: unknown file format"):
        open_file_source(junk)
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npy: empty file"):
        open_file_source(empty)
    np.save(tmp_path / "full.npy", DATA)
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "full.npy").read_bytes()[:500])
    with pytest.raises(ValueError, match=r"cut\.npy"):
        open_file_source(cut)
    with pytest.raises(FileNotFoundError):
        open_file_source(tmp_path / "missing.npy")
    bad_mib = tmp_path / "bad.mib"
    bad_mib.write_bytes(b"MQ1,000001,00384,01,0012,0010,X99,   1x1," + bytes(400))
    with pytest.raises(ValueError, match=r"bad\.mib: not a readable Merlin \.mib file.*X99"):
        open_file_source(bad_mib)


def test_hdf5_plain_4d_and_3d(tmp_path):
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "scan.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("meta/small", data=np.zeros((2, 2, 2)))
        f.create_dataset("exp/data", data=DATA, chunks=(1, 6, 10, 12))
    start = check_run(read_all(p, frames_per_message=7), DATA, 7)
    assert start.metadata["source_dataset"] == "/exp/data"
    q = tmp_path / "frames.h5"
    with h5py.File(q, "w") as f:
        f.create_dataset("frames", data=DATA.reshape(-1, 10, 12))
    check_run(read_all(q, scan_shape=(4, 6), dataset="frames"), DATA, 64)
    with pytest.raises(ValueError, match="no dataset 'nope'"):
        open_file_source(q, dataset="nope")


def test_dectris_master_with_bitshuffle_filter(tmp_path):
    h5py = pytest.importorskip("h5py")
    hdf5plugin = pytest.importorskip("hdf5plugin")
    frames = DATA.reshape(-1, 10, 12)
    pm = np.zeros((10, 12), np.uint32)
    pm[3, 4] = 1
    for k, (a, b) in enumerate([(0, 10), (10, 24)], start=1):
        with h5py.File(tmp_path / f"series_data_{k:06d}.h5", "w") as f:
            f.create_dataset("entry/data/data", data=frames[a:b], chunks=(1, 10, 12),
                             **hdf5plugin.Bitshuffle(cname="lz4"))
    master = tmp_path / "series_master.h5"
    with h5py.File(master, "w") as f:
        for k in (1, 2):
            f[f"entry/data/data_{k:06d}"] = h5py.ExternalLink(f"series_data_{k:06d}.h5", "entry/data/data")
        det = f.create_group("entry/instrument/detector")
        det["beam_center_x"] = 5.5
        det["beam_center_y"] = 4.0
        det["detectorSpecific/pixel_mask"] = pm
    with h5py.File(tmp_path / "series_data_000001.h5", "r") as f:
        assert "32008" in f["entry/data/data"]._filters  # the bitshuffle filter is really used
    items = read_all(master, scan_shape=(4, 6), calibration=CAL, frames_per_message=8)
    ref = DATA.copy()
    ref[:, :, 3, 4] = 0
    start = check_run(items, ref, 8)
    assert start.calibration.disc_center_px == (4.0, 5.5)
    assert start.metadata["pixel_mask_from_file"] == 1 and start.metadata["masked_pixels"] == 1


def test_hdf5_missing_external_data_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    master = tmp_path / "m_master.h5"
    with h5py.File(master, "w") as f:
        f["entry/data/data_000001"] = h5py.ExternalLink("m_data_000001.h5", "entry/data/data")
    with pytest.raises(ValueError, match="m_master.h5"):
        open_file_source(master)


def test_mib_file_with_hdr_and_hot_pixels(tmp_path):
    p = tmp_path / "acq.mib"
    blob = b"".join(mib.make_frame_header(i + 1, (10, 12), "U16") + mib.encode_payload(f, "U16")
                    for i, f in enumerate(DATA.reshape(-1, 10, 12)))
    p.write_bytes(blob)
    p.with_suffix(".hdr").write_bytes(mib.make_acquisition_header(24, frames_per_trigger=6, scan_shape=(4, 6)))
    items = read_all(p.with_suffix(".hdr"), hot_pixels=[(0, 0)])  # the .hdr path opens its .mib
    ref = DATA.copy()
    ref[:, :, 0, 0] = 0
    start = check_run(items, ref, 64)
    assert start.metadata["merlin_acquisition_header"]["ScanX"] == "6"


def test_open_source_for_paths(tmp_path):
    from livestereo.detectors import open_source

    p = tmp_path / "scan.npy"
    np.save(p, DATA)
    src = open_source(str(p), frames_per_message=3)
    items = list(src)
    src.close()
    check_run(items, DATA, 3)
