"""Quantum Detectors Merlin: .mib decoding against real recordings, the TCP source against
livestereo's simulator, the control port, and bad input."""

from __future__ import annotations

import socket
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from livestereo.detectors.files import open_file_source
from livestereo.detectors.merlin import mib
from livestereo.detectors.merlin.sim import MerlinSimulator, RawTcpServer, frame_message, header_message
from livestereo.detectors.merlin.source import MerlinControl, MerlinSource, _Reader
from livestereo.protocol.messages import EndMessage, FramesMessage, StartMessage
from tests.source_helpers import collect, errors_of, frames_of

MERLIN_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "merlin"


# ----------------------------------------------------------------------------- helpers


def read_all(path, **kw):
    src = open_file_source(path, **kw)
    try:
        return list(src)
    finally:
        src.close()


@pytest.fixture(scope="module")
def merlin_files(tmp_path_factory):
    if not MERLIN_DATA.is_dir():
        pytest.skip(f"real Merlin recordings not found at {MERLIN_DATA} (shared test data absent)")
    out = tmp_path_factory.mktemp("merlin")
    for z in sorted(MERLIN_DATA.glob("*.zip")):
        with zipfile.ZipFile(z) as zf:
            zf.extractall(out / z.stem)
    files = {p.name: p for p in out.rglob("*.mib")}
    if not files:
        pytest.skip(f"no .mib files in the zips of {MERLIN_DATA}")
    return files


def mib_frames(path) -> tuple[StartMessage, np.ndarray]:
    items = read_all(path)
    assert not errors_of(items), errors_of(items)
    return items[0].message, frames_of(items)


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize("layout,shape", [("Single", (256, 256)), ("Quad", (512, 512))])
@pytest.mark.parametrize("depth,dtype,vmax", [(1, "uint8", 1), (6, "uint8", 63), (12, "uint16", 4095), (24, "uint32", 2**24 - 1)])
@pytest.mark.parametrize("n", [1, 9])
def test_real_counter_depths(merlin_files, layout, shape, depth, dtype, vmax, n):
    start, data = mib_frames(merlin_files[f"{layout}_{n}_Frame_CounterDepth_{depth}_Rows_256.mib"])
    assert start.frame_shape == shape and start.dtype == dtype
    assert data.shape == (n, *shape) and data.dtype == np.dtype(dtype)
    assert data.dtype.byteorder in ("=", "|", "<")
    assert 0 < data.max() <= vmax
    assert start.metadata["merlin_counter_depth"] == depth
    if depth == 12 and layout == "Quad" and n == 9:
        assert data.max() == 4095  # the README's check: (9, 512, 512) big-endian uint16, max 4095


@pytest.mark.parametrize("layout", ["Single", "Quad"])
@pytest.mark.parametrize("n", [1, 9])
def test_real_raw_1bit_matches_processed(merlin_files, layout, n):
    """RAW (packed, chips as read out) vs the processed U08 recording of the same setup:
    independent acquisitions of the same illumination, so per-frame counts agree within
    a few percent and the summed images correlate (a wrong chip layout would not)."""
    s_raw, raw = mib_frames(merlin_files[f"{layout}_{n}_Frame_CounterDepth_1_Rows_256RAW.mib"])
    s_u8, u8 = mib_frames(merlin_files[f"{layout}_{n}_Frame_CounterDepth_1_Rows_256.mib"])
    assert s_raw.metadata["merlin_pixel_type"] == "R64"
    assert raw.shape == u8.shape and raw.dtype == np.uint8
    assert set(np.unique(raw)) <= {0, 1}
    counts_raw = raw.reshape(n, -1).sum(1).astype(float)
    counts_u8 = u8.reshape(n, -1).sum(1).astype(float)
    assert np.allclose(counts_raw, counts_u8, rtol=0.03)
    a, b = raw.sum(0).ravel().astype(float), u8.sum(0).ravel().astype(float)
    assert np.corrcoef(a, b)[0, 1] > 0.99
    if layout == "Quad":  # each chip lands where the processed image has it
        for q in [(slice(0, 256), slice(0, 256)), (slice(0, 256), slice(256, 512)),
                  (slice(256, 512), slice(0, 256)), (slice(256, 512), slice(256, 512))]:
            qa, qb = raw.sum(0)[q].ravel().astype(float), u8.sum(0)[q].ravel().astype(float)
            assert np.corrcoef(qa, qb)[0, 1] > 0.95


