"""Pure decoding of Quantum Detectors Merlin (Medipix3) data: MPX framing, acquisition
headers, MQ1 frame headers and pixel data (no sockets, no zmq).

Formats (as written to .mib files and sent on the Merlin data port, TCP 6342):

- MPX framing (TCP only): ``MPX,<10 decimal digits>,`` then ``length - 1`` bytes. The length
  counts the comma after the digits plus the message. The first message of an acquisition
  is the acquisition header (``HDR,`` + ``Key:<TAB>value`` lines + ``End``), then one message
  per frame.
- A frame: an ASCII header ``MQ1,<seq 6>,<header bytes 5>,<chips 2>,<x 4>,<y 4>,<type>,
  <layout>,<chip select hex>,<time stamp>,<shutter s>,<counter>,<colour mode>,<gain>,
  <8 thresholds>,<per chip: 3RX + 27 DACs>,MQ1A,<ISO time>,<shutter ns>,<counter depth>,``
  padded with NUL bytes to ``header bytes`` (384 single chip, 768 quad), then the pixels.
  Older firmware writes no ``MQ1A`` extension (the counter depth then comes from the
  acquisition header or the pixel type).
- Pixel types ``U08``/``U16``/``U32``: big-endian unsigned (x, y) = (cols, rows) images, the
  chips already assembled (a 2x2 quad is 512x512).
- Pixel type ``R64`` (RAW): what the chips read out. The data is a sequence of 64-bit words
  whose bytes are in reversed order; after reversing each word, the pixels are packed
  little-endian: 1 bit per pixel (counter depth 1, LSB first), 8 bits (depth 6), 16 bits
  (depth 12), and depth 24 as two 12-bit images back to back (high 12 bits first). Every
  row holds the rows of all chips side by side (x = 256 * chips); a 2x2 quad puts chip
  3 top-left, chip 2 top-right, and chips 1 and 0 rotated by 180 degrees bottom-left and
  bottom-right.

Frames come out as (rows, cols) = (y, x) arrays in the detector's readout orientation
(no flip), little-endian ``uint8`` / ``uint16`` / ``uint32``. Verified against real Merlin
recordings (single and quad, depths 1/6/12/24, RAW 1-bit single and quad, ROI frames).
"""

from __future__ import annotations

import dataclasses
import re

import numba
import numpy as np

from livestereo.protocol.codec import ProtocolError

MPX_PREFIX_LEN = 15
"""``MPX,`` + 10 digits + ``,``."""

CHIP_PX = 256
"""Medipix3 chips are 256 x 256 pixels."""

