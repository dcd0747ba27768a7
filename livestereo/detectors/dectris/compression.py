"""Bitshuffle-LZ4 and LZ4 with HDF5 framing (what DECTRIS detectors send), in numba.

Decoding uses the ``bitshuffle`` package's C decoder (SIMD bit transposition and the LZ4 C
library: ~5x the numba path) once a numba pass has checked that every block the framing
declares lies inside the buffer (bitshuffle trusts the sizes it reads). Without it: the
``lz4`` package per block and a numba transposition, or, with neither, an LZ4 block
decoder and the transposition in numba alone (a few dozen lines each, without the GIL,
straight into the caller's buffer).

Framing (the bitshuffle HDF5 filter, DECTRIS "bslz4"; the HDF5 LZ4 filter, "lz4"):
8-byte big-endian uncompressed size, 4-byte big-endian block size in bytes, then per
block a 4-byte big-endian compressed size and an LZ4 block. bslz4 blocks hold
bitshuffled elements; a last partial block is rounded down to a multiple of 8 elements
and the 0-7 elements left over are stored uncompressed at the end. In "lz4" framing a
block whose compressed size equals its size is stored raw.

Encoding (for simulators) uses the ``bitshuffle`` / ``lz4`` packages when installed and
otherwise a literal-only LZ4 block (valid, not smaller).
"""

from __future__ import annotations

import numba
import numpy as np

from livestereo.protocol.codec import ProtocolError

DEFAULT_BLOCK_BYTES = 8192


@numba.njit(nogil=True, cache=True, inline="always")
def _lz4_extend(src, si, s1, n):
    """LZ4 length extension: while the nibble is 15, add bytes until one is not 255.
    Returns (length, next index), or (-1, si) if the input ends first."""
    n = np.int64(n)
    if n == 15:
        while True:
            if si >= s1:
                return np.int64(-1), si
            b = np.int64(src[si])
            si += 1
            n += b
            if b != 255:
                break
    return n, si


@numba.njit(nogil=True, cache=True)
def _lz4_block(src, s0, s1, dst, d0, d1):
    """Decode the LZ4 block src[s0:s1] into dst[d0:d1]. Returns bytes written, or a
    negative code: -1 input overrun, -2 output overrun, -3 bad offset."""
    si = s0
    di = d0
    while si < s1:
        token = src[si]
        si += 1
        lit, si = _lz4_extend(src, si, s1, token >> 4)
        if lit < 0:
            return -1
        if si + lit > s1:
            return -1
        if di + lit > d1:
            return -2
        for i in range(lit):
            dst[di + i] = src[si + i]
        si += lit
        di += lit
        if si >= s1:
            break  # last sequence: literals only
        if si + 2 > s1:
            return -1
        off = src[si] | (src[si + 1] << 8)
        si += 2
        if off == 0 or off > di - d0:
            return -3
        ml, si = _lz4_extend(src, si, s1, token & 15)
        if ml < 0:
            return -1
        ml += 4
        if di + ml > d1:
            return -2
        m = di - off
        for i in range(ml):  # byte by byte: overlapping copies repeat the pattern
            dst[di + i] = dst[m + i]
        di += ml
    return di - d0


@numba.njit(nogil=True, cache=True, inline="always")
def _transpose8(x):
    """Transpose the 8x8 bit matrix in x (byte k = row k, bit t = column t)."""
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    x = x ^ t ^ (t << np.uint64(28))
    return x


@numba.njit(nogil=True, cache=True)
def _bitunshuffle(src, s0, n, es, dst, d0):
    """src[s0:s0+n*es] holds n elements of es bytes bitshuffled (n % 8 == 0): bit k of
    byte j of element i sits at row r = j*8+k, position i (rows of n/8 bytes, LSB first).
    Writes the n elements to dst[d0:d0+n*es]."""
    nb = n // 8
    for j in range(es):
        base = s0 + j * 8 * nb
        for g in range(nb):
            x = np.uint64(0)
            for k in range(8):
                x |= np.uint64(src[base + k * nb + g]) << np.uint64(8 * k)
            x = _transpose8(x)
            o = d0 + g * 8 * es + j
            for t in range(8):
                dst[o + t * es] = np.uint8((x >> np.uint64(8 * t)) & np.uint64(255))