def test_real_roi_files_and_hot_pixel(merlin_files):
    for name, rows in [("002_merlin_test_roi_sig256x128_nav4x2_hot_pixel_52x_39y.mib", 128),
                       ("003_merlin_test_roi_sig256x64_nav4x2_hot_pixel_52x_39y.mib", 64)]:
        start, data = mib_frames(merlin_files[name])
        assert start.scan_shape == (2, 4)  # ScanX 4, ScanY 2 in the header
        assert "scan_shape_guessed" not in start.metadata
        assert data.shape == (8, rows, 256) and data.dtype == np.uint16
        total = data.sum(0)
        assert np.unravel_index(np.argmax(total), total.shape) == (39, 52)  # x 52, y 39
        items = read_all(merlin_files[name], hot_pixels=[(39, 52)])
        masked = frames_of(items)
        assert items[0].message.metadata["masked_pixels"] == 1
        assert (masked[:, 39, 52] == 0).all()
        ref = data.copy()
        ref[:, 39, 52] = 0
        assert np.array_equal(masked, ref)
    start, data = mib_frames(merlin_files["002_4x2_6bit_roi128.mib"])
    assert data.shape == (8, 128, 256) and data.max() <= 63
    start, data = mib_frames(merlin_files["001_4x2_6bit.mib"])
    assert data.shape == (8, 256, 256)
    assert start.metadata.get("scan_shape_guessed") is True  # old header: no ScanX/ScanY
    items = read_all(merlin_files["001_4x2_6bit.mib"], scan_shape=(2, 4))
    assert items[0].message.scan_shape == (2, 4)
    assert [(m.message.scan, m.message.first, m.message.count) for m in items if isinstance(m.message, FramesMessage)] == [(0, 0, 8)]


def test_real_file_served_over_tcp(merlin_files):
    """The quad 12-bit recording, byte for byte over the simulated data port."""
    path = merlin_files["Quad_9_Frame_CounterDepth_12_Rows_256.mib"]
    _, ref = mib_frames(path)
    with MerlinSimulator(mib_path=path, scan_shape=(3, 3)) as sim:
        src = MerlinSource("127.0.0.1", sim.port, frames_per_message=4, reconnect=False, scan_shape=(3, 3))
        items = collect(src)
        src.close()
    assert not errors_of(items)
    assert np.array_equal(frames_of(items), ref)
    assert items[-1].message.reason == "complete"


def test_real_raw_quad_over_tcp(merlin_files):
    path = merlin_files["Quad_9_Frame_CounterDepth_1_Rows_256RAW.mib"]
    _, ref = mib_frames(path)
    with MerlinSimulator(mib_path=path) as sim:
        src = MerlinSource("127.0.0.1", sim.port, scan_shape=(1, 9))
        items = collect(src)
        src.close()
    assert not errors_of(items)
    assert np.array_equal(frames_of(items), ref)


# ----------------------------------------------------------------------------- RAW formats (synthetic)


def encode_raw(img: np.ndarray, depth: int, quad: bool) -> bytes:
    """The inverse of the RAW decoding: chips side by side, 64-bit words byte-reversed."""
    if quad:
        r = img.shape[0] // 2
        c = 256
        strip = np.empty((r, 4 * c), dtype=img.dtype)
        strip[:, 3 * c:] = img[:r, :c]
        strip[:, 2 * c:3 * c] = img[:r, c:]
        strip[:, c:2 * c] = img[r:, :c][::-1, ::-1]
        strip[:, :c] = img[r:, c:][::-1, ::-1]
    else:
        strip = img
    if depth == 1:
        b = np.packbits(strip.astype(np.uint8).reshape(-1), bitorder="little")
    elif depth == 6:
        b = strip.astype(np.uint8).reshape(-1)
    elif depth == 12:
        b = strip.astype("<u2").reshape(-1).view(np.uint8)
    else:
        hi = (strip >> 12).astype("<u2")
        lo = (strip & 0xFFF).astype("<u2")
        b = np.concatenate([hi.reshape(-1), lo.reshape(-1)]).view(np.uint8)
    return np.ascontiguousarray(b).view("<u8").astype(">u8").tobytes()


