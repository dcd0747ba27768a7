"""DECTRIS SIMPLON stream: compression codecs, v2 (CBOR) and v1 (JSON) sources against
livestereo's simulator, and bad input."""

from __future__ import annotations

import json
import time

import cbor2
import numpy as np
import pytest
import zmq

from livestereo.detectors.dectris import cbor, compression
from livestereo.detectors.dectris.sim import DectrisSimulator
from livestereo.detectors.dectris.source import DectrisSource
from livestereo.protocol.codec import ProtocolError
from livestereo.protocol.messages import EndMessage, FramesMessage, StartMessage
from tests.source_helpers import collect, errors_of, frames_of


RNG = np.random.default_rng(3)
DATA = RNG.poisson(3, size=(3, 5, 24, 20)).astype(np.uint16)
PM = np.zeros((24, 20), np.uint32)
PM[2, 3] = 1
PM[10, 11] = 8


def masked(data, pm=PM):
    ref = data.reshape(-1, *data.shape[-2:]).copy()
    ref[:, pm != 0] = 0
    return ref


# ------------------------------------------------------------------------- compression


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("n", [3, 8, 1000, 4099])
def test_bslz4_roundtrip_and_lz4(dtype, n):
    a = RNG.poisson(2, size=n).astype(dtype)
    out = np.empty_like(a)
    compression.decompress_into(compression.compress_bslz4(a, block_bytes=512), "bslz4", a.dtype.itemsize, out)
    assert np.array_equal(out, a)
    out[:] = 0
    compression.decompress_into(compression.compress_h5lz4(a, block_bytes=1000), "lz4", 0, out)
    assert np.array_equal(out, a)


def test_bslz4_into_unaligned_output():
    a = RNG.poisson(2, size=4096).astype(np.uint16)
    holder = np.zeros(a.size + 1, np.uint16)
    out = holder[1:]  # 2 bytes off an 8-byte boundary: the scalar kernel runs
    compression.decompress_into(compression.compress_bslz4(a), "bslz4", 2, out)
    assert np.array_equal(out, a)


def test_bslz4_matches_bitshuffle_library():
    import bitshuffle

    a = RNG.poisson(2, size=(192, 192)).astype(np.uint16)
    ours = compression.compress_bslz4(a)
    block = int.from_bytes(ours[8:12], "big") // 2
    theirs = bitshuffle.decompress_lz4(np.frombuffer(ours[12:], np.uint8), (a.size,), a.dtype, block)
    assert np.array_equal(theirs.reshape(a.shape), a)
    blk = 2048
    enc = bitshuffle.compress_lz4(a.ravel(), blk).tobytes()
    framed = a.nbytes.to_bytes(8, "big") + (blk * 2).to_bytes(4, "big") + enc
    out = np.empty_like(a)
    compression.decompress_into(framed, "bslz4", 2, out)
    assert np.array_equal(out, a)


def test_literal_only_lz4_fallback_is_valid():
    data = bytes(range(256)) * 3
    blk = compression._lz4_literal_block(data)
    assert compression.lz4_block_decompress(blk, len(data)).tobytes() == data
    assert compression.lz4_block_decompress(compression._lz4_literal_block(b"abc"), 3).tobytes() == b"abc"