_MPX_RE = re.compile(rb"MPX,(\d{10}),")
_U_TYPES = {"U01": 1, "U08": 1, "U16": 2, "U32": 4, "U64": 8}
_DEPTH_OF_U = {"U08": 6, "U16": 12, "U32": 24}
_OUT_DTYPE_OF_DEPTH = {1: "uint8", 6: "uint8", 12: "uint16", 24: "uint32"}
MAX_HEADER_BYTES = 8192
"""No frame header is longer than this (a 2x2 quad's is 768 bytes)."""
MAX_FRAME_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True, slots=True)
class FrameHeader:
    """The decoded MQ1 header of one frame."""

    seq: int
    """Frame number in the acquisition, from 1."""
    header_nbytes: int
    n_chips: int
    x: int
    """Columns declared by the header (RAW: the chips' rows side by side)."""
    y: int
    """Rows declared by the header."""
    pixel_type: str
    """U08 / U16 / U32 / R64."""
    layout: str
    """Chip layout: 1x1, 2x2, Nx1 ..."""
    depth: int
    """Counter depth (1, 6, 12, 24)."""
    fields: tuple[str, ...]
    """All comma separated fields, for metadata."""

    @property
    def raw(self) -> bool:
        return self.pixel_type == "R64"

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(rows, cols) of the decoded frame."""
        if not self.raw:
            return (self.y, self.x)
        if self.layout == "2x2":
            return (2 * self.y, 2 * CHIP_PX)
        return (self.y, CHIP_PX * self.n_chips)

    @property
    def dtype(self) -> str:
        """Little-endian numpy dtype name of the decoded frame."""
        if self.raw:
            return _OUT_DTYPE_OF_DEPTH[self.depth]
        return {"U08": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "U01": "uint8"}[self.pixel_type]

    @property
    def payload_nbytes(self) -> int:
        """Bytes of pixel data after the header."""
        if not self.raw:
            return self.x * self.y * _U_TYPES[self.pixel_type]
        npx = self.y * CHIP_PX * self.n_chips
        return {1: npx // 8, 6: npx, 12: 2 * npx, 24: 4 * npx}[self.depth]

    @property
    def frame_nbytes(self) -> int:
        """Header plus pixel data: one frame of a .mib file."""
        return self.header_nbytes + self.payload_nbytes

    def layout_key(self) -> tuple:
        """Frames of one acquisition must agree on this."""
        return (self.header_nbytes, self.n_chips, self.x, self.y, self.pixel_type, self.layout, self.depth)

    def metadata(self) -> dict:
        """The header fields worth keeping in a start message."""
        f = self.fields
        md = {
            "merlin_pixel_type": self.pixel_type,
            "merlin_layout": self.layout,
            "merlin_chips": self.n_chips,
            "merlin_counter_depth": self.depth,
            "merlin_header_bytes": self.header_nbytes,
        }
        try:
            md["merlin_chip_select"] = f[8]
            md["merlin_time"] = f[9]
            md["merlin_shutter_s"] = float(f[10])
            md["merlin_counter"] = int(f[11])
            md["merlin_colour_mode"] = int(f[12])
            md["merlin_gain_mode"] = int(f[13])
            md["merlin_thresholds_kev"] = [float(v) for v in f[14:22]]
        except (IndexError, ValueError):
            pass
        return md


def parse_mpx_prefix(buf, offset: int = 0) -> int:
    """Length field of an ``MPX,<10 digits>,`` prefix at ``offset``: the bytes that follow
    the prefix are ``length - 1``. ProtocolError('bad_mpx_prefix') if it is not one."""
    chunk = bytes(buf[offset:offset + MPX_PREFIX_LEN])
    if len(chunk) < MPX_PREFIX_LEN:
        raise ProtocolError("truncated", f"MPX prefix cut after {len(chunk)} bytes at offset {offset}")
    m = _MPX_RE.fullmatch(chunk)
    if m is None:
        raise ProtocolError("bad_mpx_prefix", f"expected 'MPX,<10 digits>,' at offset {offset}, got {chunk!r}")
    length = int(m.group(1))
    if length < 1 or length > MAX_FRAME_BYTES:
        raise ProtocolError("bad_mpx_prefix", f"MPX length {length} at offset {offset} is out of range")
    return length


def find_mpx(buf, start: int = 0) -> int:
    """Offset of the next plausible ``MPX,<10 digits>,`` prefix at or after ``start``, or -1."""
    mv = bytes(buf) if not isinstance(buf, (bytes, bytearray)) else buf
    m = _MPX_RE.search(mv, start)
    return -1 if m is None else m.start()


def mpx_prefix(payload_nbytes: int) -> bytes:
    """The ``MPX,<length>,`` prefix of a message of ``payload_nbytes`` bytes."""
    return b"MPX,%010d," % (payload_nbytes + 1)


def parse_frame_header(buf, offset: int = 0, depth_hint: int | None = None) -> FrameHeader:
    """Decode the MQ1 header at ``offset``. ``depth_hint`` (from the acquisition header) is
    used when the header has no MQ1A extension. Raises ProtocolError naming what is wrong."""
    head = bytes(buf[offset:offset + 64])
    if not head.startswith(b"MQ1,"):
        raise ProtocolError("bad_frame_header", f"expected 'MQ1,' at offset {offset}, got {head[:16]!r}")
    parts0 = head.split(b",")
    try:
        header_nbytes = int(parts0[2])
    except (IndexError, ValueError):
        raise ProtocolError("bad_frame_header", f"MQ1 header at offset {offset} has no header size: {head[:40]!r}") from None
    if not 64 <= header_nbytes <= MAX_HEADER_BYTES:
        raise ProtocolError("bad_frame_header", f"MQ1 header at offset {offset} declares {header_nbytes} header bytes")
    raw = bytes(buf[offset:offset + header_nbytes])
    if len(raw) < header_nbytes:
        raise ProtocolError("truncated", f"MQ1 header at offset {offset} cut after {len(raw)} of {header_nbytes} bytes")
    text = raw.split(b"\0", 1)[0].decode("ascii", errors="replace")
    fields = tuple(p.strip() for p in text.split(","))
    try:
        seq = int(fields[1])
        n_chips = int(fields[3])
        x = int(fields[4])
        y = int(fields[5])
        pixel_type = fields[6].upper()
        layout = fields[7].strip()
    except (IndexError, ValueError):
        raise ProtocolError("bad_frame_header", f"MQ1 header at offset {offset} is malformed: {text[:80]!r}") from None
    if pixel_type not in _U_TYPES and pixel_type != "R64":
        raise ProtocolError("unknown_pixel_type", f"MQ1 header at offset {offset}: unknown pixel type {pixel_type!r} (expected U08, U16, U32 or R64)")
    if not (1 <= x <= 65536 and 1 <= y <= 65536 and 1 <= n_chips <= 64):
        raise ProtocolError("bad_frame_header", f"MQ1 header at offset {offset}: implausible size x={x} y={y} chips={n_chips}")
    depth = None
    if "MQ1A" in fields:
        i = fields.index("MQ1A")
        try:
            depth = int(fields[i + 3])
        except (IndexError, ValueError):
            depth = None
    if depth is None:
        depth = depth_hint if pixel_type == "R64" else _DEPTH_OF_U.get(pixel_type, depth_hint)
    if pixel_type == "R64":
        if depth not in (1, 6, 12, 24):
            raise ProtocolError("bad_frame_header", f"RAW frame at offset {offset} with unknown counter depth {depth!r}")
        if layout == "2x2" and n_chips != 4:
            raise ProtocolError("bad_frame_header", f"RAW 2x2 frame at offset {offset} declares {n_chips} chips")
    return FrameHeader(seq, header_nbytes, n_chips, x, y, pixel_type, layout, int(depth or 0), fields)


def parse_acquisition_header(text: bytes | str) -> dict[str, str]:
    """``HDR,`` block (a .hdr file or the first MPX message) as {key: value}; keys lose
    their trailing colon, e.g. 'Counter Depth (number)' -> '12'."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).split(b"\0", 1)[0].decode("latin1")
    if not text.startswith("HDR,"):
        raise ProtocolError("bad_acquisition_header", f"acquisition header should start with 'HDR,', got {text[:20]!r}")
    out: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if line.startswith("End"):
            break
        if "\t" not in line:
            continue
        key, value = line.split("\t", 1)
        out[key.strip().rstrip(":").strip()] = value.strip()
    return out


