"""4D files as a frame source: .npy, HDF5 (plain 4D/3D arrays and DECTRIS master/data files
with their bitshuffle-LZ4 filter) and Quantum Detectors .mib, picked by content.

    src = open_file_source("scan.h5", scan_shape=(128, 128), calibration=cal)
    while True:
        try:
            item = src.receive(1.0)
        except EOFError:
            break

A livestereo recording is not read here: :func:`open_file_source` raises
:class:`IsLivestereoRecording` so the caller takes the recording replay path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from livestereo.detectors.common import (
    IteratorSource,
    PixelMask,
    RunBuilder,
    as_frame_dtype,
    bad,
    ok,
    sanitize_run_id,
)
from livestereo.detectors.merlin import mib
from livestereo.protocol.codec import ProtocolError
from livestereo.protocol.messages import Calibration
from livestereo.protocol.source import Received, Source

NPY_MAGIC = b"\x93NUMPY"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
MIB_MAGIC = b"MQ1,"
RECORDING_MAGIC = b"LSREC"


class IsLivestereoRecording(ValueError):
    """The file is a livestereo recording: replay it with the recording reader."""

    def __init__(self, path):
        super().__init__(f"{path}: is a livestereo recording; replay it with the recording reader")
        self.path = str(path)


def sniff(path: str | os.PathLike) -> str:
    """'npy', 'hdf5', 'mib' or 'livestereo' from the first bytes of the file.

    Raises IsLivestereoRecording never (returns 'livestereo'), FileNotFoundError, or a
    ValueError naming the file when the content is none of these."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(RECORDING_MAGIC):
        return "livestereo"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(MIB_MAGIC):
        return "mib"
    if not head:
        raise ValueError(f"{path}: empty file, not a 4D data file")
    if path.suffix.lower() in (".hdr",) and path.with_suffix(".mib").exists():
        return "mib"
    raise ValueError(
        f"{path}: unknown file format (first bytes {head[:8]!r}); expected .npy, HDF5, Merlin .mib or a livestereo recording"
    )


def open_file_source(path: str | os.PathLike, *, calibration: Calibration | None = None,
                     scan_shape: tuple[int, int] | None = None, frames_per_message: int = 64,
                     dataset: str | None = None, mask: np.ndarray | None = None,
                     hot_pixels=(), run_id: str | None = None) -> Source:
    """A finite Source replaying a 4D file as one run: start, frames messages of at most
    ``frames_per_message`` frames, end. The format is sniffed from the content.

    scan_shape: (ny, nx); needed for 3D (n_frames, h, w) data without scan information
    (otherwise a single row (1, n_frames) is assumed and metadata says so).
    dataset: HDF5 path of the array (default: searched). mask / hot_pixels: pixels to zero.
    """
    path = Path(path)
    if frames_per_message < 1:
        raise ValueError("frames_per_message must be >= 1")
    kind = sniff(path)
    if kind == "livestereo":
        raise IsLivestereoRecording(path)
    if kind == "npy":
        return _open_npy(path, calibration, scan_shape, frames_per_message, mask, hot_pixels, run_id)
    if kind == "hdf5":
        return _open_hdf5(path, calibration, scan_shape, frames_per_message, dataset, mask, hot_pixels, run_id)
    if path.suffix.lower() == ".hdr":
        path = path.with_suffix(".mib")
    return _open_mib(path, calibration, scan_shape, frames_per_message, mask, hot_pixels, run_id)


# ---------------------------------------------------------------------------------------
# arrays (npy, hdf5)


def _scan_and_frames(path, shape, scan_shape):
    """(scan_shape, n_frames, frame_shape, guessed) of a 3D or 4D array shape."""
    if len(shape) == 4:
        ny, nx, h, w = shape
        if scan_shape is not None and tuple(scan_shape) != (ny, nx) and scan_shape[0] * scan_shape[1] != ny * nx:
            raise ValueError(f"{path}: scan_shape {tuple(scan_shape)} does not fit the array's {ny}x{nx} positions")
        return (tuple(scan_shape) if scan_shape else (ny, nx)), ny * nx, (h, w), False
    if len(shape) == 3:
        n, h, w = shape
        if scan_shape is not None:
            if scan_shape[0] * scan_shape[1] > n or n % (scan_shape[0] * scan_shape[1]):
                raise ValueError(f"{path}: {n} frames are not a whole number of {tuple(scan_shape)} scans")
            return tuple(scan_shape), n, (h, w), False
        return (1, n), n, (h, w), True
    raise ValueError(f"{path}: array of shape {tuple(shape)} is not 4D (ny, nx, h, w) or 3D (n_frames, h, w)")


