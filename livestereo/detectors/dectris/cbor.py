"""Pure decoding (and, for simulators, encoding) of DECTRIS SIMPLON stream messages.

Stream v2 (CBOR, one ZeroMQ message each; what SIMPLON 1.8+ DCUs send on port 31001):

- ``{"type": "start", "series_id", "series_unique_id", "channels": [...],
  "image_size_x", "image_size_y", "number_of_images", "beam_center_x", "beam_center_y",
  "pixel_mask": {channel: array}, "count_time", "frame_time", ..., "user_data"}``
- ``{"type": "image", "series_id", "series_unique_id", "image_id", "start_time",
  "stop_time", "real_time", "data": {channel: array}}``
- ``{"type": "end", "series_id", "series_unique_id"}``

Arrays are tag 40 ``[[rows, cols], typed array]`` (row-major); typed arrays are tags 64
(uint8), 69 (uint16 little-endian), 70 (uint32 little-endian) and the other RFC 8746
tags; their byte string may be replaced by tag 56500 ``["bslz4", elem_size, bytes]`` or
``["lz4", 0, bytes]`` (a compressed byte string, HDF5 framing). The whole message may be
wrapped in the self-describe tag 55799.

Stream v1 (JSON multipart, older SIMPLON "stream" interface): a series header
``{"htype": "dheader-1.0", "series", "header_detail"}`` followed by a detector config part
(and, with detail "all", flatfield / pixel mask / countrate parts: a JSON header
``{"htype": "dpixelmask-1.0", "shape": [x, y], "type": "uint32"}`` then the raw array);
per image ``{"htype": "dimage-1.0", "series", "frame", "hash"}``, ``{"htype":
"dimage_d-1.0", "shape": [x, y], "type": "uint16", "encoding": "bs16-lz4<"}``, the data,
and ``{"htype": "dconfig-1.0", ...}``; then ``{"htype": "dseries_end-1.0", "series"}``.
Encodings: ``<`` (raw little-endian), ``lz4<``, ``bs16-lz4<``, ``bs32-lz4<``, ``bs8-lz4<``.

Image data stays compressed here (:class:`EncodedArray`); the source decompresses it
straight into its frame batch. No ZeroMQ in this module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from livestereo.detectors.dectris import compression
from livestereo.protocol.codec import ProtocolError

TYPED_ARRAY_TAGS = {
    64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
    72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
    80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8",
}
_TAG_OF = {"|u1": 64, "<u2": 69, "<u4": 70, "<u8": 71, "|i1": 72, "<i2": 77, "<i4": 78, "<i8": 79,
           "<f2": 84, "<f4": 85, "<f8": 86}
TAG_MULTI_DIM = 40
TAG_COMPRESSED = 56500
TAG_SELF_DESCRIBE = 55799


@dataclasses.dataclass(frozen=True, slots=True)
class Compressed:
    """Tag 56500 content: a compressed byte string."""

    algorithm: str
    elem_size: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedArray:
    """An array as it came: shape, dtype, and its (maybe compressed) bytes."""

    shape: tuple[int, ...]
    dtype: np.dtype
    data: bytes | Compressed

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def decode_into(self, out: np.ndarray) -> None:
        """Write the values into ``out`` (C-contiguous, same byte size; its dtype may
        differ in byte order only: values are converted)."""
        if out.nbytes != self.nbytes:
            raise ProtocolError("bad_array", f"array of {self.shape} {self.dtype} ({self.nbytes} bytes) does not fit "
                                f"a frame of {out.shape} {out.dtype} ({out.nbytes} bytes)")
        if isinstance(self.data, Compressed):
            if out.dtype == self.dtype or out.dtype.itemsize == 1:
                compression.decompress_into(self.data.data, self.data.algorithm, self.data.elem_size, out)
            else:
                tmp = np.empty(out.shape, dtype=self.dtype)
                compression.decompress_into(self.data.data, self.data.algorithm, self.data.elem_size, tmp)
                out[...] = tmp
            return
        if len(self.data) != self.nbytes:
            raise ProtocolError("bad_array", f"array of {self.shape} {self.dtype} needs {self.nbytes} bytes, has {len(self.data)}")
        out.reshape(-1)[...] = np.frombuffer(self.data, dtype=self.dtype)

    def decode(self) -> np.ndarray:
        """A new native-order array."""
        out = np.empty(self.shape, dtype=self.dtype.newbyteorder("="))
        if isinstance(self.data, Compressed):
            raw = np.empty(self.shape, dtype=self.dtype)
            compression.decompress_into(self.data.data, self.data.algorithm, self.data.elem_size, raw)
            out[...] = raw
            return out
        self.decode_into(out)
        return out


def _tag_hook(*args):
    # cbor2 < 6 calls tag_hook(decoder, tag), cbor2 6 calls tag_hook(tag, immutable)
    tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
    t = tag.tag
    if t == TAG_COMPRESSED:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and isinstance(v[0], str) and isinstance(v[1], int)
                and isinstance(v[2], (bytes, bytearray))):
            raise ProtocolError("bad_cbor", f"tag 56500 content should be [algorithm, elem_size, bytes], got {type(v).__name__}")
        if v[0] not in ("bslz4", "lz4"):
            raise ProtocolError("bad_compression", f"unknown compression {v[0]!r} (expected bslz4 or lz4)")
        return Compressed(v[0], int(v[1]), bytes(v[2]))
    if t in TYPED_ARRAY_TAGS:
        v = tag.value
        if not isinstance(v, (bytes, bytearray, Compressed)):
            raise ProtocolError("bad_cbor", f"typed array tag {t} holds a {type(v).__name__}, not a byte string")
        return EncodedArray((-1,), np.dtype(TYPED_ARRAY_TAGS[t]), v if isinstance(v, Compressed) else bytes(v))
    if t == TAG_MULTI_DIM:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], (list, tuple))):
            raise ProtocolError("bad_cbor", "tag 40 content should be [dimensions, array]")
        dims = tuple(int(d) for d in v[0])
        arr = v[1]
        if isinstance(arr, EncodedArray):
            return EncodedArray(dims, arr.dtype, arr.data)
        if isinstance(arr, (list, tuple)):
            return np.asarray(arr).reshape(dims)
        raise ProtocolError("bad_cbor", f"tag 40 holds a {type(arr).__name__}, not a typed array")
    if t == TAG_SELF_DESCRIBE:
        return tag.value
    raise ProtocolError("unknown_cbor_tag", f"CBOR tag {t} is not one livestereo understands (40, 64-86, 56500)")


def decode_v2(buf) -> dict[str, Any]:
    """One stream v2 message as a dict (arrays as EncodedArray). ProtocolError if it is
    not CBOR, not a map with a 'type', or holds an unknown tag."""
    try:
        msg = cbor2.loads(bytes(buf), tag_hook=_tag_hook)
    except ProtocolError:
        raise
    except Exception as exc:
        cause = exc.__cause__
        while cause is not None:
            if isinstance(cause, ProtocolError):
                raise cause from None
            cause = cause.__cause__
        raise ProtocolError("not_cbor", f"message of {len(buf)} bytes is not valid CBOR ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, Mapping) or "type" not in msg:
        raise ProtocolError("bad_message", f"stream v2 message is a {type(msg).__name__} without a 'type'")
    return _thaw(msg)


def _thaw(obj):
    """Plain dicts / lists (cbor2 6 gives immutable ones inside tags)."""
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_thaw(v) for v in obj]
    return obj


def looks_like_cbor(buf) -> bool:
    """A stream v2 (CBOR) message rather than a v1 JSON part."""
    b = bytes(buf[:3])
    return b[:3] == b"\xd9\xd9\xf7" or (len(b) > 0 and 0xA0 <= b[0] <= 0xBF)


# ------------------------------------------------------------------------- v2 encoding


def encode_array(arr: np.ndarray, compression_name: str | None = "bslz4") -> cbor2.CBORTag:
    """Tag 40 for a 2D array, its bytes compressed with bslz4 / lz4 or raw."""
    arr = np.ascontiguousarray(arr)
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    tag = _TAG_OF[arr.dtype.str]
    if compression_name == "bslz4":
        payload = cbor2.CBORTag(TAG_COMPRESSED, ["bslz4", arr.dtype.itemsize, compression.compress_bslz4(arr)])
    elif compression_name == "lz4":
        payload = cbor2.CBORTag(TAG_COMPRESSED, ["lz4", 0, compression.compress_h5lz4(arr)])
    else:
        payload = arr.tobytes()
    return cbor2.CBORTag(TAG_MULTI_DIM, [list(arr.shape), cbor2.CBORTag(tag, payload)])


def encode_v2(msg: dict) -> bytes:
    """A stream v2 message (self-describe tagged, like the DCU's)."""
    return cbor2.dumps(cbor2.CBORTag(TAG_SELF_DESCRIBE, msg))


# ------------------------------------------------------------------------- v1 decoding


_V1_ENCODINGS = {"<": (None, 0), "lz4<": ("lz4raw", 0), "bs8-lz4<": ("bslz4", 1), "bs16-lz4<": ("bslz4", 2),
                 "bs32-lz4<": ("bslz4", 4)}


def decode_json_part(buf) -> dict:
    try:
        obj = json.loads(bytes(buf))
    except Exception as exc:
        raise ProtocolError("bad_json", f"stream v1 part of {len(buf)} bytes is not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"stream v1 part is a JSON {type(obj).__name__}, not an object")
    return obj


def v1_array(header: dict, blob) -> EncodedArray:
    """The array of a v1 ``dimage_d-1.0`` (or pixel mask / flatfield) header and its data
    part. v1 shapes are [x, y]; the array is (y, x)."""
    try:
        x, y = (int(s) for s in header["shape"])
        dtype = np.dtype(header.get("type", "uint16")).newbyteorder("<")
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("bad_message", f"stream v1 array header {header!r:.120} is unusable ({exc})") from None
    enc = header.get("encoding", "<")
    if enc not in _V1_ENCODINGS:
        raise ProtocolError("bad_compression", f"unknown stream v1 encoding {enc!r} (expected one of {', '.join(_V1_ENCODINGS)})")
    algo, es = _V1_ENCODINGS[enc]
    data = bytes(blob)
    nbytes = x * y * dtype.itemsize
    if algo is None:
        return EncodedArray((y, x), dtype, data)
    if algo == "lz4raw":
        if len(data) >= 12 and int.from_bytes(data[:8], "big") == nbytes:
            return EncodedArray((y, x), dtype, Compressed("lz4", 0, data))
        return EncodedArray((y, x), dtype, compression.lz4_block_decompress(data, nbytes).tobytes())
    if len(data) >= 12 and int.from_bytes(data[:8], "big") == nbytes:
        return EncodedArray((y, x), dtype, Compressed("bslz4", es, data))
    # no HDF5 framing: bitshuffle's default block of 8192 bytes
    block = (8192 // es) // 8 * 8 * es
    framed = nbytes.to_bytes(8, "big") + block.to_bytes(4, "big") + data
    return EncodedArray((y, x), dtype, Compressed("bslz4", es, framed))


def encode_v1_image(series: int, frame: int, arr: np.ndarray, encoding: str = "bs16-lz4<") -> list[bytes]:
    """The four parts of a stream v1 image."""
    arr = np.ascontiguousarray(arr)
    if encoding == "<":
        blob = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    elif encoding.startswith("bs"):
        blob = compression.compress_bslz4(arr)
    elif encoding == "lz4<":
        blob = compression.compress_h5lz4(arr)
    else:
        raise ValueError(f"unknown encoding {encoding}")
    return [
        json.dumps({"htype": "dimage-1.0", "series": series, "frame": frame, "hash": ""}).encode(),
        json.dumps({"htype": "dimage_d-1.0", "shape": [arr.shape[1], arr.shape[0]], "type": arr.dtype.name,
                    "encoding": encoding, "size": len(blob)}).encode(),
        blob,
        json.dumps({"htype": "dconfig-1.0", "start_time": 0, "stop_time": 0, "real_time": 0}).encode(),
    ]
