"""``livestereo calibrate``: effective incident angles of a segmented detector's segments.

Record the same area twice with the probe crossover moved by a known amount between the two
recordings (B minus A, nm along the beam, +z = beam direction). Every feature in segment X
then moves by theta_X * focus_change / p whatever its depth; the shift of each segment image
between A and B (upsampled cross-correlation) gives theta_X up to a common offset (drift),
fixed so that the intensity-weighted mean angle is zero.

A and B are each one of

- a ``.npy`` array of segment images (n_seg, ny, nx);
- an HDF5 file (``.h5``/``.hdf5``) holding one 3D dataset (n_seg, ny, nx), or name it with
  ``--dataset``;
- a livestereo recording of a segmented run (every scan in it is summed).

The output TOML (``-o``, default calib.toml) has ``segment_angles_mrad = [[theta_x, theta_y], ...]``
(mrad, scan axes) and is what ``livestereo.compute.particles.load_segment_calibration`` and the
particle pipeline read.

Example::

    livestereo calibrate --a focus0.lsrec --b focus300.lsrec --focus-change-nm 300 -o calib.toml

Precision (simulated, 512x512 scan, 400 particles, 5 e/A^2): ~0.1 mrad rms at 200-400 nm focus
change. Choose the change so that every segment moves a few px (theta x change / p) while the
blur (segment extent x change) stays below ~10 px.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

NAME = "calibrate"
HELP = "measure the effective angles of a segmented detector's segments from two recordings at a known focus change"
DESCRIPTION = __doc__


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, metavar="A", help="recording A: .npy (n_seg, ny, nx), HDF5, or livestereo recording")
    p.add_argument("--b", required=True, metavar="B", help="recording B, crossover moved by --focus-change-nm")
    p.add_argument("--focus-change-nm", required=True, type=float, metavar="DZ",
                   help="crossover height of B minus that of A (nm, along the beam); not 0")
    p.add_argument("--scan-step-nm", type=float, metavar="P",
                   help="scan step p (nm); default: from the recordings' start message")
    p.add_argument("--dataset", help="HDF5 dataset path holding the (n_seg, ny, nx) images (both files)")
    p.add_argument("--raw", action="store_true",
                   help="keep the common-mode shift (no drift between A and B); default: intensity-weighted mean angle = 0")
    p.add_argument("-o", "--output", default="calib.toml", help="calibration TOML to write (default calib.toml)")


def load_segment_images(path: str | Path, dataset: str | None = None) -> tuple[np.ndarray, float | None]:
    """(n_seg, ny, nx) float64 segment images of a .npy, HDF5 or livestereo recording, and the
    scan step (nm) if the file says it. ValueError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        arr = np.load(path, allow_pickle=False)
        return _check3d(arr, str(path)), None
    if head.startswith(b"\x89HDF"):
        import h5py

        with h5py.File(path, "r") as f:
            if dataset is not None:
                if dataset not in f:
                    raise ValueError(f"{path}: no dataset {dataset!r}")
                arr = np.asarray(f[dataset])
                step = f[dataset].attrs.get("scan_step_nm", f.attrs.get("scan_step_nm"))
            else:
                found = []
                f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 3 else None)
                if len(found) != 1:
                    raise ValueError(f"{path}: {'no' if not found else len(found)} 3D datasets "
                                     f"{found if found else ''}; name the (n_seg, ny, nx) one with --dataset")
                arr = np.asarray(f[found[0]])
                step = f[found[0]].attrs.get("scan_step_nm", f.attrs.get("scan_step_nm"))
        return _check3d(arr, str(path)), (float(step) if step is not None else None)
    if head.startswith(b"LSREC"):
        return _from_recording(path)
    raise ValueError(f"{path}: not a .npy, HDF5 or livestereo recording file")


def _check3d(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim != 3:
        raise ValueError(f"{name}: segment images must be (n_seg, ny, nx), got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise ValueError(f"{name}: segment images must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _from_recording(path: Path) -> tuple[np.ndarray, float | None]:
    from livestereo.protocol.codec import ProtocolError, decode
    from livestereo.protocol.messages import FramesMessage, StartMessage
    from livestereo.recording.format import RecordingReader

    start = None
    acc = filled = None
    with RecordingReader(path) as reader:
        for rec in reader:
            try:
                msg = decode(rec.parts)
            except ProtocolError:
                continue
            if isinstance(msg, StartMessage):
                if start is not None:
                    break  # one run only
                if msg.detector != "segmented":
                    raise ValueError(f"{path}: a {msg.detector} run; calibrate needs segment images (segmented detector)")
                start = msg
                acc = np.zeros((msg.n_positions, msg.n_segments))
                filled = np.zeros(msg.n_positions, dtype=bool)
            elif isinstance(msg, FramesMessage) and start is not None and msg.run_id == start.run_id:
                stop = msg.first + msg.count
                if stop > start.n_positions or msg.data.shape[1:] != (start.n_segments,):
                    continue
                acc[msg.first:stop] += msg.data
                filled[msg.first:stop] = True
    if start is None:
        raise ValueError(f"{path}: the recording holds no start message of a segmented run")
    if not filled.all():
        raise ValueError(f"{path}: the recording covers only {int(filled.sum())} of {start.n_positions} scan positions")
    ny, nx = start.scan_shape
    return acc.T.reshape(start.n_segments, ny, nx), start.calibration.scan_step_nm


def run(args) -> int:
    from livestereo.compute.particles.calibration import (
        CONVENTION,
        SegmentCalibration,
        calibrate_segment_angles,
        save_segment_calibration,
    )

    try:
        a, step_a = load_segment_images(args.a, args.dataset)
        b, step_b = load_segment_images(args.b, args.dataset)
        step = args.scan_step_nm or step_a or step_b
        if step is None:
            raise ValueError("the scan step is not in the files: give --scan-step-nm")
        theta, det = calibrate_segment_angles(a, b, args.focus_change_nm, step,
                                              remove_common_mode=not args.raw, return_details=True)
    except ValueError as exc:
        print(f"livestereo calibrate: {exc}", file=sys.stderr)
        return 2
    cal = SegmentCalibration(
        n_segments=len(theta), segment_angles_mrad=[tuple(map(float, t)) for t in theta],
        convention=CONVENTION if not args.raw else "raw (no common-mode removal)",
        focus_change_nm=float(args.focus_change_nm), scan_step_nm=float(step),
        shifts_px=[tuple(map(float, s)) for s in det["shifts_px"]],
        common_shift_px=tuple(map(float, det["common_shift_px"])),
        sources=[str(args.a), str(args.b)],
    )
    save_segment_calibration(args.output, cal)
    print(f"segment angles (mrad, scan axes; {cal.convention}):")
    for k, ((tx, ty), (sx, sy)) in enumerate(zip(theta, det["shifts_px"])):
        print(f"  segment {k}: theta = ({tx:8.3f}, {ty:8.3f}) mrad  |theta| = {np.hypot(tx, ty):7.3f}  shift = ({sx:7.3f}, {sy:7.3f}) px")
    print(f"common shift (drift) {det['common_shift_px'][0]:.3f}, {det['common_shift_px'][1]:.3f} px; wrote {args.output}")
    return 0