def acquisition_info(hdr: dict[str, str]) -> dict:
    """What livestereo uses from an acquisition header: counter depth, number of frames,
    frames per trigger, scan (ScanX, ScanY) when the firmware writes them."""
    info: dict = {}

    def _int(key):
        try:
            return int(str(hdr[key]).split()[0])
        except (KeyError, ValueError, IndexError):
            return None

    info["depth"] = _int("Counter Depth (number)")
    info["n_frames"] = _int("Frames in Acquisition (Number)")
    info["frames_per_trigger"] = _int("Frames per Trigger (Number)")
    sx, sy = _int("ScanX"), _int("ScanY")
    info["scan_shape"] = (sy, sx) if sx and sy else None
    return info


def guess_scan_shape(info: dict, n_frames: int | None = None) -> tuple[int, int] | None:
    """(ny, nx) from ScanX/ScanY, else from frames per trigger (a line trigger) and the
    number of frames, else None."""
    if info.get("scan_shape"):
        return tuple(info["scan_shape"])
    n = info.get("n_frames") or n_frames
    fpt = info.get("frames_per_trigger")
    if n and fpt and fpt > 1 and n % fpt == 0:
        return (n // fpt, fpt)
    return None


# ---------------------------------------------------------------------------------------
# pixel data


def decode_payloads(buf, offset: int, stride: int, count: int, header: FrameHeader,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Decode ``count`` frames whose pixel data start at ``offset`` in ``buf`` and are
    ``stride`` bytes apart (stride = MPX prefix + header + payload on the wire, header +
    payload in a file). Returns a new C-contiguous (count, rows, cols) little-endian array:
    one pass of a numba byte-swap kernel (or a copy for U08) for U types; a per-word byte
    reversal plus unpacking for RAW. ``out``: a C-contiguous (count, rows, cols) array of the frame dtype to fill
    instead."""
    nbytes = header.payload_nbytes
    mv = memoryview(buf).cast("B") if not isinstance(buf, np.ndarray) else buf
    need = offset + (count - 1) * stride + nbytes
    if len(mv) < need:
        raise ProtocolError("truncated", f"{count} frames need {need} bytes from offset 0, have {len(mv)}")
    rows, cols = header.frame_shape
    if not header.raw:
        itemsize = _U_TYPES[header.pixel_type]
        npx = header.x * header.y
        native = np.dtype(f"<u{itemsize}") if itemsize > 1 else np.dtype(np.uint8)
        if out is None:
            out = np.empty((count, header.y, header.x), dtype=native.newbyteorder("="))
        flat = out.reshape(count, npx)
        if itemsize == 1:
            src = np.ndarray((count, npx), dtype=native, buffer=mv, offset=offset, strides=(stride, itemsize))
            np.copyto(flat, src)
        else:
            # the bytes as one flat uint8 array: the kernel's inner loop then runs over
            # contiguous memory and vectorises (a strided, unaligned uint16 view does not)
            raw = np.frombuffer(mv, dtype=np.uint8) if not isinstance(mv, np.ndarray) else mv.reshape(-1).view(np.uint8)
            (_swap16 if itemsize == 2 else _swap32)(raw, offset, stride, flat)
        return out
    # RAW: gather the payloads, reverse the bytes of each 64-bit word
    src = np.ndarray((count, nbytes), dtype=np.uint8, buffer=mv, offset=offset, strides=(stride, 1))
    if nbytes % 8:
        raise ProtocolError("bad_frame_header", f"RAW payload of {nbytes} bytes is not a whole number of 64-bit words")
    words = np.ascontiguousarray(src).view(">u8").astype("<u8")  # byte reversal per word
    b = words.view(np.uint8).reshape(count, -1)
    raw_rows = header.y
    raw_cols = CHIP_PX * header.n_chips
    if header.depth == 1:
        img = np.unpackbits(b, axis=1, bitorder="little").reshape(count, raw_rows, raw_cols)
    elif header.depth == 6:
        img = b.reshape(count, raw_rows, raw_cols)
    elif header.depth == 12:
        img = b.view("<u2").reshape(count, raw_rows, raw_cols)
    else:  # 24: high 12 bits image, then low 12 bits image
        halves = b.view("<u2").reshape(count, 2, raw_rows, raw_cols)
        img = (halves[:, 0].astype(np.uint32) << 12) | halves[:, 1]
    res = _assemble_raw(img, header)
    if out is not None:
        out[...] = res
        return out
    return res


@numba.njit(nogil=True, cache=True)
def scan_frame_messages(raw, lo, stride, k, prefix, fixed, seqs):
    """How many of the ``k`` frame messages at raw[lo], raw[lo + stride], ... look like
    the first one and follow on from it: the MPX prefix ``prefix`` (bytes 0-14, which hold
    the length), ``MQ1,``, six digits of sequence number, then the header fields ``fixed``
    (bytes 25 to 25 + len(fixed)), with consecutive sequence numbers. Writes the sequence
    numbers into seqs[:n] and returns n (0: the first differs). raw: flat uint8 bytes."""
    n_fixed = fixed.shape[0]
    for i in range(k):
        b = lo + i * stride
        for j in range(15):
            if raw[b + j] != prefix[j]:
                return i
        if raw[b + 15] != 77 or raw[b + 16] != 81 or raw[b + 17] != 49 or raw[b + 18] != 44:  # "MQ1,"
            return i
        seq = 0
        for j in range(19, 25):
            c = raw[b + j]
            if c < 48 or c > 57:
                return i
            seq = seq * 10 + (c - 48)
        if i > 0 and seq != seqs[i - 1] + 1:
            return i
        for j in range(n_fixed):
            if raw[b + 25 + j] != fixed[j]:
                return i
        seqs[i] = seq
    return k


@numba.njit(nogil=True, cache=True)
def _swap16(raw, offset, stride, out):
    """out[i, p] = the big-endian uint16 at raw[offset + i * stride + 2 p] (raw: flat uint8)."""
    npx = out.shape[1]
    for i in range(out.shape[0]):
        b = offset + i * stride
        s = raw[b:b + 2 * npx]
        o = out[i]
        for p in range(npx):
            o[p] = (np.uint16(s[2 * p]) << np.uint16(8)) | np.uint16(s[2 * p + 1])


@numba.njit(nogil=True, cache=True)
def _swap32(raw, offset, stride, out):
    """out[i, p] = the big-endian uint32 at raw[offset + i * stride + 4 p] (raw: flat uint8)."""
    npx = out.shape[1]
    for i in range(out.shape[0]):
        b = offset + i * stride
        s = raw[b:b + 4 * npx]
        o = out[i]
        for p in range(npx):
            q = 4 * p
            o[p] = ((np.uint32(s[q]) << np.uint32(24)) | (np.uint32(s[q + 1]) << np.uint32(16))
                    | (np.uint32(s[q + 2]) << np.uint32(8)) | np.uint32(s[q + 3]))


def _assemble_raw(img: np.ndarray, header: FrameHeader) -> np.ndarray:
    """Place the chips of a RAW image (count, rows, chips*256) where they sit."""
    if header.layout != "2x2":
        return np.ascontiguousarray(img)
    count, rows, _ = img.shape
    c = CHIP_PX
    out = np.empty((count, 2 * rows, 2 * c), dtype=img.dtype)
    out[:, :rows, :c] = img[:, :, 3 * c:4 * c]
    out[:, :rows, c:] = img[:, :, 2 * c:3 * c]
    out[:, rows:, :c] = img[:, ::-1, 2 * c - 1:c - 1:-1]
    out[:, rows:, c:] = img[:, ::-1, c - 1::-1]
    return out


def encode_payload(frame: np.ndarray, pixel_type: str) -> bytes:
    """Pixel data of one (rows, cols) frame as a Merlin writes it (U08/U16/U32 only)."""
    itemsize = _U_TYPES[pixel_type]
    return np.ascontiguousarray(frame, dtype=np.dtype(f">u{itemsize}")).tobytes()


def make_frame_header(seq: int, shape: tuple[int, int], pixel_type: str = "U16", *, depth: int | None = None,
                      n_chips: int = 1, layout: str = "1x1", shutter_s: float = 0.001, timestamp: str = "2026-01-01 00:00:00.000000") -> bytes:
    """An MQ1 header (NUL padded to 384 bytes, 768 for 4 chips) like the ones a Merlin writes."""
    rows, cols = shape
    header_nbytes = 768 if n_chips >= 4 else 384
    if depth is None:
        depth = _DEPTH_OF_U.get(pixel_type, 12)
    dacs = "3RX," + ",".join(["000"] * 27)
    fields = [
        "MQ1", f"{seq:06d}", f"{header_nbytes:05d}", f"{n_chips:02d}", f"{cols:04d}", f"{rows:04d}", pixel_type,
        f"{layout:>6}", f"{(1 << n_chips) - 1:02X}", timestamp, f"{shutter_s:.6f}", "0", "0", "0",
        *(["0.000000E+0"] * 8), *([dacs] * n_chips),
        "MQ1A", "2026-01-01T00:00:00.000000000Z", f"{int(round(shutter_s * 1e9))}ns", str(depth),
    ]
    text = (",".join(fields) + ",").encode("ascii")
    if len(text) > header_nbytes:
        raise ValueError(f"MQ1 header of {len(text)} bytes does not fit {header_nbytes}")
    return text + b"\0" * (header_nbytes - len(text))


def make_acquisition_header(n_frames: int, *, frames_per_trigger: int = 1, depth: int = 12,
                            scan_shape: tuple[int, int] | None = None, layout: str = "1x1") -> bytes:
    """An ``HDR,`` acquisition header (2048 bytes like a .hdr file)."""
    lines = [
        "HDR,\t",
        "Time and Date Stamp (day, mnth, yr, hr, min, s):\t01/01/2026 00:00:00",
        f"Assembly Size (NX1, 2X2):\t   {layout}",
        "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM",
        f"Counter Depth (number):\t{depth}",
        f"Frames in Acquisition (Number):\t{n_frames}",
        f"Frames per Trigger (Number):\t{frames_per_trigger}",
        "Readout System:\tlivestereo simulator",
    ]
    if scan_shape is not None:
        lines += [f"ScanX:\t{scan_shape[1]}", f"ScanY:\t{scan_shape[0]}"]
    lines.append("End\t")
    text = ("\r\n".join(lines)).encode("latin1")
    return text + b" " * max(0, 2048 - len(text))
