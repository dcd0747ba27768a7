"""Recording file format: round trip, truncation at every byte, corruption, append, summary."""

from __future__ import annotations

import os
import random
import struct
import time

import numpy as np
import pytest

from livestereo.protocol import codec
from livestereo.protocol.messages import Calibration, EndMessage, FramesMessage, StartMessage
from livestereo.recording.format import (
    FILE_HEADER_SIZE,
    FILE_MAGIC,
    RecordingError,
    RecordingReader,
    RecordingWriter,
    record_size,
    scan_recording,
)


def _messages(rng: random.Random) -> list[tuple[list[bytes], float]]:
    """Varied messages: empty parts, many parts, odd lengths, a 100 KiB part, no parts."""
    msgs = [
        ([b"hello"], 1000.0),
        ([b"", b""], 1000.5),
        ([], 1000.75),
        ([bytes([i]) * i for i in range(40)], 1001.0),
        ([b"h" * 7, os.urandom(100 * 1024)], 1002.0),
        ([np.arange(12, dtype="<u2").tobytes(), b"x" * 9], 1003.0),
    ]
    for i in range(6):
        n = rng.randint(1, 5)
        msgs.append(([os.urandom(rng.randint(0, 70)) for _ in range(n)], 1004.0 + i))
    return msgs


def _write(path, msgs, **kw) -> list[int]:
    """Write msgs; return the start offset of each record and, last, the file end."""
    offsets = [FILE_HEADER_SIZE]
    with RecordingWriter(path, **kw) as w:
        for parts, t in msgs:
            offsets.append(offsets[-1] + w.write(parts, t))
        assert w.records_written == len(msgs)
        assert w.bytes_written == offsets[-1] - FILE_HEADER_SIZE
    assert os.path.getsize(path) == offsets[-1]
    return offsets


def _read(path):
    with RecordingReader(path) as r:
        recs = [([bytes(p) for p in rec.parts], rec.recv_time, rec.offset) for rec in r]
        return recs, r.stop_offset, r.stop_reason, r.n_records


def test_round_trip(tmp_path):
    msgs = _messages(random.Random(1))
    path = tmp_path / "a.lsrec"
    offsets = _write(path, msgs)
    recs, stop, reason, n = _read(path)
    assert reason == "end of file" and stop == offsets[-1] and n == len(msgs)
    for (parts, t), (got, gt, off), o in zip(msgs, recs, offsets):
        assert got == parts and gt == t and off == o
    # record sizes follow the documented formula; parts are 8-byte aligned in the map
    for (parts, _), a, b in zip(msgs, offsets, offsets[1:]):
        assert b - a == record_size([len(p) for p in parts])
    with RecordingReader(path) as r:
        for rec in r:
            for p in rec.parts:
                assert p.readonly
                if p.nbytes:
                    assert np.frombuffer(p, np.uint8).ctypes.data % 8 == 0
        # a second iteration starts again
        assert sum(1 for _ in r) == len(msgs)


def test_buffer_kinds_and_header(tmp_path):
    path = tmp_path / "b.lsrec"
    arr = np.arange(30, dtype="<u2").reshape(5, 6)
    with RecordingWriter(path, fsync_every_s=None) as w:
        w.write([bytearray(b"ab"), memoryview(b"cd"), arr, arr[:, ::2]], 5.5)
    recs, _, reason, _ = _read(path)
    assert reason == "end of file"
    assert recs[0][0] == [b"ab", b"cd", arr.tobytes(), np.ascontiguousarray(arr[:, ::2]).tobytes()]
    head = path.read_bytes()[:FILE_HEADER_SIZE]
    magic, version, hsize, created, _ = struct.unpack("<8sIIdQ", head)
    assert magic == FILE_MAGIC == b"LSREC\x00v1" and version == 1 and hsize == 32
    assert abs(created - time.time()) < 60


def _expected_reason(cut: int, offsets: list[int], msgs) -> tuple[int, str]:
    """(records complete before cut, expected reason prefix)."""
    if cut < FILE_HEADER_SIZE:
        return 0, "truncated file header"
    k = sum(1 for end in offsets[1:] if end <= cut)
    if cut == offsets[k]:
        return k, "end of file"
    into = cut - offsets[k]
    n = len(msgs[k][0])
    head = 16 + 8 * n
    body = record_size([len(p) for p in msgs[k][0]]) - 8
    if into < head:
        return k, f"truncated record header at byte {offsets[k]}"
    if into < body:
        return k, f"truncated payload at byte {offsets[k]}"
    return k, f"truncated checksum at byte {offsets[k]}"