_U = np.uint64


@numba.njit(nogil=True, cache=True, inline="always")
def _swap_lanes(w, a, b, sh, m):
    t = ((w[a] >> _U(sh)) ^ w[b]) & _U(m)
    w[a] ^= t << _U(sh)
    w[b] ^= t


@numba.njit(nogil=True, cache=True, inline="always")
def _spread2(x):
    """Bytes 0-3 of x to bytes 0, 2, 4, 6."""
    x = x & _U(0xFFFFFFFF)
    x = (x | (x << _U(16))) & _U(0x0000FFFF0000FFFF)
    return (x | (x << _U(8))) & _U(0x00FF00FF00FF00FF)


@numba.njit(nogil=True, cache=True)
def _bitunshuffle_words(src64, n, es, dst64, ys):
    """_bitunshuffle for es 1 or 2 and n % 64 == 0, 64 elements at a time on 64-bit words
    (an 8x8 byte transpose of eight row words, then one 8x8 bit transpose per group):
    about twice as fast. src64 / dst64: the block's bytes as aligned uint64 words."""
    nbw = n // 64  # words per bit row
    w = np.empty(8, np.uint64)
    for gw in range(nbw):
        for j in range(es):
            for k in range(8):
                w[k] = src64[(j * 8 + k) * nbw + gw]
            _swap_lanes(w, 0, 1, 8, 0x00FF00FF00FF00FF)
            _swap_lanes(w, 2, 3, 8, 0x00FF00FF00FF00FF)
            _swap_lanes(w, 4, 5, 8, 0x00FF00FF00FF00FF)
            _swap_lanes(w, 6, 7, 8, 0x00FF00FF00FF00FF)
            _swap_lanes(w, 0, 2, 16, 0x0000FFFF0000FFFF)
            _swap_lanes(w, 1, 3, 16, 0x0000FFFF0000FFFF)
            _swap_lanes(w, 4, 6, 16, 0x0000FFFF0000FFFF)
            _swap_lanes(w, 5, 7, 16, 0x0000FFFF0000FFFF)
            _swap_lanes(w, 0, 4, 32, 0x00000000FFFFFFFF)
            _swap_lanes(w, 1, 5, 32, 0x00000000FFFFFFFF)
            _swap_lanes(w, 2, 6, 32, 0x00000000FFFFFFFF)
            _swap_lanes(w, 3, 7, 32, 0x00000000FFFFFFFF)
            for b in range(8):
                ys[j, b] = _transpose8(w[b])
        for b in range(8):
            g = gw * 8 + b
            if es == 1:
                dst64[g] = ys[0, b]
            else:
                y0 = ys[0, b]
                y1 = ys[1, b]
                dst64[2 * g] = _spread2(y0) | (_spread2(y1) << _U(8))
                dst64[2 * g + 1] = _spread2(y0 >> _U(32)) | (_spread2(y1 >> _U(32)) << _U(8))


@numba.njit(nogil=True, cache=True)
def _bitshuffle(src, s0, n, es, dst, d0):
    """Inverse of _bitunshuffle (n % 8 == 0)."""
    nb = n // 8
    for j in range(es):
        for g in range(nb):
            for k in range(8):
                v = 0
                for t in range(8):
                    v |= ((src[s0 + (g * 8 + t) * es + j] >> k) & 1) << t
                dst[d0 + (j * 8 + k) * nb + g] = v


