"""Export a livestereo recording to an HDF5 4D array (LiberTEM, py4DSTEM, HyperSpy, h5py).

Layout of the HDF5 file written by ``export_hdf5`` (one run of the recording):

One scan (default)::

    /data    (scan_y, scan_x, det_y, det_x)  the frames' dtype, little-endian
             segmented detectors: (scan_y, scan_x, n_segments)
    /valid   (scan_y, scan_x) bool: True where a frame was received; other positions of
             /data stay 0

All scans (``all_scans=True``, in-situ series)::

    /scan_0000/data, /scan_0000/valid, /scan_0001/data, ...  (scan number in 4 digits)

``/data`` is chunked per scan row (one chunk = one row of frames, split into blocks of
columns where a row would exceed 16 MiB) and optionally compressed. Its attributes carry
the calibration with units:

- ``axes``: ["scan_y", "scan_x", "det_y", "det_x"] (or [..., "segment"]);
- ``units``: ["nm", "nm", "mrad", "mrad"] (detector axes in "px" without ``mrad_per_px``);
- ``scale``: [scan_step_nm, scan_step_nm, mrad_per_px, mrad_per_px] (size of one step
  along each axis in ``units``); ``offset``: value of index 0 along each axis (detector
  axes: minus the disc centre in mrad, so 0 mrad is the disc centre when it is known);
- ``convergence_semiangle_mrad``, ``scan_step_nm``, ``mrad_per_px``, ``disc_center_px``
  (row, col), ``disc_radius_px``, ``scan_rotation_deg``, ``high_tension_kv``,
  ``frame_time_s``, ``segment_angles_mrad`` (n_segments x 2: theta_x, theta_y), where known;
- ``run_id``, ``scan``, ``detector``, ``n_valid`` (positions received).

Root attributes: ``livestereo_export_version`` (1), ``source_recording`` (path),
``run_id``, ``start_message_json`` (the full start message), ``end_reason``.

Opening it elsewhere: ``h5py.File(p)["data"]``; LiberTEM ``ctx.load("hdf5", path=p,
ds_path="/data")``; HyperSpy ``hs.signals.Signal2D(h5py.File(p)["data"][()])`` (or lazily
through dask); py4DSTEM ``py4DSTEM.DataCube(data=h5py.File(p)["data"][()])``. Files written
with a plugin compression ("bitshuffle", "lz4", "zstd", "blosc") need ``import hdf5plugin``
before h5py can read them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from livestereo.protocol.codec import ProtocolError, decode
from livestereo.protocol.messages import EndMessage, FramesMessage, StartMessage
from livestereo.recording.format import RecordingError, RecordingReader

__all__ = ["ExportSummary", "export_hdf5", "COMPRESSIONS"]

#: Upper bound of one HDF5 chunk (bytes): a scan row, split into column blocks beyond this.
CHUNK_BYTES = 16 << 20
#: Partially filled blocks kept in memory before they are written out (bytes).
PENDING_BYTES = 256 << 20
COMPRESSIONS = ("gzip", "lzf", "bitshuffle", "lz4", "zstd", "blosc")


@dataclasses.dataclass
class ExportSummary:
    """What ``export_hdf5`` wrote and what it skipped."""

    recording: Path
    out_path: Path
    run_id: str
    datasets: list[str]
    """HDF5 paths of the 4D datasets ("/data", or "/scan_0000/data", ...)."""
    scans: list[int]
    shape: tuple[int, ...]
    """Shape of each dataset: (scan_y, scan_x, det_y, det_x) or (scan_y, scan_x, n_segments)."""
    dtype: str
    frames_written: int = 0
    """Frames placed in the datasets (duplicates included)."""
    positions_valid: int = 0
    """Scan positions holding a received frame, over all exported scans."""
    positions_missing: int = 0
    """Scan positions never received (left 0, False in /valid), over all exported scans."""
    duplicates: int = 0
    """Frames for a position already filled in the same scan (the last one wins)."""
    skipped: Counter = dataclasses.field(default_factory=Counter)
    """Messages not exported, by reason: protocol errors by their ProtocolError reason
    ("not_msgpack", "bad_payload", ...), "mismatch" (dtype / frame shape differ from the
    start), "out_of_range" (positions beyond the scan), "before_start", "conflicting_start"."""
    other: Counter = dataclasses.field(default_factory=Counter)
    """Good messages that were not asked for: "other_run", "other_scan" (frames messages)."""
    end_reason: str | None = None
    stop_offset: int = 0
    stop_reason: str = ""
    """Where and why the recording stopped ("end of file" when it is intact)."""

    @property
    def bad_messages(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        s = (
            f"exported run {self.run_id!r} scan(s) {self.scans} of {self.recording} to {self.out_path} "
            f"{', '.join(self.datasets)} {self.shape} {self.dtype}: {self.frames_written} frames, "
            f"{self.positions_valid} positions valid, {self.positions_missing} missing"
        )
        if self.duplicates:
            s += f", {self.duplicates} duplicate frames"
        if self.skipped:
            s += "; skipped bad messages: " + ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
        if self.other:
            s += "; not exported: " + ", ".join(f"{v} {k}" for k, v in sorted(self.other.items()))
        s += f"; recording stopped at byte {self.stop_offset}: {self.stop_reason}"
        return s


def _compression_kwargs(compression: str | None) -> dict:
    if compression in (None, "none"):
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression in ("bitshuffle", "lz4", "zstd", "blosc"):
        import hdf5plugin

        filt = {
            "bitshuffle": lambda: hdf5plugin.Bitshuffle(cname="lz4"),
            "lz4": lambda: hdf5plugin.LZ4(),
            "zstd": lambda: hdf5plugin.Zstd(),
            "blosc": lambda: hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.BITSHUFFLE),
        }[compression]()
        return dict(filt)
    raise ValueError(f"unknown compression {compression!r}: use None or one of {', '.join(COMPRESSIONS)}")


class _ScanWriter:
    """Fills one scan's dataset from frames in any order, writing whole chunks when it can."""

    def __init__(self, group: h5py.Group, start: StartMessage, scan: int, comp: dict):
        self.ny, self.nx = start.scan_shape
        self.item = start.item_shape
        self.dtype = np.dtype(start.dtype).newbyteorder("<")
        frame_bytes = start.frame_nbytes
        self.bw = max(1, min(self.nx, CHUNK_BYTES // max(1, frame_bytes)))  # columns per block
        self.block_bytes = self.bw * frame_bytes
        self.ds = group.create_dataset(
            "data", shape=(self.ny, self.nx, *self.item), dtype=self.dtype,
            chunks=(1, self.bw, *self.item), fillvalue=0, **comp,
        )
        self.valid = np.zeros((self.ny, self.nx), dtype=bool)
        self.group = group
        self.scan = scan
        self.pending: dict[tuple[int, int], np.ndarray] = {}
        self.flushed: set[tuple[int, int]] = set()  # partially written blocks
        self.frames = 0
        self.duplicates = 0

    def _block(self, key: tuple[int, int]) -> np.ndarray:
        buf = self.pending.get(key)
        if buf is None:
            r, b = key
            c0, c1 = b * self.bw, min((b + 1) * self.bw, self.nx)
            if key in self.flushed:
                buf = self.ds[r, c0:c1]
                self.flushed.discard(key)
            else:
                buf = np.zeros((c1 - c0, *self.item), dtype=self.dtype)
            self.pending[key] = buf
        return buf

    def put(self, first: int, data: np.ndarray) -> None:
        idx, end, k = first, first + data.shape[0], 0
        while idx < end:
            r, c = divmod(idx, self.nx)
            b = c // self.bw
            c0, c1 = b * self.bw, min((b + 1) * self.bw, self.nx)
            n = min(end - idx, c1 - c)
            buf = self._block((r, b))
            buf[c - c0 : c - c0 + n] = data[k : k + n]
            row_valid = self.valid[r]
            self.duplicates += int(np.count_nonzero(row_valid[c : c + n]))
            row_valid[c : c + n] = True
            if row_valid[c0:c1].all():
                self.ds[r, c0:c1] = buf
                del self.pending[(r, b)]
            idx += n
            k += n
        self.frames += data.shape[0]
        if len(self.pending) * self.block_bytes > PENDING_BYTES:
            self.flush()

    def flush(self) -> None:
        for (r, b), buf in self.pending.items():
            c0 = b * self.bw
            self.ds[r, c0 : c0 + buf.shape[0]] = buf
            self.flushed.add((r, b))
        self.pending.clear()

    def finish(self, attrs: dict) -> None:
        self.flush()
        self.group.create_dataset("valid", data=self.valid)
        self.ds.attrs.update(attrs)
        self.ds.attrs["scan"] = self.scan
        self.ds.attrs["n_valid"] = int(self.valid.sum())


def _data_attrs(start: StartMessage) -> dict:
    cal = start.calibration
    step = cal.scan_step_nm
    attrs: dict = {
        "run_id": start.run_id,
        "detector": start.detector,
        "convergence_semiangle_mrad": cal.convergence_semiangle_mrad,
        "scan_step_nm": step,
        "scan_rotation_deg": cal.scan_rotation_deg,
        "high_tension_kv": cal.high_tension_kv,
    }
    for name in ("mrad_per_px", "disc_radius_px", "frame_time_s"):
        value = getattr(cal, name)
        if value is not None:
            attrs[name] = value
    if cal.disc_center_px is not None:
        attrs["disc_center_px"] = np.asarray(cal.disc_center_px, dtype=np.float64)
    if cal.segment_angles_mrad is not None:
        attrs["segment_angles_mrad"] = np.asarray(cal.segment_angles_mrad, dtype=np.float64)
    if start.detector == "pixelated":
        attrs["axes"] = ["scan_y", "scan_x", "det_y", "det_x"]
        if cal.mrad_per_px is not None:
            center = cal.disc_center_px or (0.0, 0.0)
            attrs["units"] = ["nm", "nm", "mrad", "mrad"]
            attrs["scale"] = np.array([step, step, cal.mrad_per_px, cal.mrad_per_px])
            attrs["offset"] = np.array([0.0, 0.0, -center[0] * cal.mrad_per_px, -center[1] * cal.mrad_per_px])
        else:
            attrs["units"] = ["nm", "nm", "px", "px"]
            attrs["scale"] = np.array([step, step, 1.0, 1.0])
            attrs["offset"] = np.zeros(4)
    else:
        attrs["axes"] = ["scan_y", "scan_x", "segment"]
        attrs["units"] = ["nm", "nm", ""]
        attrs["scale"] = np.array([step, step, 1.0])
        attrs["offset"] = np.zeros(3)
    return attrs


def export_hdf5(
    recording_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    scan: int | None = 0,
    all_scans: bool = False,
    run_id: str | None = None,
    compression: str | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Write one run of a recording as an HDF5 4D array (layout: module docstring).

    ``scan``: the scan of the series to export (0 = the first); None = the first scan that
    has frames in the recording. ``all_scans``: export every scan to /scan_NNNN/data instead.
    ``run_id``: the run to export; None = the first run with a start message.
    ``compression``: None, "gzip", "lzf" (built into HDF5) or "bitshuffle", "lz4", "zstd",
    "blosc" (hdf5plugin filters).
    ``overwrite``: replace an existing ``out_path`` (otherwise FileExistsError). The file is
    written as ``out_path + ".partial"`` and renamed when complete.

    Bad messages are skipped and counted (``ExportSummary.skipped``); a truncated recording
    exports every complete record and reports where it stopped. Raises RecordingError (a
    ValueError) naming the file when it is not a recording, has no start message for the
    run, or has no frames for the requested scan.
    """
    recording_path = Path(recording_path)
    out_path = Path(out_path)
    comp = _compression_kwargs(compression)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: export target exists; pass overwrite=True to replace it")
    tmp_path = out_path.with_name(out_path.name + ".partial")
    with RecordingReader(recording_path) as reader:
        h5 = h5py.File(tmp_path, "w")
        try:
            summary = _export(reader, h5, scan, all_scans, run_id, comp, out_path)
        except BaseException:
            h5.close()
            tmp_path.unlink(missing_ok=True)
            raise
        h5.close()
    os.replace(tmp_path, out_path)
    return summary


def _export(reader: RecordingReader, h5: h5py.File, scan_sel: int | None, all_scans: bool, run_sel: str | None,
            comp: dict, out_path: Path) -> ExportSummary:
    start: StartMessage | None = None
    writers: dict[int, _ScanWriter] = {}
    skipped: Counter = Counter()
    other: Counter = Counter()
    runs_seen: list[str] = []
    end_reason = None
    for rec in reader:
        try:
            msg = decode(rec.parts)
        except ProtocolError as exc:
            skipped[exc.reason] += 1
            continue
        if isinstance(msg, StartMessage):
            if msg.run_id not in runs_seen:
                runs_seen.append(msg.run_id)
            if start is None and (run_sel is None or msg.run_id == run_sel):
                start = msg
            elif start is not None and msg.run_id == start.run_id and msg != start:
                skipped["conflicting_start"] += 1
            continue
        if start is None:
            skipped["before_start"] += 1
            continue
        if msg.run_id != start.run_id:
            other["other_run"] += 1
            continue
        if isinstance(msg, EndMessage):
            end_reason = msg.reason
            continue
        assert isinstance(msg, FramesMessage)
        if msg.data.dtype.name != start.dtype or msg.data.shape[1:] != start.item_shape:
            skipped["mismatch"] += 1
            continue
        if msg.first + msg.count > start.n_positions:
            skipped["out_of_range"] += 1
            continue
        if not all_scans:
            if scan_sel is None:
                scan_sel = msg.scan
            if msg.scan != scan_sel:
                other["other_scan"] += 1
                continue
        w = writers.get(msg.scan)
        if w is None:
            group = h5.create_group(f"scan_{msg.scan:04d}") if all_scans else h5
            w = writers[msg.scan] = _ScanWriter(group, start, msg.scan, comp)
        w.put(msg.first, msg.data)

    path = reader.path
    if start is None:
        which = f"run {run_sel!r}" if run_sel is not None else "any run"
        seen = f" (runs with a start: {', '.join(map(repr, runs_seen))})" if runs_seen else ""
        raise RecordingError(
            f"{path}: no start message for {which}{seen}: cannot know the scan and frame shapes "
            f"(recording stopped at byte {reader.stop_offset}: {reader.stop_reason})"
        )
    if not writers:
        what = "any scan" if all_scans or scan_sel is None else f"scan {scan_sel}"
        raise RecordingError(
            f"{path}: run {start.run_id!r} has no frames for {what} "
            f"({other['other_scan']} frames messages of other scans; recording stopped at byte "
            f"{reader.stop_offset}: {reader.stop_reason})"
        )
    attrs = _data_attrs(start)
    summary = ExportSummary(
        recording=path, out_path=out_path, run_id=start.run_id, datasets=[], scans=sorted(writers),
        shape=(*start.scan_shape, *start.item_shape), dtype=start.dtype, skipped=skipped, other=other,
        end_reason=end_reason, stop_offset=reader.stop_offset, stop_reason=reader.stop_reason,
    )
    for s in sorted(writers):
        w = writers[s]
        w.finish(attrs)
        summary.datasets.append(w.ds.name)
        summary.frames_written += w.frames
        summary.duplicates += w.duplicates
        n_valid = int(w.valid.sum())
        summary.positions_valid += n_valid
        summary.positions_missing += w.valid.size - n_valid
    h5.attrs["livestereo_export_version"] = 1
    h5.attrs["source_recording"] = str(path)
    h5.attrs["run_id"] = start.run_id
    h5.attrs["start_message_json"] = json.dumps(start.model_dump(mode="json"))
    h5.attrs["end_reason"] = end_reason or "no end message"
    h5.attrs["recording_stop_reason"] = reader.stop_reason
    return summary