def _array_items(name, get_frames, n_frames, frame_shape, src_dtype, scan_shape, guessed, calibration,
                 frames_per_message, mask, hot_pixels, run_id, metadata, disc_center=None) -> Iterator[Received]:
    dtype = as_frame_dtype(src_dtype)
    n_pos = scan_shape[0] * scan_shape[1]
    md = dict(metadata)
    pm = PixelMask(frame_shape, mask, hot_pixels)
    if pm.count:
        md["masked_pixels"] = pm.count
    if guessed:
        md["scan_shape_guessed"] = True
    run = RunBuilder(run_id=run_id, scan_shape=scan_shape, frame_shape=frame_shape, dtype=dtype.name,
                     calibration=calibration, metadata=md, repeat=max(1, n_frames // n_pos),
                     disc_center_hint=disc_center)
    yield ok(run.start)
    for i in range(0, n_frames, frames_per_message):
        k = min(frames_per_message, n_frames - i)
        try:
            block = get_frames(i, k)
        except Exception as exc:  # a corrupt chunk in an HDF5 file ...
            yield bad("read_error", f"{name}: frames {i}..{i + k - 1}: {type(exc).__name__}: {exc}")
            yield ok(run.end("aborted"))
            return
        if block.dtype != dtype or not block.flags.c_contiguous or (pm.count and not block.flags.writeable):
            block = np.array(block, dtype=dtype, order="C")
        pm.apply(block)
        for msg in run.frames(block, i):
            yield ok(msg)
    yield ok(run.end())


def _open_npy(path, calibration, scan_shape, fpm, mask, hot_pixels, run_id):
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    expected = arr.size * arr.dtype.itemsize
    scan, n, fshape, guessed = _scan_and_frames(path, arr.shape, scan_shape)
    if arr.dtype.hasobject:
        raise ValueError(f"{path}: object arrays are not frames")
    flat = arr.reshape(n, *fshape)
    items = _array_items(str(path), lambda i, k: flat[i:i + k], n, fshape, arr.dtype, scan, guessed, calibration, fpm,
                         mask, hot_pixels, run_id or sanitize_run_id(path.stem),
                         {"source_file": str(path), "source_format": "npy", "source_dtype": str(arr.dtype),
                          "source_nbytes": expected})
    return IteratorSource(f"npy file {path}", items)


def _hdf5_find(f, path, dataset):
    """(list of datasets to concatenate along frames, description, extras)."""
    import h5py

    extras: dict = {}
    if dataset is not None:
        if dataset not in f:
            raise ValueError(f"{path}: no dataset {dataset!r} in the file")
        ds = f[dataset]
        if not isinstance(ds, h5py.Dataset):
            raise ValueError(f"{path}: {dataset!r} is a group, not a dataset")
        return [ds], dataset, extras
    # DECTRIS master file: /entry/data/data_000001 ... (external links to data files)
    if "entry/data" in f and isinstance(f["entry/data"], h5py.Group):
        grp = f["entry/data"]
        names = sorted(k for k in grp.keys() if re.fullmatch(r"data_\d{6}", k))
        if names:
            parts = []
            for k in names:
                try:
                    parts.append(grp[k])
                except KeyError:
                    raise ValueError(f"{path}: /entry/data/{k} links to a data file that is missing") from None
            det = "entry/instrument/detector"
            for key, name in (("beam_center_x", "beam_center_x"), ("beam_center_y", "beam_center_y"),
                              ("x_pixel_size", "x_pixel_size"), ("count_time", "count_time"),
                              ("description", "description")):
                if f"{det}/{key}" in f:
                    v = f[f"{det}/{key}"][()]
                    extras[name] = v.decode() if isinstance(v, bytes) else v
            pm = f"{det}/detectorSpecific/pixel_mask"
            if pm in f:
                extras["pixel_mask"] = np.asarray(f[pm][()])
            return parts, "/entry/data/" + ",".join(names), extras
    found: list = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) and obj.dtype.kind in "uif" and min(obj.shape) > 0:
            found.append((obj.ndim == 4, obj.size, name))

    f.visititems(visit)
    if not found:
        raise ValueError(f"{path}: HDF5 file has no 3D or 4D numeric dataset")
    found.sort(reverse=True)
    name = found[0][2]
    return [f[name]], "/" + name, extras