@numba.njit(nogil=True, cache=True)
def _be32(src, i):
    return (np.int64(src[i]) << 24) | (np.int64(src[i + 1]) << 16) | (np.int64(src[i + 2]) << 8) | np.int64(src[i + 3])


@numba.njit(nogil=True, cache=True)
def _be64(src, i):
    return (_be32(src, i) << 32) | _be32(src, i + 4)


@numba.njit(nogil=True, cache=True)
def _check_bslz4_framing(src, es, total):
    """0 when the HDF5-framed bslz4 ``src`` declares ``total`` bytes and each of its blocks
    (and the uncompressed tail) lies inside it; else the negative error of _decode_bslz4.
    Nothing is decoded: this walks the 4-byte block headers only."""
    if src.size < 12:
        return -6
    if _be64(src, 0) != total:
        return -5
    block = _be32(src, 8)
    if block <= 0 or block % es != 0 or (block // es) % 8 != 0:
        return -4
    n_elem = total // es
    block_elems = block // es
    si = 12
    done = 0
    while n_elem - done >= 8:
        be = min(block_elems, n_elem - done)
        be -= be % 8
        if si + 4 > src.size:
            return -6
        c = _be32(src, si)
        si += 4
        if c < 0 or si + c > src.size:
            return -6
        si += c
        done += be
    if si + (n_elem - done) * es > src.size:
        return -6
    return 0


@numba.njit(nogil=True, cache=True)
def _decode_bslz4(src, es, dst, scratch):
    """HDF5-framed bitshuffle-LZ4 src -> dst (exactly len(dst) bytes). Returns 0 or a
    negative error: -1..-3 from LZ4, -4 bad header, -5 size mismatch, -6 truncated."""
    r = _check_bslz4_framing(src, es, dst.size)
    if r != 0:
        return r
    n_elem = dst.size // es
    block_elems = _be32(src, 8) // es
    si = 12
    di = 0
    done = 0
    while n_elem - done >= 8:  # every block lies inside src (checked above)
        be = min(block_elems, n_elem - done)
        be -= be % 8
        nbytes = be * es
        c = _be32(src, si)
        si += 4
        r = _lz4_block(src, si, si + c, scratch, 0, nbytes)
        if r < 0:
            return r
        if r != nbytes:
            return -5
        _bitunshuffle(scratch, 0, be, es, dst, di)
        si += c
        di += nbytes
        done += be
    for i in range((n_elem - done) * es):
        dst[di + i] = src[si + i]
    return 0


@numba.njit(nogil=True, cache=True)
def _decode_h5lz4(src, dst):
    """HDF5-framed LZ4 src -> dst. Returns 0 or a negative error code."""
    if src.size < 12:
        return -6
    total = _be64(src, 0)
    block = _be32(src, 8)
    if total != dst.size:
        return -5
    if block <= 0:
        return -4
    si = 12
    di = 0
    while di < total:
        nbytes = min(block, total - di)
        if si + 4 > src.size:
            return -6
        c = _be32(src, si)
        si += 4
        if c < 0 or si + c > src.size:
            return -6
        if c == nbytes:
            for i in range(c):
                dst[di + i] = src[si + i]
        else:
            r = _lz4_block(src, si, si + c, dst, di, di + nbytes)
            if r < 0:
                return r
            if r != nbytes:
                return -5
        si += c
        di += nbytes
    return 0


_ERRORS = {-1: "LZ4 block reads past its input", -2: "LZ4 block writes past the frame", -3: "LZ4 match offset out of range",
           -4: "bad block size in the header", -5: "decompressed size does not match", -6: "compressed data cut short"}


try:  # the LZ4 C library (LZ4_decompress_safe) is ~5x faster than the numba decoder
    import lz4.block as _lz4
except ImportError:  # pragma: no cover - numba fallback
    _lz4 = None

try:  # whole frames in C: 40 us instead of 220 us for a 192 x 192 uint32 frame
    import bitshuffle as _bshuf
except ImportError:  # pragma: no cover - the lz4 / numba paths
    _bshuf = None

_ELEMENT_DTYPES = {n: np.dtype(f"u{n}") for n in (1, 2, 4, 8)}


def _decode_bslz4_bitshuffle(src: np.ndarray, es: int, dst: np.ndarray, block: int) -> int:
    """_decode_bslz4 by the bitshuffle package, after _check_bslz4_framing."""
    r = _check_bslz4_framing(src, es, dst.size)
    if r != 0:
        return r
    try:
        plain = _bshuf.decompress_lz4(src[12:], (dst.size // es,), _ELEMENT_DTYPES[es], block // es)
    except (RuntimeError, ValueError):  # an LZ4 block it could not decode
        return -1
    dst[:] = plain.view(np.uint8)
    return 0


def _decode_bslz4_lib(src: np.ndarray, es: int, dst: np.ndarray, block: int) -> int:
    """_decode_bslz4 with the LZ4 blocks decoded by the lz4 package, after _check_bslz4_framing."""
    r = _check_bslz4_framing(src, es, dst.size)
    if r != 0:
        return r
    n_elem = dst.size // es
    block_elems = block // es
    mv = memoryview(src)
    si, di, done = 12, 0, 0
    fast = es in (1, 2) and dst.ctypes.data % 8 == 0
    ys = np.empty((2, 8), np.uint64)
    while n_elem - done >= 8:
        be = min(block_elems, n_elem - done)
        be -= be % 8
        nbytes = be * es
        c = int.from_bytes(mv[si:si + 4], "big")  # every block lies inside src (checked above)
        si += 4
        try:
            plain = _lz4.decompress(mv[si:si + c], uncompressed_size=nbytes)
        except Exception:
            return -1
        if len(plain) != nbytes:
            return -5
        p8 = np.frombuffer(plain, np.uint8)
        if fast and be % 64 == 0 and di % 8 == 0 and p8.ctypes.data % 8 == 0:
            _bitunshuffle_words(p8.view(np.uint64), be, es, dst[di:di + nbytes].view(np.uint64), ys)
        else:
            _bitunshuffle(p8, 0, be, es, dst, di)
        si += c
        di += nbytes
        done += be
    left = (n_elem - done) * es
    dst[di:di + left] = src[si:si + left]
    return 0


def _u8(buf) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)


def decompress_into(buf, algorithm: str, elem_size: int, out: np.ndarray) -> None:
    """Decompress ``buf`` (bslz4 or lz4, HDF5 framing) into ``out`` (C-contiguous, its
    byte size is the expected uncompressed size). ProtocolError('bad_compression') if the
    data is corrupt."""
    src = _u8(buf)
    dst = out.reshape(-1).view(np.uint8)
    if algorithm == "bslz4":
        if elem_size not in (1, 2, 4, 8):
            raise ProtocolError("bad_compression", f"bslz4 element size {elem_size} is not 1, 2, 4 or 8")
        block = int.from_bytes(bytes(src[8:12]), "big") if src.size >= 12 else 0
        if block > 64 << 20:
            r = -4
        elif _bshuf is not None and dst.size % elem_size == 0:
            r = _decode_bslz4_bitshuffle(src, elem_size, dst, block)
        elif _lz4 is not None:
            r = _decode_bslz4_lib(src, elem_size, dst, block)
        else:
            scratch = np.empty(max(block, 8 * elem_size), dtype=np.uint8)
            r = _decode_bslz4(src, elem_size, dst, scratch)
    elif algorithm == "lz4":
        r = _decode_h5lz4(src, dst)
    else:
        raise ProtocolError("bad_compression", f"unknown compression {algorithm!r} (expected bslz4 or lz4)")
    if r != 0:
        declared = int.from_bytes(bytes(src[:8]), "big") if src.size >= 8 else -1
        raise ProtocolError("bad_compression", f"{algorithm} data of {src.size} bytes is corrupt: {_ERRORS.get(r, r)} "
                            f"(declares {declared} bytes, frame needs {dst.size})")


def decompress(buf, algorithm: str, elem_size: int, nbytes: int) -> np.ndarray:
    """Decompressed bytes as a new uint8 array of ``nbytes``."""
    out = np.empty(nbytes, dtype=np.uint8)
    decompress_into(buf, algorithm, elem_size, out)
    return out


def lz4_block_decompress(buf, nbytes: int) -> np.ndarray:
    """A bare LZ4 block (no framing) into ``nbytes`` bytes."""
    src = _u8(buf)
    out = np.empty(nbytes, dtype=np.uint8)
    r = _lz4_block(src, 0, src.size, out, 0, nbytes)
    if r != nbytes:
        raise ProtocolError("bad_compression", f"LZ4 block of {src.size} bytes is corrupt: "
                            f"{_ERRORS.get(r, f'{r} bytes instead of {nbytes}')}")
    return out


def bitunshuffle_block(buf, n_elem: int, elem_size: int) -> np.ndarray:
    """Plain bitshuffled bytes (no LZ4, n_elem % 8 == 0 part; tail copied) -> bytes."""
    src = _u8(buf)
    out = np.empty(n_elem * elem_size, dtype=np.uint8)
    m = n_elem - n_elem % 8
    _bitunshuffle(src, 0, m, elem_size, out, 0)
    out[m * elem_size:] = src[m * elem_size:n_elem * elem_size]
    return out


# ------------------------------------------------------------------------------- encoding


def _lz4_compress_block(data: bytes) -> bytes:
    try:
        import lz4.block

        return lz4.block.compress(bytes(data), store_size=False)
    except ImportError:
        return _lz4_literal_block(bytes(data))


def _lz4_literal_block(data: bytes) -> bytes:
    """A valid LZ4 block that stores ``data`` as one run of literals."""
    n = len(data)
    if n < 15:
        return bytes([n << 4]) + data
    rest = n - 15
    ext = b"\xff" * (rest // 255) + bytes([rest % 255])
    return bytes([0xF0]) + ext + data


def compress_bslz4(arr: np.ndarray, block_bytes: int = DEFAULT_BLOCK_BYTES) -> bytes:
    """HDF5-framed bitshuffle-LZ4 of ``arr`` (its element size is the bitshuffle element)."""
    arr = np.ascontiguousarray(arr)
    es = arr.dtype.itemsize
    raw = arr.reshape(-1).view(np.uint8)
    n_elem = arr.size
    block_elems = max(8, (block_bytes // es) // 8 * 8)
    parts = [int(raw.size).to_bytes(8, "big"), int(block_elems * es).to_bytes(4, "big")]
    done = 0
    scratch = np.empty(block_elems * es, dtype=np.uint8)
    while n_elem - done >= 8:
        be = min(block_elems, n_elem - done)
        be -= be % 8
        _bitshuffle(raw, done * es, be, es, scratch, 0)
        c = _lz4_compress_block(scratch[:be * es].tobytes())
        parts.append(len(c).to_bytes(4, "big"))
        parts.append(c)
        done += be
    parts.append(raw[done * es:].tobytes())
    return b"".join(parts)


def compress_h5lz4(arr: np.ndarray, block_bytes: int = 1 << 20) -> bytes:
    """HDF5-framed LZ4 of ``arr``'s bytes."""
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).tobytes()
    parts = [len(raw).to_bytes(8, "big"), int(block_bytes).to_bytes(4, "big")]
    for i in range(0, len(raw), block_bytes):
        chunk = raw[i:i + block_bytes]
        c = _lz4_compress_block(chunk)
        if len(c) >= len(chunk):
            c = chunk
        parts.append(len(c).to_bytes(4, "big"))
        parts.append(c)
    return b"".join(parts)
