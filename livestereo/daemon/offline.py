"""Accumulating a file offline through the same ingest code the live daemon runs."""

from __future__ import annotations

from pathlib import Path

from livestereo.compute.layouts import LayoutSpec
from livestereo.daemon.config import Limits
from livestereo.daemon.ingest import Ingest
from livestereo.daemon.products import ScanImages
from livestereo.daemon.sources import drain, open_source_url
from livestereo.protocol.messages import Calibration


def accumulate_file(
    path: str | Path,
    *,
    calibration: Calibration | None = None,
    layout: LayoutSpec | None = None,
    scan_shape: tuple[int, int] | None = None,
    limits: Limits | None = None,
    disc_frames: int = 32,
) -> list[ScanImages]:
    """Every scan of a recording / 4D file as virtual images (n_det, ny, nx), in scan order."""
    scans: list[ScanImages] = []
    ingest = Ingest(layout or LayoutSpec(), limits, disc_frames=disc_frames, on_scan=scans.append)
    source = open_source_url(str(path), calibration=calibration, scan_shape=scan_shape)
    try:
        drain(source, ingest.handle)
        ingest.flush("end of file")
    finally:
        source.close()
    if not scans:
        rejected = dict(ingest.counters.rejected)
        raise ValueError(f"{path}: no scan could be accumulated" + (f" (rejected messages: {rejected})" if rejected else ""))
    return scans
