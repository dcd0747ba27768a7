"""The messages of livestereo stream v1 (design.md section 3), as Python objects.

Every source (the livestereo ZeroMQ stream, a recording, the simulator, a Merlin or
DECTRIS adapter) produces these three objects; the daemon consumes nothing else.

Axis conventions used throughout livestereo:
- scan positions are (row, col) = (y, x); ``scan_shape`` is (ny, nx) and the flat scan
  index is ``row * nx + col``;
- detector frames are (det_y, det_x) = (row, col);
- incident angles theta = (theta_x, theta_y) in mrad, in scan axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1

#: dtypes a frames message may carry (little-endian on the wire).
FRAME_DTYPES = ("uint8", "uint16", "uint32", "int16", "int32", "float32")


class Calibration(BaseModel):
    """What the daemon must know about the microscope and detector for one run."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    convergence_semiangle_mrad: float = Field(gt=0, le=500)
    """Probe convergence semi-angle alpha (mrad): the radius of the bright-field disc."""

    scan_step_nm: float = Field(gt=0, le=1e6)
    """Distance between neighbouring scan positions (nm); the pixel size p of the images."""

    mrad_per_px: float | None = Field(default=None, gt=0)
    """Angular size of one detector pixel (mrad/px); pixelated detectors only."""

    disc_center_px: tuple[float, float] | None = None
    """Centre of the BF disc on the detector as (row, col) (px); None: found from the data."""

    disc_radius_px: float | None = Field(default=None, gt=0)
    """Radius of the BF disc on the detector (px); None: found from the data."""

    scan_rotation_deg: float = 0.0
    """Rotation from detector axes to scan axes (deg, counter-clockwise)."""

    high_tension_kv: float = Field(default=300.0, gt=0)
    """Accelerating voltage (kV)."""

    segment_angles_mrad: tuple[tuple[float, float], ...] | None = None
    """Effective incident angle (theta_x, theta_y) of each segment (mrad); segmented only."""

    frame_time_s: float | None = Field(default=None, gt=0)
    """Dwell time per scan position (s); gives velocities in in-situ series."""

    def theta_of_pixel(self, rows: np.ndarray, cols: np.ndarray, center: tuple[float, float]):
        """Incident angle (theta_x, theta_y) in mrad of detector pixels (row, col), scan axes."""
        if self.mrad_per_px is None:
            raise ValueError("calibration has no mrad_per_px: cannot map detector pixels to angles")
        dx = (np.asarray(cols, dtype=np.float64) - center[1]) * self.mrad_per_px
        dy = (np.asarray(rows, dtype=np.float64) - center[0]) * self.mrad_per_px
        phi = np.deg2rad(self.scan_rotation_deg)
        c, s = np.cos(phi), np.sin(phi)
        return c * dx - s * dy, s * dx + c * dy


class StartMessage(BaseModel):
    """Opens a run: what the frames will look like and how to read them physically."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    type: Literal["start"] = "start"
    """Message type tag."""

    version: int
    """Protocol version; this daemon speaks 1."""

    run_id: str = Field(min_length=1, max_length=200)
    """Identifier of the run; every later message of the run repeats it."""

    detector: Literal["pixelated", "segmented"]
    """Pixelated (a diffraction pattern per position) or segmented (N values per position)."""

    scan_shape: tuple[int, int]
    """(ny, nx) scan positions per scan."""

    frame_shape: tuple[int, int] | None = None
    """(det_y, det_x) detector pixels per frame; pixelated only."""

    n_segments: int | None = None
    """Number of segments; segmented only."""

    dtype: Literal["uint8", "uint16", "uint32", "int16", "int32", "float32"]
    """Pixel dtype of every frames message of the run (little-endian)."""

    repeat: int = Field(default=1, ge=0)
    """Number of scans in the series (in-situ); 0 = until stopped."""

    calibration: Calibration
    """Microscope and detector calibration."""

    metadata: dict[str, Any] = Field(default_factory=dict)
    """Free-form description of the sample and acquisition (msgpack-serialisable)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> "StartMessage":
        if self.version != PROTOCOL_VERSION:
            raise ValueError(f"protocol version {self.version} is not supported (this daemon speaks {PROTOCOL_VERSION})")
        ny, nx = self.scan_shape
        if ny < 1 or nx < 1:
            raise ValueError(f"scan_shape {self.scan_shape} must be positive")
        if self.detector == "pixelated":
            if self.frame_shape is None:
                raise ValueError("a pixelated start needs frame_shape (det_y, det_x)")
            if min(self.frame_shape) < 1:
                raise ValueError(f"frame_shape {self.frame_shape} must be positive")
        else:
            if self.n_segments is None or self.n_segments < 1:
                raise ValueError("a segmented start needs n_segments >= 1")
            angles = self.calibration.segment_angles_mrad
            if angles is not None and len(angles) != self.n_segments:
                raise ValueError(
                    f"calibration has {len(angles)} segment angles but n_segments is {self.n_segments}"
                )
        return self

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one frame: (det_y, det_x) or (n_segments,)."""
        if self.detector == "pixelated":
            return tuple(self.frame_shape)  # type: ignore[arg-type]
        return (int(self.n_segments),)  # type: ignore[arg-type]

    @property
    def n_positions(self) -> int:
        """Scan positions per scan."""
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def frame_nbytes(self) -> int:
        """Bytes of one frame on the wire."""
        return int(np.prod(self.item_shape)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True, slots=True)
class FramesMessage:
    """``count`` consecutive frames of one scan, starting at flat scan index ``first``."""

    run_id: str
    seq: int
    """Message sequence number within the run (0, 1, 2, ...); a jump is a gap."""
    scan: int
    """Scan number within the series (0, 1, 2, ...)."""
    first: int
    """Flat scan index (row * nx + col) of the first frame."""
    data: np.ndarray
    """(count, *item_shape) frames; a read-only view of the received buffer where possible."""

    @property
    def count(self) -> int:
        return int(self.data.shape[0])


@dataclasses.dataclass(frozen=True, slots=True)
class EndMessage:
    """Closes a run."""

    run_id: str
    frames_sent: int
    reason: Literal["complete", "aborted"]


Message = StartMessage | FramesMessage | EndMessage