@pytest.mark.parametrize("depth,vmax", [(1, 1), (6, 63), (12, 4095), (24, 2**24 - 1)])
@pytest.mark.parametrize("quad", [False, True])
def test_raw_roundtrip(depth, vmax, quad):
    rng = np.random.default_rng(depth)
    shape = (512, 512) if quad else (256, 256)
    frames = rng.integers(0, vmax + 1, size=(3, *shape)).astype(np.uint32)
    chips = 4 if quad else 1
    body = b""
    for i, fr in enumerate(frames):
        hdr = mib.make_frame_header(i + 1, (256, 256 * chips), "R64", depth=depth, n_chips=chips,
                                    layout="2x2" if quad else "1x1")
        body += hdr + encode_raw(fr, depth, quad)
    h = mib.parse_frame_header(body, 0)
    assert h.raw and h.frame_shape == shape and h.depth == depth
    out = mib.decode_payloads(body, h.header_nbytes, h.frame_nbytes, 3, h)
    assert out.dtype == np.dtype(h.dtype)
    assert np.array_equal(out, frames)


def test_frame_header_fields():
    hdr = mib.make_frame_header(7, (128, 256), "U16", depth=12)
    h = mib.parse_frame_header(hdr + bytes(128 * 256 * 2))
    assert (h.seq, h.x, h.y, h.pixel_type, h.depth, h.header_nbytes) == (7, 256, 128, "U16", 12, 384)
    assert h.frame_shape == (128, 256) and h.payload_nbytes == 128 * 256 * 2
    bad = hdr.replace(b"U16", b"U12")
    with pytest.raises(Exception) as ei:
        mib.parse_frame_header(bad)
    assert ei.value.reason == "unknown_pixel_type"


# ----------------------------------------------------------------------------- TCP


@pytest.mark.parametrize("threaded", [True, False])
def test_tcp_source_batches_and_repeats(threaded):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 4096, size=(4 * 5, 16, 24), dtype=np.uint16)
    with MerlinSimulator(frames, scan_shape=(4, 5), repeat=2) as sim:
        src = MerlinSource("127.0.0.1", sim.port, frames_per_message=7, threaded=threaded)
        items = collect(src)
        src.close()
    assert not errors_of(items)
    start = items[0].message
    assert isinstance(start, StartMessage)
    assert start.scan_shape == (4, 5) and start.repeat == 2 and start.dtype == "uint16" and start.frame_shape == (16, 24)
    assert start.metadata.get("calibration_placeholder") is True
    msgs = [i.message for i in items if isinstance(i.message, FramesMessage)]
    assert [m.seq for m in msgs] == list(range(len(msgs)))
    assert all(m.count <= 7 for m in msgs)
    assert all(m.first + m.count <= 20 for m in msgs)
    got = np.zeros((2, 20, 16, 24), np.uint16)
    for m in msgs:
        got[m.scan, m.first:m.first + m.count] = m.data
    assert np.array_equal(got, np.stack([frames, frames]))
    end = items[-1].message
    assert end == EndMessage(start.run_id, 40, "complete")


def test_tcp_source_u08_u32_and_hot_pixels():
    for dtype in (np.uint8, np.uint32):
        frames = (np.arange(6 * 8 * 8) % 200).astype(dtype).reshape(6, 8, 8) + 1
        with MerlinSimulator(frames, scan_shape=(2, 3)) as sim:
            src = MerlinSource("127.0.0.1", sim.port, hot_pixels=[(1, 2), (7, 7)])
            items = collect(src)
            src.close()
        ref = frames.copy()
        ref[:, 1, 2] = 0
        ref[:, 7, 7] = 0
        got = frames_of(items)
        assert got.dtype == np.dtype(dtype).newbyteorder("=")
        assert np.array_equal(got, ref)
        assert items[0].message.metadata["masked_pixels"] == 2


