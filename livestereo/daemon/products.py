"""What the accumulation stage hands downstream: partial snapshots and finished scans.

Every partial image travels with its valid mask and the run / scan / sequence numbers it
came from (design.md section 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from livestereo.protocol.messages import Calibration


@dataclasses.dataclass(frozen=True)
class LayoutInfo:
    """The virtual detectors the images were accumulated with."""

    names: tuple[str, ...]
    roles: tuple[str, ...]
    centroids_mrad: np.ndarray
    """(n_det, 2) weighted mean incident angle (theta_x, theta_y) per detector (mrad)."""
    weights: np.ndarray
    """(n_det, *item_shape) float32 detector weights."""
    disc_center_px: tuple[float, float] | None
    disc_radius_px: float | None

    @property
    def view_indices(self) -> list[int]:
        """Indices of the detectors that are stereo views (role 'view' or 'segment')."""
        return [i for i, r in enumerate(self.roles) if r in ("view", "segment")]


@dataclasses.dataclass(frozen=True)
class ScanImages:
    """The virtual images of one scan (partial while the scan runs, final after it)."""

    run_id: str
    scan: int
    """Scan number within the series (0, 1, 2, ...)."""
    seq: int
    """Sequence number of the last frames message accumulated."""
    images: np.ndarray
    """(n_det, ny, nx) float64 virtual images, detector-major."""
    valid: np.ndarray
    """(ny, nx) bool: scan positions that have been filled."""
    layout: LayoutInfo
    calibration: Calibration
    start_metadata: dict[str, Any]
    final: bool
    """True once the scan is finished (complete, or closed incomplete)."""
    complete: bool
    """True when every position was filled."""
    stats: dict[str, Any]
    """frames, duplicates, gaps, missing positions, timing (s since epoch)."""
    mean_pattern: np.ndarray | None = None
    """(det_y, det_x) float32 mean diffraction pattern of a sample of the run's frames (the
    first frame of every frames message), pixelated runs when the daemon was asked for it."""

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def centroids_mrad(self) -> np.ndarray:
        return self.layout.centroids_mrad

    @property
    def metadata(self) -> dict[str, Any]:
        return self.start_metadata

    @property
    def fill_fraction(self) -> float:
        return float(self.valid.mean()) if self.valid.size else 0.0
