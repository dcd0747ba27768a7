"""Messages of the live results stream built from the daemon's products (pure numpy).

Each ``*_message`` function returns ``(data, arrays, ids)`` for
:func:`livestereo.protocol.live.encode_live`; the layouts are documented in README.md
("Live results stream").  They run in the publisher's thread, never on the ingest thread.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from livestereo.daemon.products import LayoutInfo, ScanImages

MAX_IMAGE_SIDE = 512
"""Published virtual images are block-averaged so neither side exceeds this."""
MAX_PATTERN_SIDE = 256
"""Published mean diffraction pattern / region map: neither side exceeds this."""


def binning_for(shape: tuple[int, ...], max_side: int) -> int:
    return max(1, int(math.ceil(max(shape) / max_side)))


def bin_images(images: np.ndarray, valid: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Block means (n, h, w) float32 over the valid positions of f x f blocks, and the block
    valid mask (any valid position in the block)."""
    n, ny, nx = images.shape
    if f == 1:
        return np.where(valid, images, 0.0).astype(np.float32), valid.copy()
    H, W = -(-ny // f), -(-nx // f)
    im = np.zeros((n, H * f, W * f), np.float64)
    vm = np.zeros((H * f, W * f), np.float64)
    im[:, :ny, :nx] = np.where(valid, images, 0.0)
    vm[:ny, :nx] = valid
    s = im.reshape(n, H, f, W, f).sum(axis=(2, 4))
    c = vm.reshape(H, f, W, f).sum(axis=(1, 3))
    out = np.where(c > 0, s / np.maximum(c, 1), 0.0).astype(np.float32)
    return out, c > 0


def bin_mean(a: np.ndarray, f: int) -> np.ndarray:
    """f x f block mean of a 2D array (edge blocks padded with edge values)."""
    if f == 1:
        return a.astype(np.float32, copy=True)
    H, W = -(-a.shape[0] // f), -(-a.shape[1] // f)
    p = np.pad(a, ((0, H * f - a.shape[0]), (0, W * f - a.shape[1])), mode="edge")
    return p.reshape(H, f, W, f).mean(axis=(1, 3)).astype(np.float32)


def bin_max(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a.copy()
    lead = a.shape[:-2]
    H, W = -(-a.shape[-2] // f), -(-a.shape[-1] // f)
    p = np.zeros((*lead, H * f, W * f), a.dtype)
    p[..., : a.shape[-2], : a.shape[-1]] = a
    return p.reshape(*lead, H, f, W, f).max(axis=(-3, -1))


def region_map(layout: LayoutInfo) -> np.ndarray | None:
    """(det_y, det_x) uint8: 1 + index of the detector with the largest weight at each pixel
    (0 where no detector has a positive weight); None for segmented layouts."""
    w = np.asarray(layout.weights)
    if w.ndim != 3:
        return None
    best = np.argmax(w, axis=0)
    top = np.take_along_axis(w, best[None], axis=0)[0]
    return np.where(top > 0, best + 1, 0).astype(np.uint8)


def ids_of(snap: ScanImages) -> dict[str, Any]:
    return {"run_id": snap.run_id, "scan": snap.scan, "seq": snap.seq}


def snapshot_message(snap: ScanImages, *, regions_cache: dict | None = None):
    """``snapshot`` topic: the (binned) virtual images, valid mask, mean pattern, regions."""
    lay = snap.layout
    ny, nx = snap.valid.shape
    f = binning_for((ny, nx), MAX_IMAGE_SIDE)
    images, valid = bin_images(np.asarray(snap.images), np.asarray(snap.valid, bool), f)
    pixelated = np.asarray(lay.weights).ndim == 3
    data = {
        "names": list(lay.names), "roles": list(lay.roles),
        "centroids_mrad": np.asarray(lay.centroids_mrad, dtype=float).tolist(),
        "fill_fraction": snap.fill_fraction, "final": snap.final, "complete": snap.complete,
        "frames": int(snap.stats.get("frames", 0)),
        "detector": "pixelated" if pixelated else "segmented",
        "disc_center_px": list(lay.disc_center_px) if lay.disc_center_px is not None else None,
        "disc_radius_px": lay.disc_radius_px,
        "scan_step_nm": float(snap.calibration.scan_step_nm),
        "scan_shape": [ny, nx], "display_binning": f, "pattern_binning": None,
    }
    arrays: dict[str, np.ndarray] = {"images": images, "valid": valid}
    if pixelated:
        det_shape = np.asarray(lay.weights).shape[1:]
        g = binning_for(det_shape, MAX_PATTERN_SIDE)
        data["pattern_binning"] = g
        if snap.mean_pattern is not None:
            arrays["mean_pattern"] = bin_mean(np.asarray(snap.mean_pattern, np.float32), g)
        key = id(lay)
        reg = regions_cache.get(key) if regions_cache is not None else None
        if reg is None:
            full = region_map(lay)
            reg = full[::g, ::g].copy() if full is not None else None
            if regions_cache is not None:
                regions_cache.clear()
                regions_cache[key] = reg
        if reg is not None:
            arrays["regions"] = reg
    return data, arrays, ids_of(snap)


def particles_message(snap: ScanImages, table, latency_s: float):
    """``particles`` topic from a :class:`~livestereo.compute.particles.table.ParticleTable`."""
    n = len(table)
    data = {"latency_s": round(float(latency_s), 4), "final": snap.final, "fill_fraction": snap.fill_fraction, "n": n,
            "scan_step_nm": float(snap.calibration.scan_step_nm)}
    arrays = {
        "xyz_nm": np.stack([table.x_nm, table.y_nm, table.z_nm], axis=1).astype(np.float32) if n else np.zeros((0, 3), np.float32),
        "radius_nm": np.asarray(table.radius_nm, np.float32),
        "sigma_z_nm": np.asarray(table.sigma_z_nm, np.float32),
        "flags": np.asarray(table.flags),
        "view_xy_px": np.asarray(table.view_xy_px, np.float32),
    }
    return data, arrays, ids_of(snap)


def scan_done_message(scan: ScanImages, hdf5: str | None, extra: dict[str, Any]):
    """``scan_done`` topic: counts of the finished scan and what the analyses said about it."""
    st = scan.stats
    data = {"complete": scan.complete, "frames": st.get("frames"), "gaps": st.get("gaps"),
            "missing": st.get("positions_missing"), "duplicates": st.get("duplicates"),
            "started": st.get("started"), "finished": st.get("finished"), "hdf5": hdf5,
            "n_lines": None, "tracks": None}
    data.update(extra)
    return data, {}, ids_of(scan)
