"""Calibration of the segments' effective incident angles from a known focus change.

A feature at height dz above the crossover appears in segment X at r0 - theta_X * dz. Moving
the crossover by +focus_change_nm along the beam (+z) lowers every dz by that amount, so every
feature in segment X moves by

    shift_X = position in B - position in A = theta_X * 1e-3 * focus_change_nm / p   (px)

whatever its depth. Measuring shift_X per segment by sub-pixel cross-correlation
(skimage.registration.phase_cross_correlation with upsampling) gives theta_X up to a common
offset (stage drift between the two recordings shifts all segments alike).

Convention (default): the common offset is fixed so that the intensity-weighted mean of the
segment angles is zero, sum_X I_X theta_X = 0 with I_X the mean counts of segment X; it holds
for a BF disc centred on the detector. With ``remove_common_mode=False`` the raw angles are
returned (only for recordings known to be drift-free).

The result is a small TOML file (``save_segment_calibration``) with ``segment_angles_mrad``
[[theta_x, theta_y], ...] (mrad, scan axes), read back by ``load_segment_calibration``.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from livestereo.compute.particles.denoise import anscombe

__all__ = ["SegmentCalibration", "calibrate_segment_angles", "segment_shifts_px", "save_segment_calibration",
           "load_segment_calibration"]

CONVENTION = "intensity-weighted mean angle = 0"


class SegmentCalibration(BaseModel):
    """Effective incident angles of a segmented detector's segments (calibration file)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["livestereo segment calibration"] = "livestereo segment calibration"
    """File type tag."""

    n_segments: int = Field(ge=1)
    """Number of segments."""

    segment_angles_mrad: list[tuple[float, float]]
    """Effective incident angle (theta_x, theta_y) of each segment (mrad, scan axes)."""

    convention: str = CONVENTION
    """How the common offset of the angles was fixed."""

    focus_change_nm: float | None = None
    """Crossover of recording B minus that of A along the beam (+z), nm."""

    scan_step_nm: float | None = Field(default=None, gt=0)
    """Scan step of the calibration recordings (nm)."""

    shifts_px: list[tuple[float, float]] | None = None
    """Measured (x, y) shift of each segment from A to B (px), before removing the common mode."""

    common_shift_px: tuple[float, float] | None = None
    """Common-mode (x, y) shift removed (px): drift between the recordings."""

    created: str | None = None
    """UTC time the file was written (ISO 8601)."""

    sources: list[str] = Field(default_factory=list)
    """Files the calibration was measured from."""

    @model_validator(mode="after")
    def _check(self) -> "SegmentCalibration":
        if len(self.segment_angles_mrad) != self.n_segments:
            raise ValueError(f"segment_angles_mrad has {len(self.segment_angles_mrad)} entries but n_segments is {self.n_segments}")
        if not np.isfinite(np.asarray(self.segment_angles_mrad, float)).all():
            raise ValueError("segment_angles_mrad contains NaN or inf")
        return self

    @property
    def angles(self) -> np.ndarray:
        """(n_seg, 2) mrad."""
        return np.asarray(self.segment_angles_mrad, dtype=np.float64)


def _hann2(shape) -> np.ndarray:
    return np.hanning(shape[0])[:, None] * np.hanning(shape[1])[None, :]


def _prep(img: np.ndarray, highpass_px: float) -> np.ndarray:
    a = anscombe(img).astype(np.float64)
    a = a - ndimage.gaussian_filter(a, highpass_px, mode="reflect")
    return a * _hann2(a.shape)