def test_cut_at_every_byte_of_last_two_records(tmp_path):
    rng = random.Random(2)
    msgs = _messages(rng)[:-2] + [([b"hdr", os.urandom(37), b""], 2000.0), ([os.urandom(13)] * 3, 2001.0)]
    path = tmp_path / "full.lsrec"
    offsets = _write(path, msgs)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.lsrec"
    cuts = list(range(offsets[-3], offsets[-1] + 1)) + [rng.randrange(0, offsets[-1]) for _ in range(40)]
    cuts += list(range(0, FILE_HEADER_SIZE + 2))
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        k, reason = _expected_reason(cut, offsets, msgs)
        recs, stop, got_reason, n = _read(cut_path)  # never raises
        assert n == k == len(recs), cut
        assert got_reason.startswith(reason), (cut, got_reason, reason)
        assert stop == (offsets[k] if cut >= FILE_HEADER_SIZE else 0), cut
        for (parts, t), (got, gt, _) in zip(msgs, recs):
            assert got == parts and gt == t
        s = scan_recording(cut_path)
        assert s.n_records == k and s.stop_reason == got_reason


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    msgs = [([b"head", os.urandom(1000)], 10.0 + i) for i in range(5)]
    path = tmp_path / "c.lsrec"
    offsets = _write(path, msgs)
    data = bytearray(path.read_bytes())
    for where in (offsets[3] + 8 + 3, offsets[3] + 16 + 16 + 500, offsets[4] - 1):  # time, payload, checksum
        bad = bytearray(data)
        bad[where] ^= 0x40
        path.write_bytes(bad)
        recs, stop, reason, n = _read(path)
        assert n == 3 and stop == offsets[3]
        assert reason.startswith(f"checksum mismatch at byte {offsets[3]}"), reason
        assert [r[0] for r in recs] == [m[0] for m in msgs[:3]]
    # a damaged record magic is reported as such
    bad = bytearray(data)
    bad[offsets[2]] = 0
    path.write_bytes(bad)
    recs, stop, reason, n = _read(path)
    assert n == 2 and reason.startswith(f"bad record magic at byte {offsets[2]}")
    # verify=False trusts the bytes
    bad = bytearray(data)
    bad[offsets[3] + 40] ^= 1
    path.write_bytes(bad)
    with RecordingReader(path, verify=False) as r:
        assert sum(1 for _ in r) == 5 and r.stop_reason == "end of file"


def test_not_a_recording(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"PK\x03\x04 definitely a zip file, not ours" * 3)
    with pytest.raises(RecordingError, match=r"x\.bin.*not a livestereo recording"):
        RecordingReader(p)
    with pytest.raises(RecordingError, match="no such recording file"):
        RecordingReader(tmp_path / "missing.lsrec")
    with pytest.raises(RecordingError, match="not a livestereo recording"):
        scan_recording(p)
    short = tmp_path / "short.bin"
    short.write_bytes(b"XY")
    with pytest.raises(RecordingError, match="not a livestereo recording"):
        RecordingReader(short)
    newer = tmp_path / "newer.lsrec"
    newer.write_bytes(struct.pack("<8sIIdQ", FILE_MAGIC, 7, 32, 0.0, 0))
    with pytest.raises(RecordingError, match="version 7"):
        RecordingReader(newer)
    with pytest.raises(RecordingError):  # a ValueError
        RecordingReader(tmp_path)
    assert issubclass(RecordingError, ValueError)


def test_empty_and_header_only(tmp_path):
    p = tmp_path / "e.lsrec"
    p.write_bytes(b"")
    with RecordingReader(p) as r:
        assert list(r) == [] and r.stop_reason.startswith("truncated file header at byte 0")
    with RecordingWriter(p):  # an empty file is taken over
        pass
    with RecordingReader(p) as r:
        assert list(r) == [] and r.stop_reason == "end of file" and r.stop_offset == FILE_HEADER_SIZE


