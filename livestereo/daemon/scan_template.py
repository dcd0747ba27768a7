"""Scan files written from a per-run byte template instead of through h5py.

Every scan file of a run has the same structure: the same groups, the same datasets of the
same shapes, the same attributes; only the images, the valid mask and a few scalar
attributes (``scan``, ``complete``, the frame counters and times) change.  Writing one
through h5py costs ~1.7 ms (each of its 14 attributes ~50 us), and h5py holds the GIL the
whole time, so the results thread stalled the ingest thread 20 times a second on small
fast scans (measured: the end-to-end ingest benchmark rose from 0.94-0.95x to 1.00x of the
bare receive loop with scan writing switched off).

So once per run the file is built in memory (HDF5's core driver, ~6 ms) and its bytes
kept, all but the raw data of the images and the valid mask, which lie where HDF5 says
(contiguous datasets).  The per-scan attribute values are built with random stand-in bytes
and found by searching for them (a one-byte value, the ``complete`` flag, by building once
more with it flipped and comparing the bytes).  A scan file is then the template's bytes
with those values replaced and the scan's arrays in between, written straight from the
arrays (the writes release the GIL).  The file is plain HDF5 as before: the template is
written in the earliest file format (superblock 0, version 1 object headers), which
carries no metadata checksums, and the datasets patched are contiguous.  Before a template
is used, one scan written from it is read back with h5py and compared value by value; a
template that fails (another HDF5 version laying files out differently, a value of a
variable size) is not used, and the scan files of that run are written through h5py
(``fill``) instead.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np

log = logging.getLogger(__name__)

__all__ = ["ScanTemplate", "TemplateCache"]

#: per-scan root attribute values: name -> value (a numpy-convertible scalar)
Values = dict[str, object]
#: writes a whole scan file into an open h5py file: (file, per-scan values, images, valid)
Filler = Callable[[h5py.File, Values, np.ndarray, np.ndarray], None]


def _scalar(value: object) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim != 0 or a.dtype.kind not in "biuf":
        raise TypeError(f"not a fixed-size number: {value!r}")
    return a


def _flipped(a: np.ndarray) -> np.ndarray:
    """A value of the same dtype that differs from ``a`` in every byte (bool: the other one)."""
    if a.dtype == np.bool_:
        return np.asarray(not bool(a))
    return np.frombuffer(bytes(255 - b for b in a.tobytes()), dtype=a.dtype).reshape(())


def _image(fill: Filler, values: Values, images: np.ndarray, valid: np.ndarray) -> tuple[bytes, int, int]:
    """(file bytes, offset of /images' data, offset of /valid's data) of an in-memory build."""
    with h5py.File(f"livestereo-scan-template-{threading.get_ident()}", "w", driver="core",
                   backing_store=False, libver="earliest") as f:
        fill(f, values, images, valid)
        f.flush()
        off_images = f["images"].id.get_offset()
        off_valid = f["valid"].id.get_offset()
        data = f.id.get_file_image()
    if off_images is None or off_valid is None:
        raise ValueError("images or valid is not stored contiguously")
    return data, int(off_images), int(off_valid)


@dataclass(frozen=True)
class ScanTemplate:
    """A run's scan file as its fixed bytes around the two data regions, and where its
    per-scan attribute values lie in those bytes (the data regions themselves are not kept:
    a big scan's images are not held twice)."""

    static: tuple[bytes, bytes, bytes]
    """The file's bytes before, between and after the two data regions."""
    regions: tuple[str, str]
    """Which data region comes first in the file: ("images", "valid") or ("valid", "images")."""
    images_spec: tuple[np.dtype, tuple[int, ...]]
    """dtype and shape of /images' raw data."""
    valid_shape: tuple[int, ...]
    """Shape of /valid's raw data (one byte per position)."""
    attrs_at: dict[str, tuple[int, int, np.dtype]]
    """Per-scan root attribute -> (index into ``static``, byte offset there, dtype) of its value."""

    @classmethod
    def build(cls, fill: Filler, values: Values, images: np.ndarray, valid: np.ndarray) -> ScanTemplate:
        """Build and locate (ValueError / TypeError where the file cannot be patched)."""
        images = np.ascontiguousarray(images)
        if images.dtype.kind != "f" or images.dtype.byteorder == ">":
            raise TypeError(f"images of dtype {images.dtype}")
        kinds = {k: _scalar(v).dtype for k, v in values.items()}
        # Built with stand-in values whose bytes occur nowhere else in the file: a random
        # pattern per multi-byte value, found by searching; one-byte values (bools) by a
        # second build with the value flipped.  Distinct bytes in every image element too.
        rng = np.random.default_rng(0x5CA9)
        base = {k: (np.asarray(False, dt) if dt.itemsize == 1 else
                    np.frombuffer(rng.bytes(dt.itemsize), dt).reshape(())) for k, dt in kinds.items()}
        pattern_images = np.arange(1, images.size + 1, dtype=images.dtype).reshape(images.shape)
        pattern_valid = np.zeros(valid.shape, bool)
        pattern_valid.flat[::2] = True
        data, off_img, off_valid = _image(fill, base, pattern_images, pattern_valid)
        if data[off_img:off_img + pattern_images.nbytes] != pattern_images.tobytes() \
                or data[off_valid:off_valid + pattern_valid.nbytes] != pattern_valid.tobytes():
            raise ValueError("the datasets' raw data is not where HDF5 says")
        spans = sorted([(off_img, off_img + pattern_images.nbytes, "images"),
                        (off_valid, off_valid + pattern_valid.nbytes, "valid")])
        if spans[0][1] > spans[1][0]:
            raise ValueError("the datasets' raw data overlap")
        cuts = [(0, spans[0][0]), (spans[0][1], spans[1][0]), (spans[1][1], len(data))]
        attrs_at = {}
        for name, a in base.items():
            if a.dtype.itemsize > 1:
                at = data.find(a.tobytes())
                if at < 0 or data.find(a.tobytes(), at + 1) >= 0:
                    raise ValueError(f"attribute {name!r} is not stored as one fixed-size value")
            else:
                variant, *_ = _image(fill, dict(base, **{name: _flipped(a)}), pattern_images, pattern_valid)
                diff = np.flatnonzero(np.frombuffer(data, np.uint8) != np.frombuffer(variant, np.uint8)) \
                    if len(variant) == len(data) else np.array([0, 1])
                if diff.size != 1:
                    raise ValueError(f"attribute {name!r} is not stored as one fixed-size value")
                at = int(diff[0])
            piece = next((k for k, (lo, hi) in enumerate(cuts) if lo <= at and at + a.dtype.itemsize <= hi), None)
            if piece is None:
                raise ValueError(f"attribute {name!r} lies inside a dataset's raw data")
            attrs_at[name] = (piece, at - cuts[piece][0], a.dtype)
        t = cls(tuple(data[lo:hi] for lo, hi in cuts), (spans[0][2], spans[1][2]), (images.dtype, images.shape),
                tuple(valid.shape), attrs_at)
        t._check(values, images, valid)
        return t

    def render(self, values: Values, images: np.ndarray, valid: np.ndarray) -> list:
        """The file's bytes with these values (same names, dtypes and shapes as built), as
        buffers to write one after the other; the data regions are views, not copies, where
        the arrays already have the file's dtype and layout."""
        dtype, shape = self.images_spec
        if images.shape != shape or valid.shape != self.valid_shape or values.keys() != self.attrs_at.keys():
            raise ValueError("the scan does not fit this template")
        static = list(self.static)
        for name, (piece, at, dt) in self.attrs_at.items():
            if isinstance(static[piece], bytes):
                static[piece] = bytearray(static[piece])  # only the pieces with values are copied
            b = np.asarray(values[name], dtype=dt).tobytes()
            static[piece][at:at + len(b)] = b
        data = {"images": memoryview(np.ascontiguousarray(images, dtype=dtype)).cast("B"),
                "valid": memoryview(np.ascontiguousarray(valid, dtype=np.bool_)).cast("B")}
        return [static[0], data[self.regions[0]], static[1], data[self.regions[1]], static[2]]

    def _check(self, values: Values, images: np.ndarray, valid: np.ndarray) -> None:
        """Render a scan with other values, read it back with h5py, compare everything."""
        rng = np.random.default_rng(1)
        probe_values = {k: _flipped(_scalar(v)) for k, v in values.items()}
        probe_images = rng.normal(size=images.shape).astype(self.images_spec[0])
        probe_valid = rng.random(valid.shape) > 0.5
        with h5py.File(io.BytesIO(b"".join(self.render(probe_values, probe_images, probe_valid))), "r") as f:
            ok = (np.array_equal(f["images"][()], probe_images) and f["images"].dtype == probe_images.dtype
                  and np.array_equal(f["valid"][()], probe_valid) and f["valid"].dtype == np.bool_)
            for name, v in probe_values.items():
                got = np.asarray(f.attrs[name])
                ok = ok and got.dtype == v.dtype and got.tobytes() == v.tobytes()
        if not ok:
            raise ValueError("a file rendered from the template reads back different values")


class TemplateCache:
    """Templates of the last few runs, keyed by everything that shapes the file."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: list[tuple[tuple, tuple, ScanTemplate | None]] = []
        self._lock = threading.Lock()

    def get(self, owners: tuple, key: tuple, build: Callable[[], ScanTemplate]) -> ScanTemplate | None:
        """The template for ``owners`` (objects compared by identity and held here, so
        their ids are not reused) and ``key`` (compared by value), built on first use;
        None if it could not be built (the caller then writes through h5py; the reason is
        logged once per run)."""
        with self._lock:
            for o, k, t in self._items:
                if k == key and len(o) == len(owners) and all(a is b for a, b in zip(o, owners)):
                    return t
            try:
                t = build()
            except (ValueError, TypeError, OSError) as exc:
                log.warning("scan files of this run are written through h5py (no byte template: %s)", exc)
                t = None
            self._items.append((owners, key, t))
            del self._items[:-self.size]
            return t