def test_scan_shape_from_config_when_header_has_none():
    frames = np.ones((6, 4, 4), np.uint16)
    with MerlinSimulator(frames, scan_shape=(2, 3), scan_in_header=False) as sim:
        src = MerlinSource("127.0.0.1", sim.port, scan_shape=(3, 2))
        items = collect(src)
        src.close()
    assert items[0].message.scan_shape == (3, 2)


def test_control_port_and_arm():
    frames = np.arange(4 * 6 * 6, dtype=np.uint16).reshape(4, 6, 6)
    with MerlinSimulator(frames, scan_shape=(2, 2), wait_for_arm=True, acquisitions=1) as sim:
        with MerlinControl("127.0.0.1", sim.control_port) as ctl:
            assert ctl.get("NUMFRAMESTOACQUIRE") == "4"
            ctl.set("COUNTERDEPTH", 12)
            assert ctl.get("COUNTERDEPTH") == "12"
            with pytest.raises(Exception):
                ctl.cmd("SELFDESTRUCT")
        src = MerlinSource("127.0.0.1", sim.port, control_port=sim.control_port, arm=True)
        items = collect(src)
        src.close()
    assert not errors_of(items)
    assert np.array_equal(frames_of(items), frames)
    assert items[0].message.metadata["merlin_control_parameters"]["COUNTERDEPTH"] == "12"


def test_open_source_url():
    from livestereo.detectors import open_source

    frames = np.ones((4, 4, 4), np.uint16)
    with MerlinSimulator(frames, scan_shape=(2, 2)) as sim:
        src = open_source(f"merlin://127.0.0.1:{sim.port}?hot=1,1;2,2&batch=2&threaded=0&busy_poll_us=250")
        assert src.name == f"Merlin tcp://127.0.0.1:{sim.port}" and not src.threaded
        assert src.busy_poll_s == pytest.approx(250e-6)
        items = collect(src)
        src.close()
    assert items[0].message.metadata["masked_pixels"] == 2
    assert max(i.message.count for i in items if isinstance(i.message, FramesMessage)) <= 2
    with pytest.raises(ValueError, match="unknown source URL scheme"):
        open_source("gopher://x")
    with pytest.raises(ValueError, match="busy_poll_us='fast' is not a number"):
        open_source("merlin://127.0.0.1:1?busy_poll_us=fast")


# ----------------------------------------------------------------------------- bad input


def _stream(frames, scan_shape, first_seq=1, hdr=True, n_frames=None):
    parts = []
    if hdr:
        parts.append(header_message(mib.make_acquisition_header(n_frames or len(frames), scan_shape=scan_shape)))
    for i, fr in enumerate(frames):
        parts.append(frame_message(first_seq + i, fr, "U16"))
    return parts


@pytest.fixture(params=[True, False], ids=["threaded", "inline"])
def threaded(request):
    return request.param


def _run_raw(chunks, close=True, timeout_s=5.0, **kw):
    with RawTcpServer(chunks, close=close) as srv:
        src = MerlinSource("127.0.0.1", srv.port, reconnect=False, **kw)
        items = collect(src, n_ends=0, timeout_s=timeout_s)
        src.close()
    return items


FR = np.arange(8 * 10 * 12, dtype=np.uint16).reshape(8, 10, 12)


