"""Synthetic live-stream messages: for the window's tests, its benchmark and a look without a daemon.

:func:`dislocation_scan` builds the snapshot + dislocations (+ status) messages of a
pixelated stereo scan with known straight lines; :func:`particle_scan` the snapshot +
particles messages of a segmented scan. Both return the encoded multipart messages (what a
publisher sends) and the ground truth the tests check pixels against. numpy only.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from livestereo.protocol.live import encode_live


@dataclasses.dataclass
class SyntheticScan:
    messages: list[list[Any]]
    """Encoded multipart messages, in publishing order."""
    line_pixels: list[np.ndarray]
    """Per line, (n, 2) scan pixels (x = col, y = row) where it was detected."""
    next_pub_seq: int
    particles_xy: np.ndarray | None = None
    """(N, n_seg, 2) particle centres per segment, px (segmented scans)."""


def _disc_pattern(n: int = 64, n_det: int = 2) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    c, r = (n - 1) / 2, n * 0.3
    rr = np.hypot(yy - c, xx - c)
    pattern = np.where(rr < r, 1000.0, 20.0 * np.exp(-(rr - r) / 8)).astype(np.float32)
    regions = np.zeros((n, n), np.uint8)
    for k in range(n_det):
        ang = 2 * np.pi * k / n_det
        cy, cx = c + 0.55 * r * np.sin(ang), c + 0.55 * r * np.cos(ang)
        regions[np.hypot(yy - cy, xx - cx) < 0.3 * r] = k + 1
    return pattern, regions


def dislocation_scan(scan: int = 0, shape: tuple[int, int] = (256, 256), n_det: int = 2, fill: float = 1.0,
                     n_lines: int = 3, pub_seq: int = 0, run_id: str = "synthetic", thickness_nm: float = 100.0,
                     scan_step_nm: float = 1.0, seed: int = 0, binning: int = 1, status: bool = True,
                     orientation_U: np.ndarray | None = None, time_s: float | None = None) -> SyntheticScan:
    """A pixelated stereo scan with ``n_lines`` straight dislocations, the first ``fill`` of it scanned."""
    rng = np.random.default_rng(seed + 1000 * scan)
    ny, nx = shape
    h, w = ny // binning, nx // binning
    n_valid = int(round(fill * h * w))
    valid = np.zeros(h * w, bool)
    valid[:n_valid] = True
    valid = valid.reshape(h, w)
    yy, xx = np.mgrid[:h, :w]
    images = np.empty((n_det, h, w), np.float32)
    for k in range(n_det):
        images[k] = 100 + 30 * np.sin(xx / 9.0 + k) * np.cos(yy / 13.0) + rng.normal(0, 5, (h, w))
    images[:, ~valid] = 0
    prob = np.zeros((n_det, ny, nx), np.uint8)
    pts, pix, offsets, lines, truth = [], [], [0], [], []
    for i in range(n_lines):
        y0 = (i + 1) * ny / (n_lines + 1)
        x = np.arange(int(0.15 * nx), int(0.85 * nx))
        y = np.clip(np.round(y0 + 0.15 * (x - nx / 2) * (1 if i % 2 else -1)), 0, ny - 1).astype(np.int64)
        z = np.linspace(-0.4, 0.4, len(x)) * thickness_nm * (1 if i % 2 == 0 else -1)
        for k in range(n_det):
            prob[k, y, x] = 230
        pts.append(np.stack([x * scan_step_nm, y * scan_step_nm, z], axis=1))
        pix.append(np.stack([x, y], axis=1).astype(np.float32))
        truth.append(np.stack([x, y], axis=1))
        offsets.append(offsets[-1] + len(x))
        v = [0.5 * (i + 1), 0.0, 0.0]
        lines.append({"id": i, "track_id": 10 + i, "n_points": len(x), "length_nm": float(len(x) * scan_step_nm),
                      "z_range_nm": [float(z.min()), float(z.max())], "direction_uvw": [1, 1, 0],
                      "habit_plane": "(1-11)", "habit_hkl": [1, -1, 1], "displacement_nm": v,
                      "velocity_nm_s": v, "speed_nm_s": float(np.linalg.norm(v))})
    pattern, regions = _disc_pattern(64, n_det)
    t = time.time() if time_s is None else time_s
    snap = encode_live("snapshot", pub_seq, {
        "names": [f"view {k}" for k in range(n_det)], "roles": ["stereo"] * n_det,
        "centroids_mrad": [[10.0 * np.cos(2 * np.pi * k / n_det), 10.0 * np.sin(2 * np.pi * k / n_det)] for k in range(n_det)],
        "fill_fraction": fill, "final": fill >= 1.0, "complete": fill >= 1.0, "frames": n_valid * binning * binning,
        "detector": "pixelated", "disc_center_px": [31.5, 31.5], "disc_radius_px": 19.2, "scan_step_nm": scan_step_nm,
        "scan_shape": [ny, nx], "display_binning": binning,
    }, {"images": images, "valid": valid, "mean_pattern": pattern, "regions": regions},
        run_id=run_id, scan=scan, seq=n_valid, sent_time=t)
    data = {"latency_s": 0.12, "fill_fraction": fill, "final": fill >= 1.0, "thickness_nm": thickness_nm,
            "scan_step_nm": scan_step_nm, "scan_shape": [ny, nx], "thetas_mrad": [10.0, -10.0][:n_det],
            "view_indices": list(range(n_det)), "material": "gamma-TiAl", "lines": lines}
    if orientation_U is not None:
        data["orientation_U"] = np.asarray(orientation_U, np.float64).tolist()
    dis = encode_live("dislocations", pub_seq + 1, data, {
        "prob": prob, "line_points_nm": np.concatenate(pts).astype(np.float32),
        "line_pixels_px": np.concatenate(pix).astype(np.float32), "line_offsets": np.asarray(offsets, np.int64),
    }, run_id=run_id, scan=scan, seq=n_valid, sent_time=t)
    msgs = [snap, dis]
    if status:
        msgs.append(encode_live("status", pub_seq + 2, {
            "frames": n_valid, "frames_per_s": 12345.0, "gb_per_s": 1.6, "rejected": {}, "gaps": 0, "scans_done": scan,
            "publisher": {}, "inference": {"done": scan + 1, "skipped": 0, "errors": 0, "last_latency_s": 0.12}},
            run_id=run_id, scan=scan, sent_time=t))
    return SyntheticScan(msgs, truth, pub_seq + len(msgs))


def particle_scan(scan: int = 0, shape: tuple[int, int] = (128, 128), n_seg: int = 4, n: int = 12, pub_seq: int = 0,
                  run_id: str = "synthetic-np", thickness_nm: float = 60.0, scan_step_nm: float = 1.0,
                  seed: int = 0) -> SyntheticScan:
    """A segmented scan (n_seg segment images) with ``n`` particles inside the slab."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    xyz = np.stack([rng.uniform(15, nx - 15, n), rng.uniform(15, ny - 15, n),
                    rng.uniform(-thickness_nm / 2, thickness_nm / 2, n)], axis=1) * [scan_step_nm, scan_step_nm, 1.0]
    radius = rng.uniform(3.0, 6.0, n)
    shifts = np.array([[np.cos(2 * np.pi * s / n_seg), np.sin(2 * np.pi * s / n_seg)] for s in range(n_seg)]) * 0.03
    xy = xyz[:, None, :2] / scan_step_nm + shifts[None] * xyz[:, None, 2:3]
    yy, xx = np.mgrid[:ny, :nx]
    images = np.full((n_seg, ny, nx), 100.0, np.float32) + rng.normal(0, 3, (n_seg, ny, nx)).astype(np.float32)
    for s in range(n_seg):
        for p in range(n):
            images[s][np.hypot(xx - xy[p, s, 0], yy - xy[p, s, 1]) < radius[p] / scan_step_nm] += 60
    snap = encode_live("snapshot", pub_seq, {
        "names": [f"segment {s}" for s in range(n_seg)], "roles": ["segment"] * n_seg, "fill_fraction": 1.0,
        "final": True, "complete": True, "frames": ny * nx, "detector": "segmented", "scan_step_nm": scan_step_nm,
        "scan_shape": [ny, nx], "display_binning": 1}, {"images": images, "valid": np.ones((ny, nx), bool)},
        run_id=run_id, scan=scan, seq=0)
    par = encode_live("particles", pub_seq + 1, {"latency_s": 0.05, "final": True, "n": n, "thickness_nm": thickness_nm},
                      {"xyz_nm": xyz.astype(np.float32), "radius_nm": radius.astype(np.float32),
                       "sigma_z_nm": np.full(n, 2.0, np.float32), "flags": np.zeros(n, np.uint8),
                       "view_xy_px": xy.astype(np.float32)}, run_id=run_id, scan=scan, seq=0)
    return SyntheticScan([snap, par], [], pub_seq + 2, particles_xy=xy)