def test_refuses_overwrite_and_appends(tmp_path):
    p = tmp_path / "r.lsrec"
    _write(p, [([b"one"], 1.0), ([b"two", b"2"], 2.0)])
    with pytest.raises(FileExistsError, match=r"r\.lsrec.*already exists"):
        RecordingWriter(p)
    # append after a torn tail: the tail is cut off, new records follow the good ones
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with RecordingWriter(p, append=True) as w:
        assert w.discarded_tail > 0 and "truncated" in w.discard_reason
        w.write([b"three"], 3.0)
    recs, _, reason, n = _read(p)
    assert reason == "end of file" and [r[0] for r in recs] == [[b"one"], [b"three"]]
    with RecordingWriter(p, overwrite=True) as w:
        w.write([b"fresh"], 4.0)
    recs, _, reason, _ = _read(p)
    assert [r[0] for r in recs] == [[b"fresh"]]
    other = tmp_path / "other.bin"
    other.write_bytes(b"not a recording at all, no no" * 2)
    with pytest.raises(RecordingError):
        RecordingWriter(other, append=True)


def test_background_flush_makes_records_visible(tmp_path):
    p = tmp_path / "f.lsrec"
    w = RecordingWriter(p, fsync_every_s=0.05)
    try:
        w.write([b"small"], 1.0)  # buffered in user space
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with RecordingReader(p) as r:
                if sum(1 for _ in r) == 1:
                    break
            time.sleep(0.02)
        else:
            pytest.fail("a buffered record did not reach the file within fsync_every_s")
    finally:
        w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write([b"late"], 2.0)


def test_large_and_small_records_interleave(tmp_path):
    """Small (buffered) and large (written directly) records keep their order."""
    rng = random.Random(3)
    msgs = []
    for i in range(300):
        size = rng.choice([0, 5, 100, 70_000, 200_000])
        msgs.append(([b"h%d" % i, os.urandom(size)], float(i)))
    p = tmp_path / "mix.lsrec"
    _write(p, msgs, fsync_every_s=None)
    recs, _, reason, n = _read(p)
    assert reason == "end of file" and n == 300
    assert all(got == parts for (parts, _), (got, _, _) in zip(msgs, recs))


def _start(run="run-1", repeat=1):
    return StartMessage(
        version=1, run_id=run, detector="pixelated", scan_shape=(4, 5), frame_shape=(8, 6),
        dtype="uint16", repeat=repeat, calibration=Calibration(convergence_semiangle_mrad=20, scan_step_nm=1.5, mrad_per_px=1.0),
    )


def test_scan_recording(tmp_path):
    p = tmp_path / "s.lsrec"
    frames = np.zeros((4, 8, 6), dtype=np.uint16)
    with RecordingWriter(p) as w:
        w.write(codec.encode(_start()), 1.0)
        for scan in range(2):
            for i in range(5):
                w.write(codec.encode(FramesMessage("run-1", scan * 5 + i, scan, i * 4, frames)), 2.0 + i)
        w.write([b"\xc1 not msgpack"], 3.0)
        w.write(codec.encode(EndMessage("run-1", 40, "complete")), 9.0)
        w.write(codec.encode(_start("run-2")), 10.0)
    s = scan_recording(p)
    assert s.complete and s.n_records == 14
    assert s.messages == {"start": 2, "frames": 10, "end": 1, "bad": 1}
    assert s.runs == ["run-1", "run-2"]
    assert s.scans == {"run-1": [0, 1], "run-2": []}
    assert s.frames == {"run-1": 40, "run-2": 0} and s.total_frames == 40
    assert s.end_reasons == {"run-1": "complete"}
    assert s.duration_s == pytest.approx(9.0)
    text = str(s)
    assert "run 'run-1': 40 frames in 2 scan(s) [0-1], end: complete" in text and "end of file" in text


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    """128 KiB records: report write / read rates (asserts only a low floor: shared CPUs)."""
    frame = np.random.default_rng(0).integers(0, 1000, (256, 256), dtype=np.uint16)
    hdr = codec.encode_frames_header("r", 0, 0, 0, 1, "uint16", (256, 256))
    p = tmp_path / "t.lsrec"
    n = 2000
    t = time.perf_counter()
    with RecordingWriter(p, fsync_every_s=None) as w:
        for i in range(n):
            w.write([hdr, frame], float(i))
    tw = time.perf_counter() - t
    t = time.perf_counter()
    with RecordingReader(p) as r:
        total = sum(rec.parts[1].nbytes for rec in r)
    tr = time.perf_counter() - t
    assert total == n * frame.nbytes
    print(f"write {w.bytes_written / tw / 1e9:.2f} GB/s, read+verify {w.bytes_written / tr / 1e9:.2f} GB/s")
    assert w.bytes_written / tw > 100e6 and w.bytes_written / tr > 100e6