def test_truncated_frame_then_more_frames(threaded):
    parts = _stream(FR, (2, 4))
    parts[3] = parts[3][: len(parts[3]) // 2]  # frame 3 cut short, the stream goes on
    items = _run_raw([b"".join(parts)], threaded=threaded)
    errs = errors_of(items)
    assert any(e.reason == "truncated" and "stream byte offset" in e.detail for e in errs), errs
    assert any(e.reason == "frames_lost" for e in errs)
    got = {}
    for i in items:
        if isinstance(i.message, FramesMessage):
            for k in range(i.message.count):
                got[i.message.first + k] = i.message.data[k]
    assert sorted(got) == [0, 1, 3, 4, 5, 6, 7]  # frame 2 (seq 3) dropped, never garbage
    for k, v in got.items():
        assert np.array_equal(v, FR[k])
    end = [i.message for i in items if isinstance(i.message, EndMessage)]
    assert end and end[0].reason == "aborted" and end[0].frames_sent == 7


def test_header_lies_about_size():
    parts = _stream(FR, (2, 4))
    hdr = mib.make_frame_header(3, (10, 13), "U16")  # says 13 columns, sends 12
    body = hdr + mib.encode_payload(FR[2], "U16")
    parts[3] = mib.mpx_prefix(len(body)) + body
    items = _run_raw([b"".join(parts)])
    errs = errors_of(items)
    assert [e.reason for e in errs if e.reason != "frames_lost"] == ["size_mismatch"], errs
    assert "MPX length says" in errs[0].detail
    assert frames_of(items).shape[0] == 7


def test_unknown_pixel_type():
    parts = _stream(FR, (2, 4))
    body = mib.make_frame_header(2, (10, 12), "U16").replace(b"U16", b"F32") + mib.encode_payload(FR[1], "U16")
    parts[2] = mib.mpx_prefix(len(body)) + body
    items = _run_raw([b"".join(parts)])
    errs = errors_of(items)
    assert errs[0].reason == "unknown_pixel_type" and "F32" in errs[0].detail
    assert frames_of(items).shape[0] == 7


def test_garbage_between_frames_resyncs(threaded):
    parts = _stream(FR, (2, 4))
    parts.insert(4, b"GARBAGE" * 100)
    items = _run_raw([b"".join(parts)], threaded=threaded)
    errs = errors_of(items)
    assert [e.reason for e in errs] == ["bad_mpx_prefix"]
    assert np.array_equal(frames_of(items), FR)
    assert items[-1].message.reason == "complete"


def test_stream_stops_mid_series():
    parts = _stream(FR[:5], (2, 4), n_frames=8)
    with RawTcpServer([b"".join(parts)], close=False) as srv:
        src = MerlinSource("127.0.0.1", srv.port)
        items = collect(src, n_ends=0, timeout_s=1.5)
        assert src.receive(0.2) is None  # silence: no error, no end (the daemon's idle timeout decides)
        src.close()
    assert not errors_of(items)
    assert frames_of(items).shape[0] == 5
    assert not any(isinstance(i.message, EndMessage) for i in items)


@pytest.mark.parametrize("busy_poll_s", [0.0, 0.001], ids=["blocking", "busy-poll"])
def test_connection_closed_mid_series(threaded, busy_poll_s):
    parts = _stream(FR[:5], (2, 4), n_frames=8)
    items = _run_raw([b"".join(parts) + parts[1][:100]], threaded=threaded, busy_poll_s=busy_poll_s)
    reasons = [e.reason for e in errors_of(items)]
    assert "truncated" in reasons and "disconnected" in reasons
    end = [i.message for i in items if isinstance(i.message, EndMessage)]
    assert end[0].reason == "aborted" and end[0].frames_sent == 5


def test_detector_restarts_series_mid_scan():
    first = _stream(FR[:5], (2, 4), n_frames=8)
    second = _stream(FR, (2, 4))
    items = _run_raw([b"".join(first + second)])
    errs = errors_of(items)
    assert [e.reason for e in errs] == ["restarted"]
    starts = [i.message for i in items if isinstance(i.message, StartMessage)]
    ends = [i.message for i in items if isinstance(i.message, EndMessage)]
    assert len(starts) == 2 and starts[0].run_id != starts[1].run_id
    assert ends[0] == EndMessage(starts[0].run_id, 5, "aborted")
    assert ends[1] == EndMessage(starts[1].run_id, 8, "complete")


def test_restart_without_header_is_detected_by_sequence_numbers():
    parts = _stream(FR[:5], (2, 4), n_frames=8) + [frame_message(1 + i, FR[i], "U16") for i in range(8)]
    items = _run_raw([b"".join(parts)])
    assert [e.reason for e in errors_of(items)] == ["restarted"]
    ends = [i.message for i in items if isinstance(i.message, EndMessage)]
    assert [e.reason for e in ends] == ["aborted", "complete"]


@pytest.mark.parametrize("busy_poll_s", [0.0, 0.001], ids=["blocking", "busy-poll"])
def test_frames_in_small_chunks(threaded, busy_poll_s):
    """The stream arriving a few bytes at a time decodes the same."""
    blob = b"".join(_stream(FR, (2, 4)))
    chunks = [blob[i:i + 997] for i in range(0, len(blob), 997)]
    with RawTcpServer(chunks, pause_s=0.001) as srv:
        src = MerlinSource("127.0.0.1", srv.port, reconnect=False, frames_per_message=3, threaded=threaded,
                           busy_poll_s=busy_poll_s)
        items = collect(src)
        src.close()
    assert not errors_of(items)
    assert np.array_equal(frames_of(items), FR)


def _reader_pair(busy_poll_s, chunk=1000, idle_s=0.05, min_bps=0.0):
    a, b = socket.socketpair()
    return _Reader(a, chunk, 16, idle_s=idle_s, busy_poll_s=busy_poll_s, busy_poll_min_bps=min_bps), a, b


@pytest.mark.parametrize("busy_poll_s", [0.0, 0.02])
def test_reader_fills_a_chunk_from_pieces_and_returns_short_on_a_pause(busy_poll_s):
    """Pieces that come within the busy-poll window (or the blocking read's timeout) fill
    one chunk; a pause longer than both hands over what came; then the peer's close."""
    r, a, b = _reader_pair(busy_poll_s)

    def send():
        for i in range(10):
            b.sendall(bytes([i]) * 100)
            time.sleep(0.002)
        b.sendall(b"tail")
        time.sleep(0.3)
        b.close()

    t = threading.Thread(target=send)
    t.start()
    try:
        buf, lo, hi = r.fill_one()
        assert bytes(buf[lo:hi]) == b"".join(bytes([i]) * 100 for i in range(10))
        buf, lo, hi = r.fill_one(timeout_s=1.0)
        assert bytes(buf[lo:hi]) == b"tail"  # short: the stream paused
        t0 = time.perf_counter()
        while (item := r.fill_one()) is None:
            assert time.perf_counter() - t0 < 5
        assert item == ("eof", None, None)
    finally:
        t.join()
        a.close()


def test_reader_busy_polls_only_a_fast_stream():
    """A chunk that filled slower than busy_poll_min_bps leaves the next one to a blocking
    read; one that filled fast lets the next one be busy polled; a short one stops it."""
    r, a, b = _reader_pair(0.01, chunk=4000, min_bps=1e6)
    try:
        b.sendall(b"x" * 4000)
        assert r.fill_one()[2] - 16 == 4000 and r.polled_chunks == 0  # the first chunk: rate unknown
        assert r.rate_bps > 1e6  # 4000 bytes were waiting: filled at once
        b.sendall(b"y" * 4000)
        assert r.fill_one()[2] - 16 == 4000 and r.polled_chunks == 1
        b.sendall(b"z" * 10)
        assert r.fill_one()[2] - 16 == 10 and r.polled_chunks == 2 and r.rate_bps == 0.0  # short: the stream paused

        def trickle():  # 1000 bytes every 5 ms: 0.2 MB/s, below the 1 MB/s bound
            for _ in range(8):
                b.sendall(b"s" * 1000)
                time.sleep(0.005)

        t = threading.Thread(target=trickle)
        t.start()
        got = 0
        while got < 8000:
            item = r.fill_one(timeout_s=1.0)
            if item is not None:
                got += item[2] - item[1]
        t.join()
        assert r.polled_chunks == 2 and 0 < r.rate_bps < 1e6
    finally:
        a.close()
        b.close()


def test_reader_busy_poll_gives_up_after_its_window():
    """With nothing coming, busy polling spins for busy_poll_s, then the blocking read
    waits for the rest of the timeout: fill_one returns None after about both."""
    r, a, b = _reader_pair(0.01, idle_s=0.02)
    try:
        t0 = time.perf_counter()
        assert r.fill_one() is None
        dt = time.perf_counter() - t0
        assert 0.025 <= dt < 0.5, dt
    finally:
        a.close()
        b.close()


def test_truncated_mib_file(tmp_path):
    blob = b"".join(mib.make_frame_header(i + 1, (10, 12), "U16") + mib.encode_payload(FR[i], "U16") for i in range(8))
    p = tmp_path / "cut.mib"
    fsize = len(blob) // 8
    p.write_bytes(blob[: 7 * fsize + 100])
    items = read_all(p, scan_shape=(2, 4))
    assert np.array_equal(frames_of(items), FR[:7])
    errs = errors_of(items)
    assert len(errs) == 1 and errs[0].reason == "truncated"
    assert f"byte offset {7 * fsize}" in errs[0].detail and str(p) in errs[0].detail
    assert items[-1].message == EndMessage(items[0].message.run_id, 7, "aborted")


def test_large_frames_small_chunks_threaded():
    """Frames bigger than the reader's chunk and reserve are carried over whole."""
    frames = np.arange(4 * 300 * 400, dtype=np.uint32).reshape(4, 300, 400)
    with MerlinSimulator(frames, scan_shape=(2, 2)) as sim:
        src = MerlinSource("127.0.0.1", sim.port, recv_chunk_bytes=50_000, frames_per_message=3)
        src._reserve = 1000
        items = collect(src)
        src.close()
    assert not errors_of(items)
    assert np.array_equal(frames_of(items), frames)


@pytest.mark.parametrize("threaded", [True, False])
def test_source_hands_out_views_and_reuses_only_free_buffers(threaded):
    """U16 frames travel as big-endian views of the receive buffer (no copy). A consumer
    that keeps them sees them intact while the reader goes on; one that drops them lets the
    reader reuse its buffers (a bounded number allocated over a long stream)."""
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 4096, size=(40, 32, 32), dtype=np.uint16)
    with MerlinSimulator(frames, scan_shape=(5, 8), repeat=30) as sim:
        src = MerlinSource("127.0.0.1", sim.port, frames_per_message=8, recv_chunk_bytes=20_000,  # ~120 chunks
                           threaded=threaded)
        kept = []
        n = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            it = src.receive(0.2)
            if it is None:
                continue
            assert it.error is None, it.error
            m = it.message
            if isinstance(m, FramesMessage):
                assert m.data.dtype == np.dtype(">u2") and not m.data.flags.owndata
                if m.scan in (0, 29):
                    kept.append(m)  # held across the whole stream
                else:
                    assert np.array_equal(m.data, frames[m.first:m.first + m.count])
                n += m.count
            elif isinstance(m, EndMessage):
                break
        allocated = src._reader.allocated
        src.close()
    assert n == 30 * 40
    for m in kept:
        assert np.array_equal(m.data, frames[m.first:m.first + m.count]), (m.scan, m.first)
    assert allocated <= 12, allocated