def test_corrupt_bslz4_raises_protocol_error():
    a = RNG.poisson(2, size=(64, 64)).astype(np.uint16)
    enc = bytearray(compression.compress_bslz4(a))
    out = np.empty_like(a)
    cut = bytes(enc[: len(enc) // 2])
    with pytest.raises(ProtocolError) as ei:
        compression.decompress_into(cut, "bslz4", 2, out)
    assert ei.value.reason == "bad_compression" and "corrupt" in ei.value.detail
    bad_len = bytearray(enc)
    bad_len[12:16] = (10**6).to_bytes(4, "big")  # a block length past the end
    with pytest.raises(ProtocolError):
        compression.decompress_into(bytes(bad_len), "bslz4", 2, out)
    wrong_size = bytearray(enc)
    wrong_size[:8] = (7).to_bytes(8, "big")
    with pytest.raises(ProtocolError, match="declares 7 bytes"):
        compression.decompress_into(bytes(wrong_size), "bslz4", 2, out)


@pytest.mark.parametrize("path", ["bitshuffle", "lz4", "numba"])
def test_every_bslz4_decoder_gives_the_same_frames_and_errors(monkeypatch, path):
    """The bitshuffle C decoder (default), the lz4-package path and the numba-only path."""
    if path != "bitshuffle":
        monkeypatch.setattr(compression, "_bshuf", None)
    if path == "numba":
        monkeypatch.setattr(compression, "_lz4", None)
    for dtype, shape in ((np.uint16, (64, 64)), (np.uint32, (37, 29)), (np.uint8, (5, 3))):  # odd sizes: a raw tail
        a = RNG.poisson(3, size=shape).astype(dtype)
        enc = compression.compress_bslz4(a, block_bytes=1024)
        out = np.empty_like(a)
        compression.decompress_into(enc, "bslz4", a.itemsize, out)
        assert np.array_equal(out, a), (path, dtype)
    enc = bytearray(compression.compress_bslz4(RNG.poisson(3, size=(64, 64)).astype(np.uint16), block_bytes=1024))
    out = np.empty((64, 64), np.uint16)
    for bad in (enc[: len(enc) // 2], enc[:12] + (10**6).to_bytes(4, "big") + enc[16:], enc[:-3]):
        with pytest.raises(ProtocolError, match="corrupt"):
            compression.decompress_into(bytes(bad), "bslz4", 2, out)
    garbled = bytearray(enc)
    garbled[16:40] = b"\xff" * 24  # an LZ4 block that does not decode to its size
    with pytest.raises(ProtocolError, match="corrupt"):
        compression.decompress_into(bytes(garbled), "bslz4", 2, out)


def test_cbor_decode_typed_arrays():
    a = np.arange(12, dtype=np.uint32).reshape(3, 4)
    for comp in ("bslz4", "lz4", None):
        msg = cbor.decode_v2(cbor.encode_v2({"type": "image", "data": {"c": cbor.encode_array(a, comp)}}))
        arr = msg["data"]["c"]
        assert arr.shape == (3, 4) and arr.dtype == np.dtype("<u4")
        assert np.array_equal(arr.decode(), a)
    with pytest.raises(ProtocolError) as ei:
        cbor.decode_v2(cbor2.dumps({"type": "image", "data": cbor2.CBORTag(12345, b"x")}))
    assert ei.value.reason == "unknown_cbor_tag" and "12345" in ei.value.detail
    with pytest.raises(ProtocolError) as ei:
        cbor.decode_v2(b"\xff\x00garbage")
    assert ei.value.reason == "not_cbor"


# ------------------------------------------------------------------------- stream v2 / v1


@pytest.mark.parametrize("version,comp", [(2, "bslz4"), (2, "lz4"), (2, None), (1, "bslz4"), (1, "lz4"), (1, None)])
def test_stream_roundtrip(version, comp):
    with DectrisSimulator(DATA, version=version, compression=comp, pixel_mask=PM, beam_center=(10.5, 7.25)) as sim:
        src = DectrisSource(sim.endpoint, frames_per_message=4)
        items = collect(src)
        src.close()
    assert not errors_of(items)
    start = items[0].message
    assert isinstance(start, StartMessage)
    assert start.scan_shape == (3, 5) and start.frame_shape == (24, 20) and start.dtype == "uint16"
    assert start.calibration.disc_center_px == (7.25, 10.5)  # (row = beam_center_y, col = beam_center_x)
    assert start.metadata["masked_pixels"] == 2
    msgs = [i.message for i in items if isinstance(i.message, FramesMessage)]
    assert [m.seq for m in msgs] == list(range(len(msgs))) and all(m.count <= 4 for m in msgs)
    assert np.array_equal(frames_of(items), masked(DATA))
    assert items[-1].message == EndMessage(start.run_id, 15, "complete")


def test_uint32_bs32_v1_and_v2():
    data = RNG.integers(0, 2**20, size=(2, 3, 8, 16)).astype(np.uint32)
    for version in (1, 2):
        with DectrisSimulator(data, version=version) as sim:
            src = DectrisSource(sim.endpoint)
            items = collect(src)
            src.close()
        assert items[0].message.dtype == "uint32"
        assert np.array_equal(frames_of(items), data.reshape(-1, 8, 16))


def test_channels_and_scan_shape_override():
    with DectrisSimulator(DATA, channels=("threshold_1", "threshold_2"), scan_in_user_data=False) as sim:
        src = DectrisSource(sim.endpoint, channel="threshold_2", scan_shape=(5, 3), use_pixel_mask=False)
        items = collect(src)
        src.close()
    start = items[0].message
    assert start.scan_shape == (5, 3) and start.metadata["dectris_channel"] == "threshold_2"
    assert np.array_equal(frames_of(items), DATA.reshape(-1, 24, 20))


def test_no_scan_shape_is_reported():
    with DectrisSimulator(DATA, scan_in_user_data=False) as sim:
        src = DectrisSource(sim.endpoint)
        items = collect(src)
        src.close()
    assert [e.reason for e in errors_of(items)] == ["no_scan_shape"]
    assert items[1].message.scan_shape == (1, 15) or items[0].message.scan_shape == (1, 15)


def test_two_series_and_repeat():
    with DectrisSimulator(DATA, series=2, repeat=2) as sim:
        src = DectrisSource(sim.endpoint, frames_per_message=8)
        items = collect(src, n_ends=2)
        src.close()
    starts = [i.message for i in items if isinstance(i.message, StartMessage)]
    ends = [i.message for i in items if isinstance(i.message, EndMessage)]
    assert len(starts) == 2 and starts[0].repeat == 2 and starts[0].run_id != starts[1].run_id
    assert [e.reason for e in ends] == ["complete", "complete"] and ends[0].frames_sent == 30
    scans = {i.message.scan for i in items if isinstance(i.message, FramesMessage)}
    assert scans == {0, 1}


def test_round_robin_receivers_do_not_pretend():
    """Two receivers on one PUSH stream each get a share: both say frames were lost."""
    with DectrisSimulator(DATA, wait_for_peer_s=0.5) as sim:
        a = DectrisSource(sim.endpoint, frames_per_message=1)
        b = DectrisSource(sim.endpoint, frames_per_message=1)
        got_a, got_b = [], []

        def count(got):
            return sum(i.message.count for i in got if isinstance(i.message, FramesMessage))

        t0 = time.monotonic()
        while time.monotonic() - t0 < 8 and count(got_a) + count(got_b) < 15:
            for src, got in ((a, got_a), (b, got_b)):
                it = src.receive(0.05)
                if it is not None:
                    got.append(it)
        for src, got in ((a, got_a), (b, got_b)):  # what is still pending (errors, ends)
            while (it := src.receive(0.1)) is not None:
                got.append(it)
        a.close()
        b.close()
    na, nb = count(got_a), count(got_b)
    assert na + nb == 15 and 0 < na < 15 and 0 < nb < 15
    reasons = [{e.reason for e in errors_of(got)} for got in (got_a, got_b)]
    # one got the start message and misses images; the other never saw a start
    assert {"frames_lost", "no_start"} <= reasons[0] | reasons[1]
    ends = [i.message for got in (got_a, got_b) for i in got if isinstance(i.message, EndMessage)]
    assert all(e.reason == "aborted" for e in ends)


# ------------------------------------------------------------------------- bad input


class RawPush:
    """A PUSH socket the test writes raw messages to."""

    def __init__(self):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sim = DectrisSimulator(DATA, endpoint="tcp://127.0.0.1:*", pixel_mask=None)  # message builder only

    def send(self, parts):
        self.sock.send_multipart(parts)

    def close(self):
        self.sock.close(linger=0)
        self.sim.stop()


@pytest.fixture
def push():
    p = RawPush()
    yield p
    p.close()


def _src(push, **kw):
    src = DectrisSource(push.endpoint, frames_per_message=kw.pop("fpm", 64), **kw)
    time.sleep(0.2)
    return src


def test_unknown_tag_then_images(push):
    src = _src(push)
    push.send(push.sim.start_message(1))
    push.send(push.sim.image_message(1, 0))
    push.send([cbor2.dumps(cbor2.CBORTag(55799, {"type": "image", "series_id": 1, "image_id": 1,
                                                 "data": {"threshold_1": cbor2.CBORTag(999, b"??")}}))])
    for i in range(2, 15):
        push.send(push.sim.image_message(1, i))
    push.send(push.sim.end_message(1))
    items = collect(src)
    src.close()
    reasons = [e.reason for e in errors_of(items)]
    assert "unknown_cbor_tag" in reasons and "frames_lost" in reasons
    assert frames_of(items).shape[0] == 14
    assert items[-1].message.reason == "aborted" and items[-1].message.frames_sent == 14


def test_corrupt_bslz4_block_in_stream(push):
    src = _src(push, fpm=4)
    push.send(push.sim.start_message(1))
    for i in range(15):
        parts = push.sim.image_message(1, i)
        if i == 6:
            msg = cbor.decode_v2(parts[0])
            arr = msg["data"]["threshold_1"]
            blob = bytearray(arr.data.data)
            blob[12:16] = (10**7).to_bytes(4, "big")
            tagged = cbor2.CBORTag(40, [list(arr.shape), cbor2.CBORTag(69, cbor2.CBORTag(56500, ["bslz4", 2, bytes(blob)]))])
            msg["data"]["threshold_1"] = tagged
            parts = [cbor2.dumps(msg)]
        push.send(parts)
    push.send(push.sim.end_message(1))
    items = collect(src)
    src.close()
    errs = errors_of(items)
    assert errs[0].reason == "bad_compression" and "image 6" in errs[0].detail
    ref = DATA.reshape(-1, 24, 20)
    got = {}
    for i in items:
        if isinstance(i.message, FramesMessage):
            for k in range(i.message.count):
                got[i.message.first + k] = i.message.data[k]
    assert sorted(got) == [k for k in range(15) if k != 6]
    assert all(np.array_equal(v, ref[k]) for k, v in got.items())


def test_garbage_message_and_unknown_type(push):
    src = _src(push)
    push.send([b"\x00\x01garbage that is not json nor cbor"])
    push.send([cbor.encode_v2({"type": "weather", "series_id": 1})])
    push.send(push.sim.start_message(1))
    for i in range(15):
        push.send(push.sim.image_message(1, i))
    push.send(push.sim.end_message(1))
    items = collect(src)
    src.close()
    assert [e.reason for e in errors_of(items)] == ["bad_json", "unknown_type"]
    assert items[-1].message.reason == "complete"


def test_restart_mid_series(push):
    src = _src(push)
    push.send(push.sim.start_message(1))
    for i in range(6):
        push.send(push.sim.image_message(1, i))
    push.send(push.sim.start_message(2))
    for i in range(15):
        push.send(push.sim.image_message(2, i))
    push.send(push.sim.end_message(2))
    items = collect(src, n_ends=2)
    src.close()
    assert [e.reason for e in errors_of(items)] == ["restarted"]
    ends = [i.message for i in items if isinstance(i.message, EndMessage)]
    assert [(e.frames_sent, e.reason) for e in ends] == [(6, "aborted"), (15, "complete")]


def test_stream_stops_mid_series(push):
    src = _src(push, fpm=64)
    push.send(push.sim.start_message(1))
    for i in range(5):
        push.send(push.sim.image_message(1, i))
    items = collect(src, timeout_s=1.0)
    assert src.receive(0.2) is None
    src.close()
    assert not errors_of(items)
    assert frames_of(items).shape[0] == 5  # delivered after max_batch_wait_s, not held for a full batch
    assert not any(isinstance(i.message, EndMessage) for i in items)


def test_image_of_other_series_and_v1_bad_encoding(push):
    src = _src(push)
    push.send(push.sim.start_message(1))
    push.send(push.sim.image_message(7, 0))
    head = json.dumps({"htype": "dimage-1.0", "series": 1, "frame": 0}).encode()
    d = json.dumps({"htype": "dimage_d-1.0", "shape": [20, 24], "type": "uint16", "encoding": "zstd<"}).encode()
    push.send([head, d, b"xxxx", json.dumps({"htype": "dconfig-1.0"}).encode()])
    items = collect(src, timeout_s=1.0)
    src.close()
    assert [e.reason for e in errors_of(items)] == ["series_mismatch", "bad_compression"]