def _open_hdf5(path, calibration, scan_shape, fpm, dataset, mask, hot_pixels, run_id):
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle / LZ4 filters)

    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({type(exc).__name__}: {exc})") from None
    try:
        parts, desc, extras = _hdf5_find(f, path, dataset)
        shapes = [p.shape for p in parts]
        if len(parts) == 1:
            scan, n, fshape, guessed = _scan_and_frames(path, shapes[0], scan_shape)
        else:
            if any(len(s) != 3 or s[1:] != shapes[0][1:] for s in shapes):
                raise ValueError(f"{path}: data blocks {shapes} are not 3D frames of one shape")
            total = sum(s[0] for s in shapes)
            scan, n, fshape, guessed = _scan_and_frames(path, (total,) + tuple(shapes[0][1:]), scan_shape)
        src_dtype = parts[0].dtype
        starts = np.cumsum([0] + [s[0] if len(s) == 3 else s[0] * s[1] for s in shapes])

        def get_frames(i, k):
            out = []
            j = i
            while j < i + k:
                b = int(np.searchsorted(starts, j, side="right") - 1)
                ds = parts[b]
                lo = j - int(starts[b])
                hi = min(int(starts[b + 1]) - int(starts[b]), lo + (i + k - j))
                if ds.ndim == 4:
                    nx = ds.shape[1]
                    r0, r1 = lo // nx, (hi - 1) // nx + 1
                    rows = np.asarray(ds[r0:r1]).reshape((-1,) + tuple(ds.shape[2:]))
                    out.append(rows[lo - r0 * nx:hi - r0 * nx])
                else:
                    out.append(ds[lo:hi])
                j += hi - lo
            return out[0] if len(out) == 1 else np.concatenate(out)

        md = {"source_file": str(path), "source_format": "hdf5", "source_dataset": desc, "source_dtype": str(src_dtype)}
        pixel_mask = extras.pop("pixel_mask", None)
        if pixel_mask is not None and pixel_mask.shape == tuple(fshape):
            pm = pixel_mask != 0
            mask = pm if mask is None else (np.asarray(mask, bool) | pm)
            md["pixel_mask_from_file"] = int(pm.sum())
        disc = None
        if "beam_center_x" in extras and "beam_center_y" in extras:
            try:
                disc = (float(extras["beam_center_y"]), float(extras["beam_center_x"]))
            except (TypeError, ValueError):
                disc = None
        md.update({k: v for k, v in extras.items() if isinstance(v, (str, int, float, np.generic))})
        items = _array_items(str(path), get_frames, n, fshape, src_dtype, scan, guessed, calibration, fpm, mask,
                             hot_pixels, run_id or sanitize_run_id(path.stem), md, disc)
    except Exception:
        f.close()
        raise
    return IteratorSource(f"HDF5 file {path} {desc}", items, on_close=f.close)


# ---------------------------------------------------------------------------------------
# Merlin .mib


def read_mib_header_file(mib_path: Path) -> dict[str, str] | None:
    """The .hdr acquisition header beside a .mib file, parsed, or None."""
    for cand in (mib_path.with_suffix(".hdr"), Path(re.sub(r"(_\d+)?\.mib$", ".hdr", str(mib_path)))):
        if cand.exists():
            try:
                return mib.parse_acquisition_header(cand.read_bytes())
            except ProtocolError:
                return None
    return None