@pytest.mark.parametrize("threaded", [True, False])
def test_daemon_ingest_of_zero_copy_frames_equals_numpy(threaded):
    """A live Merlin (U16 over TCP) through the daemon's own ingest: the big-endian views
    are held for the disc finder (no disc calibration), then accumulated in place; both
    scans of the series equal a float64 numpy reference."""
    from livestereo.compute.layouts import LayoutSpec, build_layout
    from livestereo.daemon.ingest import Ingest
    from tests.disc_helpers import disc_frames

    frames = disc_frames(24, (64, 64), center=(31.2, 32.6), radius=14.0)
    scans = []
    ingest = Ingest(LayoutSpec(kind="multiview", k=4), disc_frames=10, on_scan=scans.append)
    with MerlinSimulator(frames, scan_shape=(4, 6), repeat=2) as sim:
        src = MerlinSource("127.0.0.1", sim.port, frames_per_message=5, threaded=threaded)
        for it in collect(src):
            ingest.handle(it)
        src.close()
    assert [s.complete for s in scans] == [True, True]
    st = StartMessage(version=1, run_id="x", detector="pixelated", scan_shape=(4, 6), frame_shape=(64, 64), dtype="uint16",
                      calibration=scans[0].calibration)
    w = build_layout(LayoutSpec(kind="multiview", k=4), st).weights_matrix().astype(np.float64)
    ref = (w @ frames.reshape(24, -1).astype(np.float64).T).reshape(-1, 4, 6)
    for s in scans:
        np.testing.assert_allclose(s.images, ref, rtol=1e-12)