def segment_shifts_px(images_a, images_b, upsample_factor: int = 100, highpass_px: float = 20.0,
                      centroid_radius_px: float | str | None = "auto") -> np.ndarray:
    """(n_seg, 2) shift (x, y) in px of each segment image from recording A to recording B
    (position in B minus position in A), by upsampled cross-correlation of Anscombe-transformed,
    high-passed, Hann-windowed images, refined to the centroid of the correlation peak within
    ``centroid_radius_px`` ('auto': 8 px + 3x the shift; None: the upsampled peak only; see
    _centroid_refine). Keep the focus change small enough that the blur (segment extent x
    focus change) stays below ~10 px: the residual bias is ~1 % at 200 nm, 20 mrad."""
    from skimage.registration import phase_cross_correlation

    a = np.asarray(images_a)
    b = np.asarray(images_b)
    if a.ndim != 3 or b.ndim != 3:
        raise ValueError(f"segment images must be (n_seg, ny, nx); got A {a.shape}, B {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"recordings A {a.shape} and B {b.shape} differ in shape (segments or scan size)")
    if 0 in a.shape:
        raise ValueError(f"segment images are empty (shape {a.shape})")
    for name, arr in (("A", a), ("B", b)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"recording {name} contains NaN or inf")
    out = np.zeros((a.shape[0], 2))
    for s in range(a.shape[0]):
        pa, pb = _prep(a[s], highpass_px), _prep(b[s], highpass_px)
        shift, _, _ = phase_cross_correlation(pa, pb, upsample_factor=upsample_factor, normalization=None)
        # shift registers B onto A: (row, col) = position in A - position in B
        d = np.array([-shift[1], -shift[0]])
        if centroid_radius_px == "auto":
            # the blur of a segment grows like its angular extent x focus change, about 2x the shift
            d = _centroid_refine(pa, pb, d, 8.0 + 3.0 * float(np.abs(d).max()))
        elif centroid_radius_px:
            d = _centroid_refine(pa, pb, d, float(centroid_radius_px))
        out[s] = d
    return out


def _centroid_refine(pa: np.ndarray, pb: np.ndarray, d0: np.ndarray, radius: float) -> np.ndarray:
    """Centroid (x, y) of the cross-correlation C(s) = sum_r a(r) b(r + s) within ``radius`` of d0,
    after subtracting the median of a ring around it: the shift of the contrast's centre of mass,
    which the peak misses when the two focus settings blur the features with asymmetric
    (segment-shaped) kernels."""
    C = np.fft.irfft2(np.conj(np.fft.rfft2(pa)) * np.fft.rfft2(pb), s=pa.shape)
    # divide by the overlap of the (Hann) apodisation at each lag: without it the correlation
    # carries a broad hump centred on zero lag that pulls the centroid towards no shift
    win = _hann2(pa.shape)
    E = np.fft.irfft2(np.abs(np.fft.rfft2(win)) ** 2, s=pa.shape)
    C = np.fft.fftshift(C / np.maximum(E, 1e-12 * E.max()))
    cy, cx = pa.shape[0] // 2, pa.shape[1] // 2
    yy, xx = np.mgrid[0:pa.shape[0], 0:pa.shape[1]]
    sx = xx - cx - d0[0]
    sy = yy - cy - d0[1]
    r = np.hypot(sx, sy)
    ring = (r > radius) & (r <= 1.5 * radius + 2)
    win = r <= radius
    if not ring.any() or not win.any():
        return d0
    w = np.clip(C[win] - np.median(C[ring]), 0, None)
    if w.sum() <= 0:
        return d0
    return np.array([d0[0] + (w * sx[win]).sum() / w.sum(), d0[1] + (w * sy[win]).sum() / w.sum()])


def calibrate_segment_angles(images_a, images_b, focus_change_nm: float, scan_step_nm: float, *,
                             remove_common_mode: bool = True, upsample_factor: int = 100,
                             centroid_radius_px: float | str | None = "auto", return_details: bool = False):
    """Effective segment angles (n_seg, 2) (theta_x, theta_y) mrad from two recordings of the same
    area at crossovers ``focus_change_nm`` apart (B minus A along +z).

    Args:
        images_a, images_b: (n_seg, ny, nx) segment images (counts) of recordings A and B.
        focus_change_nm: crossover height of B minus that of A (nm); must not be 0.
        scan_step_nm: p (nm).
        remove_common_mode: fix the common offset so that the intensity-weighted mean angle is 0.
        centroid_radius_px: see segment_shifts_px ("auto"; None: the correlation peak only, right
            for pure shifts up to ~1 % pull of the apodisation, biased by the asymmetric blur of segments).
        return_details: also return a dict with shifts_px, common_shift_px and intensities.
    """
    if not np.isfinite(focus_change_nm) or focus_change_nm == 0:
        raise ValueError(f"focus_change_nm must be a non-zero number, got {focus_change_nm!r}")
    if not (np.isfinite(scan_step_nm) and scan_step_nm > 0):
        raise ValueError(f"scan_step_nm must be a positive number, got {scan_step_nm!r}")
    shifts = segment_shifts_px(images_a, images_b, upsample_factor, centroid_radius_px=centroid_radius_px)
    inten = np.asarray(images_a, dtype=np.float64).mean(axis=(1, 2)) + np.asarray(images_b, dtype=np.float64).mean(axis=(1, 2))
    common = np.zeros(2)
    if remove_common_mode:
        if inten.sum() <= 0:
            raise ValueError("segment images have no counts: cannot weight the common mode")
        common = (inten[:, None] * shifts).sum(0) / inten.sum()
    theta = (shifts - common) * float(scan_step_nm) / float(focus_change_nm) * 1e3
    if return_details:
        return theta, {"shifts_px": shifts, "common_shift_px": common, "intensity": inten}
    return theta


def _fmt_pairs(a) -> str:
    return "[" + ", ".join(f"[{float(x):.6f}, {float(y):.6f}]" for x, y in np.asarray(a, float)) + "]"


def save_segment_calibration(path: str | Path, cal: SegmentCalibration) -> None:
    """Write ``cal`` as TOML (read back by load_segment_calibration)."""
    lines = [
        "# livestereo segment calibration: effective incident angle of each detector segment",
        "# (theta_x, theta_y) in mrad, scan axes. Read by the particle pipeline.",
        f'kind = "{cal.kind}"',
        f"n_segments = {cal.n_segments}",
        f"segment_angles_mrad = {_fmt_pairs(cal.segment_angles_mrad)}",
        f'convention = "{cal.convention}"',
    ]
    if cal.focus_change_nm is not None:
        lines.append(f"focus_change_nm = {float(cal.focus_change_nm)!r}")
    if cal.scan_step_nm is not None:
        lines.append(f"scan_step_nm = {float(cal.scan_step_nm)!r}")
    if cal.shifts_px is not None:
        lines.append(f"shifts_px = {_fmt_pairs(cal.shifts_px)}")
    if cal.common_shift_px is not None:
        lines.append(f"common_shift_px = [{cal.common_shift_px[0]:.6f}, {cal.common_shift_px[1]:.6f}]")
    created = cal.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines.append(f'created = "{created}"')
    srcs = ", ".join('"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"' for s in cal.sources)
    lines.append(f"sources = [{srcs}]")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_segment_calibration(path: str | Path, n_segments: int | None = None) -> SegmentCalibration:
    """Read a calibration file; ConfigError (a ValueError) naming the file and key if it is bad,
    ValueError if it has a different number of segments than ``n_segments``."""
    from livestereo.config import load_toml

    cal = load_toml(path, SegmentCalibration)
    if n_segments is not None and cal.n_segments != n_segments:
        raise ValueError(f"{path}: calibration has {cal.n_segments} segments but the detector has {n_segments}")
    return cal