def _open_mib(path: Path, calibration, scan_shape, fpm, mask, hot_pixels, run_id):
    import mmap

    size = path.stat().st_size
    hdr = read_mib_header_file(path)
    info = mib.acquisition_info(hdr) if hdr else {"depth": None, "n_frames": None, "frames_per_trigger": None, "scan_shape": None}
    fh = open(path, "rb")
    try:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:
        fh.close()
        raise ValueError(f"{path}: empty file, not a .mib") from None
    try:
        first = mib.parse_frame_header(mm, 0, info.get("depth"))
    except ProtocolError as exc:
        mm.close()
        fh.close()
        raise ValueError(f"{path}: not a readable Merlin .mib file ({exc})") from None
    if first.payload_nbytes <= 0:
        mm.close()
        fh.close()
        raise ValueError(f"{path}: .mib frame header declares no pixel data")

    def close():
        try:
            mm.close()
        except BufferError:
            pass  # frames still reference the map; it closes when they are gone
        fh.close()

    items = _mib_items(path, mm, size, first, info, calibration, scan_shape, fpm, mask, hot_pixels, run_id, hdr)
    return IteratorSource(f"Merlin .mib file {path}", items, on_close=close)


def _mib_items(path, mm, size, first, info, calibration, scan_shape, fpm, mask, hot_pixels, run_id, hdr):
    fsize = first.frame_nbytes
    n_complete = size // fsize
    remainder = size - n_complete * fsize
    n_declared = info.get("n_frames")
    if scan_shape is None:
        scan_shape = mib.guess_scan_shape(info, n_declared or n_complete)
        guessed = scan_shape is None
        if scan_shape is None:
            scan_shape = (1, n_declared or n_complete + (1 if remainder else 0))
    else:
        guessed = False
    scan_shape = tuple(int(s) for s in scan_shape)
    n_pos = scan_shape[0] * scan_shape[1]
    total = n_declared or (n_complete + (1 if remainder else 0))
    repeat = max(1, total // n_pos)
    md = {"source_file": str(path), "source_format": "mib", **first.metadata()}
    if hdr:
        md["merlin_acquisition_header"] = hdr
    if guessed:
        md["scan_shape_guessed"] = True
    pm = PixelMask(first.frame_shape, mask, hot_pixels)
    if pm.count:
        md["masked_pixels"] = pm.count
    run = RunBuilder(run_id=run_id or sanitize_run_id(path.stem), scan_shape=scan_shape, frame_shape=first.frame_shape,
                     dtype=first.dtype, calibration=calibration, metadata=md, repeat=repeat)
    yield ok(run.start)
    key = first.layout_key()
    fixed = bytes(mm[10:41])  # ',00384,01,0256,0256,U16,   1x1,' : everything but the sequence number
    i = 0
    off = 0
    while i < n_complete:
        k = min(fpm, n_complete - i)
        heads = np.ndarray((k, 41), dtype=np.uint8, buffer=mm, offset=off, strides=(fsize, 1))
        good = (heads[:, :4] == np.frombuffer(b"MQ1,", np.uint8)).all(axis=1) & (heads[:, 10:41] == np.frombuffer(fixed, np.uint8)).all(axis=1)
        nb = k if good.all() else int(np.argmin(good))
        if nb:
            data = mib.decode_payloads(mm, off + first.header_nbytes, fsize, nb, first)
            pm.apply(data)
            for msg in run.frames(data, i):
                yield ok(msg, nbytes=nb * fsize)
            i += nb
            off += nb * fsize
        if nb < k:
            bad_off = off
            try:
                h = mib.parse_frame_header(mm, bad_off, info.get("depth"))
                detail = (f"frame {i + 1} at byte {bad_off} has a different layout {h.layout_key()} "
                          f"from the first frame's {key}")
                reason = "layout_changed"
            except ProtocolError as exc:
                detail = f"frame {i + 1} at byte {bad_off}: {exc.detail}"
                reason = exc.reason
            yield bad(reason, f"{path}: {detail}; skipped")
            i += 1
            off += fsize
    if remainder:
        yield bad("truncated", f"{path}: last frame cut: {remainder} of {fsize} bytes at byte offset {n_complete * fsize} "
                  f"(frame {n_complete + 1}); {n_complete} complete frames read")
    yield ok(run.end())
