"""Stream protocol v1: encode/decode round trips and every malformed message named."""

import re

import msgpack
import numpy as np
import pytest

from livestereo.protocol.codec import ProtocolError, decode, encode, encode_frames_header
from livestereo.protocol.messages import EndMessage, FramesMessage, StartMessage
from tests.conftest import make_start


def test_start_round_trip():
    start = make_start(repeat=3)
    back = decode([bytes(p) for p in encode(start)])
    assert back == start


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16", "int32", "float32"])
def test_frames_round_trip_zero_copy(dtype):
    data = (np.arange(3 * 4 * 5) % 200).astype(dtype).reshape(3, 4, 5)
    parts = encode(FramesMessage("r", 7, 2, 11, data))
    payload = bytearray(parts[1])
    msg = decode([bytes(parts[0]), payload])
    assert (msg.seq, msg.scan, msg.first, msg.count) == (7, 2, 11, 3)
    np.testing.assert_array_equal(msg.data, data)
    payload[0] ^= 0xFF  # the array is a view on the received buffer, not a copy
    assert msg.data.reshape(-1).view(np.uint8)[0] == payload[0]


def test_segmented_frames_and_end():
    data = np.arange(8, dtype=np.uint32).reshape(2, 4)
    msg = decode([bytes(p) for p in encode(FramesMessage("r", 0, 0, 0, data))])
    assert msg.data.shape == (2, 4)
    end = decode([bytes(p) for p in encode(EndMessage("r", 5, "aborted"))])
    assert end == EndMessage("r", 5, "aborted")


def _reason(parts):
    with pytest.raises(ProtocolError) as info:
        decode(parts)
    return info.value.reason, str(info.value)


def test_not_msgpack():
    reason, text = _reason([b"\xc1\xc1 this is not msgpack"])
    assert reason == "not_msgpack" and "part 0" in text


def test_header_not_a_map():
    assert _reason([msgpack.packb([1, 2, 3])])[0] == "bad_header"


def test_unknown_type_and_version():
    assert _reason([msgpack.packb({"type": "hello"})])[0] == "unknown_type"
    d = make_start().model_dump(mode="json")
    d["version"] = 2
    reason, text = _reason([msgpack.packb(d)])
    assert reason == "bad_version" and "2" in text


def test_start_missing_and_mistyped_fields_are_named():
    d = make_start().model_dump(mode="json")
    del d["scan_shape"]
    reason, text = _reason([msgpack.packb(d)])
    assert reason == "bad_start" and "scan_shape" in text
    d = make_start().model_dump(mode="json")
    d["calibration"]["scan_step_nm"] = "one"
    reason, text = _reason([msgpack.packb(d)])
    assert "calibration.scan_step_nm" in text
    d = make_start().model_dump(mode="json")
    d["colour"] = "red"
    assert "unknown key 'colour'" in _reason([msgpack.packb(d)])[1]


@pytest.mark.parametrize(("path", "value"), [(("scan_rotation_deg",), float("nan")), (("disc_center_px",), [float("inf"), 3.0]),
                                            (("high_tension_kv",), float("inf"))])
def test_start_calibration_must_be_finite(path, value):
    """NaN / inf in a calibration would silently empty every virtual detector's mask."""
    d = make_start().model_dump(mode="json")
    d["calibration"][path[0]] = value
    reason, text = _reason([msgpack.packb(d)])
    assert reason == "bad_start" and f"calibration.{path[0]}" in text and "finite number" in text


def test_frames_field_errors():
    good = dict(type="frames", run_id="r", seq=0, scan=0, first=0, count=1, dtype="uint16", shape=[2, 2])
    for key, value, reason in [("seq", "0", "bad_field"), ("count", True, "bad_field"), ("dtype", "float128", "bad_field"),
                               ("shape", [0, 2], "bad_field"), ("first", -1, "bad_field")]:
        h = dict(good, **{key: value})
        got, text = _reason([msgpack.packb(h), bytes(8)])
        assert got == reason, (key, text)
        assert key in text or "dtype" in text or "shape" in text or ">=" in text
    h = dict(good)
    del h["run_id"]
    assert _reason([msgpack.packb(h), bytes(8)])[0] == "missing_field"
    assert _reason([msgpack.packb(good)])[0] == "bad_parts"


def test_payload_size_mismatch_is_explained():
    header = encode_frames_header("r", 0, 0, 0, 2, "uint16", (4, 4))
    reason, text = _reason([header, bytes(2 * 4 * 4 * 2 - 1)])
    assert reason == "bad_payload" and "63 bytes" in text and "64" in text


def test_start_validation_shapes():
    with pytest.raises(ValueError, match="frame_shape"):
        StartMessage(version=1, run_id="r", detector="pixelated", scan_shape=(2, 2), dtype="uint16",
                     calibration=make_start().calibration)
    with pytest.raises(ValueError, match="segment angles"):
        StartMessage(version=1, run_id="r", detector="segmented", scan_shape=(2, 2), n_segments=4, dtype="uint16",
                     calibration=make_start(segment_angles_mrad=((1, 0), (0, 1))).calibration)


# ---------------------------------------------------------------- live results stream
def _live_parts(arrays_spec=None, buffers=(), **header_changes):
    from livestereo.protocol.live import encode_live

    parts = encode_live("status", 1, {"x": 1})
    header = msgpack.unpackb(parts[1], raw=False)
    if arrays_spec is not None:
        header["arrays"] = arrays_spec
    header.update(header_changes)
    return [parts[0], msgpack.packb(header, use_bin_type=True), *buffers]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([b"status"], "at least 2 parts"),
        ([b"\xff\xfe", b""], "not ASCII"),
        ([b"gossip", msgpack.packb({})], "unknown topic"),
        ([b"status", b"\xc1"], "not msgpack"),
        (_live_parts(version=9), "version 9"),
        (_live_parts(topic="snapshot"), "does not match"),
        (_live_parts(pub_seq="one"), "pub_seq"),
        (_live_parts([{"name": "a", "dtype": "<f4", "shape": [2]}]), "1 array(s) but 0 buffer"),
        (_live_parts([{"name": "a", "dtype": "object", "shape": [2]}], [b""]), "not allowed"),
        (_live_parts([{"name": "a", "dtype": "<f4", "shape": [3]}], [b"\x00" * 8]), "8 bytes, expected 12"),
        (_live_parts([{"name": "a", "dtype": "<f4", "shape": [-1]}], [b""]), "negative or impossibly large"),
        # products that wrap around in int64 (2**64 -> 0) or overflow it
        (_live_parts([{"name": "a", "dtype": "<f4", "shape": [2**32, 2**32]}], [b""]), "impossibly large"),
        (_live_parts([{"name": "a", "dtype": "<f4", "shape": [2**64 - 1]}], [b""]), "impossibly large"),
        (_live_parts([{"name": "a", "dtype": "<f8", "shape": [2**25, 2**25]}], [b""]), "too large"),
        (_live_parts([{"name": "a"}], [b""]), "bad array spec"),
        (_live_parts(data=[1, 2]), "data must be a map"),
    ],
)
def test_live_stream_bad_messages_are_named(parts, message):
    from livestereo.protocol.live import LiveProtocolError, decode_live

    with pytest.raises(LiveProtocolError, match=re.escape(message)):
        decode_live(parts)
