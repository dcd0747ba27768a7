"""What the live window shows, computed from the live results stream: numpy only.

``ViewState`` folds decoded :class:`~livestereo.protocol.live.LiveMessage` objects in (the
newest message of each topic wins), counts the messages the publisher sent that never
arrived (gaps in ``pub_seq``) and turns the content into display-ready arrays:

- the mean diffraction pattern (log-scaled grey) with the outline of each virtual detector
  region drawn in that detector's colour;
- one RGBA image per virtual detector: contrast-stretched grey, the part of the scan not
  yet filled dimmed and hatched, the detected-dislocation probability drawn in
  :data:`OVERLAY_RGB` and, for segmented runs, each particle as a :data:`PARTICLE_RGB` circle;
- 3D line vertices coloured by depth (:func:`depth_colors`), the foil box, crystal axes
  when the orientation is known, particle positions;
- text: the header (run, scan, fill), per-dislocation velocities, the status line.

Everything heavy happens in :meth:`ViewState.feed` (the client thread calls it), so the
window's timer only copies finished arrays into textures. Missing keys never raise: what
is not there is not drawn. Nothing here imports vispy or zmq, so it is tested without GL.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any, Iterable, Sequence

import numpy as np

from livestereo.protocol.live import LiveMessage

MAX_DISPLAY_PX = 512
"""Images larger than this (either side) are block-averaged before they become textures."""

OVERLAY_RGB = (255, 40, 200)
"""Colour of the dislocation probability overlay (magenta: absent from grey and the depth map)."""
PARTICLE_RGB = (0, 255, 255)
"""Colour of the particle circles on the segment images."""
UNFILLED_RGB = ((18, 18, 30), (40, 40, 64))
"""The hatch of the not-yet-scanned part of an image (two stripe colours)."""
DETECTOR_COLORS = (
    (255, 80, 80), (80, 170, 255), (90, 230, 90), (255, 200, 40),
    (200, 120, 255), (255, 140, 60), (60, 230, 220), (240, 240, 240),
)
"""One colour per virtual detector: its region outline and its panel title."""
OVERLAY_THRESHOLD = 0.2
OVERLAY_MAX_ALPHA = 0.65
"""Opacity of the overlay where the line probability is 1: the image stays visible beneath
(contrast along a line is what a microscopist checks the detection against)."""
"""Probabilities below this are not drawn."""

_DEPTH_STOPS = np.array([  # deep (bottom of the foil) ... shallow (top): blue, cyan, green, yellow, red
    (0.20, 0.35, 1.00), (0.10, 0.85, 1.00), (0.25, 0.95, 0.30), (1.00, 0.90, 0.15), (1.00, 0.25, 0.15),
], dtype=np.float32)


def depth_colors(z: np.ndarray, z_range: tuple[float, float]) -> np.ndarray:
    """RGBA float32 (N, 4) for depths z, z_range[0] -> blue ... z_range[1] -> red (clipped)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    lo, hi = float(z_range[0]), float(z_range[1])
    t = np.clip((z - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.full(z.shape, 0.5)
    t = np.nan_to_num(t, nan=0.5) * (len(_DEPTH_STOPS) - 1)
    i = np.minimum(t.astype(np.int64), len(_DEPTH_STOPS) - 2)
    f = (t - i)[:, None].astype(np.float32)
    rgb = _DEPTH_STOPS[i] * (1 - f) + _DEPTH_STOPS[i + 1] * f
    return np.concatenate([rgb, np.ones((len(z), 1), np.float32)], axis=1)


# ---------------------------------------------------------------- image helpers


def _block_starts(n_in: int, n_out: int) -> np.ndarray:
    return (np.arange(n_out, dtype=np.int64) * n_in) // n_out


def resample(a: np.ndarray, shape: tuple[int, int], how: str = "max") -> np.ndarray:
    """2D array -> ``shape``: block max (``how="max"``) or block mean when shrinking, nearest when growing.

    Block max keeps a one-pixel line visible after binning, which nearest sampling would lose.
    """
    a = np.asarray(a)
    h, w = shape
    if a.shape == (h, w):
        return a
    out = a
    for axis, (n_in, n_out) in enumerate(zip(a.shape, (h, w))):
        if n_out < n_in:
            starts = _block_starts(n_in, n_out)
            if how == "max":
                out = np.maximum.reduceat(out, starts, axis=axis)
            else:
                counts = np.diff(np.append(starts, n_in)).astype(np.float32)
                sums = np.add.reduceat(out.astype(np.float32), starts, axis=axis)
                out = sums / (counts[:, None] if axis == 0 else counts[None, :])
        elif n_out > n_in:
            idx = np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)
            out = np.take(out, idx, axis=axis)
    return out


def display_shape(h: int, w: int, max_px: int = MAX_DISPLAY_PX) -> tuple[int, int]:
    """The texture size for an image of h x w: shrunk by an integer factor to fit max_px."""
    f = max(1, math.ceil(max(h, w) / max_px))
    return max(1, -(-h // f)), max(1, -(-w // f))


def stretch(img: np.ndarray, valid: np.ndarray | None = None, lo_pct: float = 1.0, hi_pct: float = 99.5) -> np.ndarray:
    """float32 in [0, 1]: img scaled between its lo/hi percentiles over the valid (filled) pixels."""
    img = np.asarray(img, dtype=np.float32)
    vals = img[valid] if valid is not None and valid.shape == img.shape and valid.any() else img.reshape(-1)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return np.zeros(img.shape, np.float32)
    if vals.size > 65536:  # percentiles on a subsample: same answer, a fraction of the time
        vals = vals[:: vals.size // 65536]
    lo, hi = np.percentile(vals, (lo_pct, hi_pct))
    if not hi > lo:
        lo, hi = float(vals.min()), float(vals.max())
    if not hi > lo:
        return np.full(img.shape, 0.5 if vals.size else 0.0, np.float32)
    out = (img - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False)


def grey_rgba(g: np.ndarray) -> np.ndarray:
    """float [0, 1] (h, w) -> uint8 RGBA (h, w, 4)."""
    v = (np.asarray(g, np.float32) * 255.0 + 0.5).astype(np.uint8)
    out = np.empty((*v.shape, 4), np.uint8)
    out[..., 0] = out[..., 1] = out[..., 2] = v
    out[..., 3] = 255
    return out


def hatch_unfilled(rgba: np.ndarray, valid: np.ndarray) -> None:
    """In place: pixels not yet scanned become a dark diagonal hatch."""
    if valid is None or valid.all():
        return
    h, w = valid.shape
    yy, xx = np.ogrid[:h, :w]
    width = max(1, round(max(h, w) / 128))  # stripes about 1/64 of the image across
    stripe = ((yy + xx) // width) % 2 == 0
    missing = ~valid
    a, b = UNFILLED_RGB
    rgba[missing & stripe, :3] = a
    rgba[missing & ~stripe, :3] = b


def blend(rgba: np.ndarray, alpha: np.ndarray, color: Sequence[int]) -> None:
    """In place: rgba = (1 - alpha) rgba + alpha color, alpha float (h, w) in [0, 1]."""
    m = alpha > 0
    if not m.any():
        return
    a = alpha[m][:, None]
    rgba[m, :3] = (rgba[m, :3] * (1 - a) + np.asarray(color, np.float32) * a + 0.5).astype(np.uint8)


def draw_circles(rgba: np.ndarray, xy: np.ndarray, radius: np.ndarray, color: Sequence[int]) -> None:
    """In place: one-pixel circle outlines centred at xy (N, 2; x = col, y = row), radius (N,) px."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    r = np.broadcast_to(np.asarray(radius, np.float64), (len(xy),))
    ok = np.isfinite(xy).all(axis=1) & np.isfinite(r)
    xy, r = xy[ok], np.maximum(r[ok], 2.0)
    if not len(xy):
        return
    n_ang = int(np.clip(np.ceil(2 * np.pi * r.max()), 16, 256))
    ang = np.linspace(0, 2 * np.pi, n_ang, endpoint=False)
    cols = np.rint(xy[:, :1] + r[:, None] * np.cos(ang)).astype(np.int64).reshape(-1)
    rows = np.rint(xy[:, 1:] + r[:, None] * np.sin(ang)).astype(np.int64).reshape(-1)
    h, w = rgba.shape[:2]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    rgba[rows[inside], cols[inside], :3] = color


def region_outlines(regions: np.ndarray) -> np.ndarray:
    """uint8 (h, w): the detector label (1 + index) on the border pixels of each region, else 0."""
    r = np.asarray(regions)
    edge = np.zeros(r.shape, bool)
    edge[1:, :] |= r[1:, :] != r[:-1, :]
    edge[:-1, :] |= r[:-1, :] != r[1:, :]
    edge[:, 1:] |= r[:, 1:] != r[:, :-1]
    edge[:, :-1] |= r[:, :-1] != r[:, 1:]
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    return np.where(edge & (r > 0), r, 0).astype(np.uint8)


def detector_color(i: int) -> tuple[int, int, int]:
    return DETECTOR_COLORS[i % len(DETECTOR_COLORS)]


# ---------------------------------------------------------------- display items


@dataclasses.dataclass(frozen=True)
class Panel:
    """One virtual image, ready to be a texture."""

    name: str
    color: tuple[int, int, int]
    rgba: np.ndarray  # (h, w, 4) uint8
    title: str


@dataclasses.dataclass(frozen=True)
class Scene3D:
    """What the 3D view draws, in nm (x, y in the scan frame, z relative to focus)."""

    box_lo: np.ndarray  # (3,)
    box_hi: np.ndarray  # (3,)
    line_pos: np.ndarray  # (P, 3) float32
    line_color: np.ndarray  # (P, 4) float32
    line_connect: np.ndarray  # (S, 2) uint32: segments inside each line, never across lines
    particle_pos: np.ndarray  # (N, 3) float32
    particle_color: np.ndarray  # (N, 4) float32
    particle_size_nm: np.ndarray  # (N,) float32 (diameter)
    crystal_axes: np.ndarray | None  # (3, 3): row i = crystal axis i in microscope coordinates, or None
    z_range: tuple[float, float]


def _box_for(data: dict[str, Any], snap: dict[str, Any], pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    step = _num(data.get("scan_step_nm")) or _num(snap.get("scan_step_nm")) or 1.0
    shape = data.get("scan_shape") or snap.get("scan_shape")
    if shape and len(shape) == 2:
        ext = (float(shape[1]) * step, float(shape[0]) * step)
    elif len(pts):
        ext = (float(np.nanmax(pts[:, 0])) + step, float(np.nanmax(pts[:, 1])) + step)
    else:
        ext = (256.0 * step, 256.0 * step)
    t = _num(data.get("thickness_nm"))
    if t and t > 0:
        zr = (-t / 2, t / 2)
    elif len(pts) and np.isfinite(pts[:, 2]).any():
        z = pts[:, 2][np.isfinite(pts[:, 2])]
        pad = max(1.0, 0.1 * float(z.max() - z.min()))
        zr = (float(z.min()) - pad, float(z.max()) + pad)
    else:
        zr = (-50.0, 50.0)
    return np.array([0.0, 0.0, zr[0]]), np.array([ext[0], ext[1], zr[1]]), zr


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt_rate(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f} M{unit}"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f} k{unit}"
    return f"{x:.1f}{(' ' + unit) if unit else ''}"


# ---------------------------------------------------------------- the state


#: topics carrying an analysis result (live previews and each finished scan's, ``final``)
RESULT_TOPICS = ("dislocations", "particles")


class ViewState:
    """The newest content of every topic plus display-ready arrays; thread-safe.

    ``feed`` / ``feed_batch`` (client thread) compute; ``pull`` (window timer) returns what
    changed since the caller's last pull, by version numbers.
    """

    def __init__(self, clock=time.time):
        self._lock = threading.Lock()
        self._clock = clock
        self.latest: dict[str, LiveMessage] = {}
        self.received = 0
        self.dropped = 0
        self.decode_errors = 0
        self.last_pub_seq: int | None = None
        self.last_receive_time: float | None = None
        self.scans_done: list[dict[str, Any]] = []
        self.n_scans_done = 0
        self.versions: dict[str, int] = {"pattern": 0, "panels": 0, "scene": 0, "header": 0, "info": 0}
        self.pattern: np.ndarray | None = None
        self.panels: list[Panel] = []
        self.scene: Scene3D | None = None
        self.header_text = "waiting for the live results stream..."
        self.info_text = ""
        self._base_panels: list[tuple[str, tuple[int, int, int], np.ndarray, np.ndarray | None, str]] = []
        self._panel_key: tuple | None = None
        self.changed = threading.Event()
        """Set after every batch folded in; the window's loop waits on it (and clears it)
        instead of polling, so a new result is drawn as soon as it is ready."""
        self.finals = 0
        """Final (per-scan) dislocation / particle results folded in so far."""
        self.hold_s = 1.0
        """Longest wait for a finished scan's result (see :meth:`holding`)."""
        self._hold: tuple[str | None, int, float] | None = None  # (run id, scan, until)

    # -- input

    def note_error(self) -> None:
        with self._lock:
            self.decode_errors += 1

    def count(self, msg: LiveMessage) -> None:
        """Count one received message (for drops) without folding it in."""
        with self._lock:
            self._count(msg)

    def _count(self, msg: LiveMessage) -> None:
        self.received += 1
        self.last_receive_time = self._clock()
        try:
            seq = int(msg.header.get("pub_seq"))
        except (TypeError, ValueError):
            return
        if self.last_pub_seq is not None and seq > self.last_pub_seq + 1:
            self.dropped += seq - self.last_pub_seq - 1
        # ZeroMQ keeps one publisher's order: a sequence going back means the publisher restarted
        self.last_pub_seq = seq

    def feed(self, msg: LiveMessage) -> None:
        """Count and fold in one message."""
        self.feed_batch([msg])

    def feed_batch(self, msgs: Iterable[LiveMessage]) -> None:
        """Count every message, fold in only the newest of each topic (scan_done: all of them)."""
        msgs = list(msgs)
        newest: dict[str, LiveMessage] = {}
        done: list[LiveMessage] = []
        with self._lock:
            for m in msgs:
                self._count(m)
                prev = newest.get(m.topic)
                if prev is not None and m.topic in RESULT_TOPICS and prev.data.get("final") and not m.data.get("final"):
                    # a finished scan's result followed, in the same batch, by a preview of the
                    # next scan: show the finished one (the next preview replaces it soon enough)
                    continue
                newest[m.topic] = m
                if m.topic == "scan_done":
                    done.append(m)
        # compute outside the lock (the window may pull meanwhile), publish under it
        for m in done:
            self._fold_scan_done(m)
        for topic in ("snapshot", "dislocations", "particles", "status"):
            if topic in newest:
                try:
                    getattr(self, f"_fold_{topic}")(newest[topic])
                except Exception:  # a malformed message must never take the window down
                    with self._lock:
                        self.decode_errors += 1
        self._update_texts()
        n_final = sum(1 for t in RESULT_TOPICS if t in newest and newest[t].data.get("final"))
        if n_final:
            with self._lock:
                self.finals += n_final
        self.changed.set()

    def holding(self) -> bool:
        """True while a finished scan's result is on its way: from the scan's final snapshot
        (in runs that have live results) until its final result or its ``scan_done`` arrives,
        at most ``hold_s``. The window draws nothing meanwhile, so its CPU goes to the daemon
        reconstructing that scan, and the scan's images and 3D result appear together."""
        with self._lock:
            h = self._hold
            if h is not None and self._clock() >= h[2]:
                self._hold = h = None
            return h is not None

    def _release(self, msg: LiveMessage) -> None:
        h = self._hold
        if h is not None and msg.run_id == h[0] and msg.scan is not None and msg.scan >= h[1]:
            self._hold = None

    # -- per topic

    def _maybe_new_run(self, msg: LiveMessage) -> None:
        old = self.latest.get("snapshot") or self.latest.get("dislocations") or self.latest.get("particles")
        if old is not None and msg.run_id is not None and old.run_id is not None and old.run_id != msg.run_id:
            with self._lock:
                for t in ("snapshot", "dislocations", "particles", "scan_done"):
                    self.latest.pop(t, None)
                self.scans_done.clear()
                self.scene = None
                self.versions["scene"] += 1

    def _fold_scan_done(self, msg: LiveMessage) -> None:
        self._maybe_new_run(msg)
        with self._lock:
            self._release(msg)
            self.latest["scan_done"] = msg
            self.scans_done.append({"scan": msg.scan, "run_id": msg.run_id, **msg.data})
            self.n_scans_done += 1
            del self.scans_done[:-1000]  # a long series: keep the newest

    def _fold_status(self, msg: LiveMessage) -> None:
        with self._lock:
            self.latest["status"] = msg

    def _fold_snapshot(self, msg: LiveMessage) -> None:
        self._maybe_new_run(msg)
        d, arr = msg.data, msg.arrays
        pattern = None
        mp = arr.get("mean_pattern")
        if mp is not None and mp.ndim == 2 and mp.size:
            m = np.log1p(np.maximum(np.asarray(mp, np.float32), 0))
            dh, dw = display_shape(*m.shape)
            pattern = grey_rgba(stretch(resample(m, (dh, dw), "mean"), lo_pct=0.5, hi_pct=99.9))
            reg = arr.get("regions")
            if reg is not None and reg.shape == mp.shape:
                lab = region_outlines(resample(reg, (dh, dw), "max"))
                for k in np.unique(lab[lab > 0]):
                    pattern[lab == k, :3] = detector_color(int(k) - 1)
        base = []
        images = arr.get("images")
        if images is not None and images.ndim == 3:
            names = list(d.get("names") or [])
            valid = arr.get("valid")
            h, w = images.shape[1:]
            dh, dw = display_shape(h, w)
            v = None
            if valid is not None and valid.shape == (h, w):
                v = resample(valid.astype(np.uint8), (dh, dw), "max").astype(bool)
            for i in range(images.shape[0]):
                name = str(names[i]) if i < len(names) else f"det {i}"
                img = resample(np.asarray(images[i], np.float32), (dh, dw), "mean")
                rgba = grey_rgba(stretch(img, v))
                if v is not None:
                    hatch_unfilled(rgba, v)
                base.append((name, detector_color(i), rgba, v, name))
        with self._lock:
            self.latest["snapshot"] = msg
            if d.get("final") and msg.scan is not None and any(
                    (r := self.latest.get(t)) is not None and r.run_id == msg.run_id for t in RESULT_TOPICS):
                self._hold = (msg.run_id, int(msg.scan), self._clock() + self.hold_s)
            if pattern is not None:
                self.pattern = pattern
                self.versions["pattern"] += 1
            self._base_panels = base
        self._compose_panels()

    def _fold_dislocations(self, msg: LiveMessage) -> None:
        self._maybe_new_run(msg)
        with self._lock:
            if msg.data.get("final"):
                self._release(msg)
            self.latest["dislocations"] = msg
        self._compose_panels()
        self._build_scene()

    def _fold_particles(self, msg: LiveMessage) -> None:
        self._maybe_new_run(msg)
        with self._lock:
            if msg.data.get("final"):
                self._release(msg)
            self.latest["particles"] = msg
        self._compose_panels()
        self._build_scene()

    # -- composition

    def _scan_shape(self) -> tuple[int, int] | None:
        for t in ("snapshot", "dislocations"):
            m = self.latest.get(t)
            if m is not None:
                s = m.data.get("scan_shape")
                if s and len(s) == 2:
                    return int(s[0]), int(s[1])
        m = self.latest.get("dislocations")
        if m is not None and m.arrays.get("prob") is not None and m.arrays["prob"].ndim == 3:
            return tuple(m.arrays["prob"].shape[1:])  # type: ignore[return-value]
        return None

    def _compose_panels(self) -> None:
        with self._lock:
            base = list(self._base_panels)
            snap = self.latest.get("snapshot")
            dis = self.latest.get("dislocations")
            par = self.latest.get("particles")
        if not base:
            return
        same_scan = (lambda m: m is not None and snap is not None and m.scan == snap.scan and m.run_id == snap.run_id)
        scan_shape = self._scan_shape()
        panels = []
        overlays: dict[int, np.ndarray] = {}
        if same_scan(dis):
            prob = dis.arrays.get("prob")
            if prob is not None and prob.ndim == 3:
                idx = list(dis.data.get("view_indices") or range(prob.shape[0]))
                for k in range(prob.shape[0]):
                    if k < len(idx) and idx[k] is not None:
                        overlays[int(idx[k])] = prob[k]
        circles = None
        if same_scan(par) and scan_shape is not None:
            xy = par.arrays.get("view_xy_px")
            if xy is not None and xy.ndim == 3 and xy.shape[-1] == 2:
                step = _num(snap.data.get("scan_step_nm")) or 1.0
                rad = par.arrays.get("radius_nm")
                r_px = np.asarray(rad, np.float64) / step if rad is not None and len(rad) == len(xy) else np.full(len(xy), 3.0)
                circles = (np.asarray(xy, np.float64), r_px)
        for i, (name, color, rgba, valid, title) in enumerate(base):
            out = rgba
            h, w = rgba.shape[:2]
            if i in overlays:
                p = resample(overlays[i], (h, w), "max").astype(np.float32) * (1 / 255.0)
                a = np.where(p >= OVERLAY_THRESHOLD, OVERLAY_MAX_ALPHA * (0.5 + 0.5 * p), 0.0).astype(np.float32)
                out = rgba.copy()
                blend(out, a, OVERLAY_RGB)
            if circles is not None and i < circles[0].shape[1]:
                sy, sx = h / scan_shape[0], w / scan_shape[1]
                if out is rgba:
                    out = rgba.copy()
                xy = circles[0][:, i, :] * (sx, sy)
                draw_circles(out, xy, circles[1] * sx, PARTICLE_RGB)
            panels.append(Panel(name, color, out, title))
        with self._lock:
            self.panels = panels
            self.versions["panels"] += 1

    def _build_scene(self) -> None:
        with self._lock:
            dis = self.latest.get("dislocations")
            par = self.latest.get("particles")
            snap = self.latest.get("snapshot")
        d = dis.data if dis is not None else (par.data if par is not None else {})
        sd = snap.data if snap is not None else {}
        pts = np.zeros((0, 3), np.float32)
        connect = np.zeros((0, 2), np.uint32)
        if dis is not None:
            p = dis.arrays.get("line_points_nm")
            off = dis.arrays.get("line_offsets")
            if p is not None and p.ndim == 2 and p.shape[1] == 3:
                pts = np.asarray(p, np.float32)
                if off is None or len(off) < 2:
                    off = np.array([0, len(pts)])
                off = np.clip(np.asarray(off, np.int64), 0, len(pts))
                segs = [np.stack([np.arange(a, b - 1), np.arange(a + 1, b)], axis=1) for a, b in zip(off[:-1], off[1:]) if b - a >= 2]
                connect = np.concatenate(segs).astype(np.uint32) if segs else connect
        ppos = np.zeros((0, 3), np.float32)
        psize = np.zeros((0,), np.float32)
        if par is not None:
            xyz = par.arrays.get("xyz_nm")
            if xyz is not None and xyz.ndim == 2 and xyz.shape[1] == 3:
                ppos = np.asarray(xyz, np.float32)
                rad = par.arrays.get("radius_nm")
                psize = (2 * np.asarray(rad, np.float32)) if rad is not None and len(rad) == len(ppos) else np.full(len(ppos), 4.0, np.float32)
        pd = dict(d)
        if "thickness_nm" not in pd and par is not None:
            pd["thickness_nm"] = par.data.get("thickness_nm")
        lo, hi, zr = _box_for(pd, sd, np.concatenate([pts, ppos]) if len(ppos) else pts)
        axes = None
        u = d.get("orientation_U")
        if u is not None:
            try:
                um = np.asarray(u, np.float64).reshape(3, 3)
                if np.isfinite(um).all():
                    axes = um / np.maximum(np.linalg.norm(um, axis=1, keepdims=True), 1e-12)
            except (ValueError, TypeError):
                axes = None
        scene = Scene3D(lo, hi, pts, depth_colors(pts[:, 2], zr) if len(pts) else np.zeros((0, 4), np.float32), connect,
                        ppos, depth_colors(ppos[:, 2], zr) if len(ppos) else np.zeros((0, 4), np.float32), psize, axes, zr)
        with self._lock:
            self.scene = scene
            self.versions["scene"] += 1

    def _update_texts(self) -> None:
        with self._lock:
            snap = self.latest.get("snapshot")
            dis = self.latest.get("dislocations")
            par = self.latest.get("particles")
            done = list(self.scans_done[-1:])
            sc = self.scene
        parts = []
        ref = snap or dis or par
        if ref is not None:
            parts.append(f"run {ref.run_id or '-'}")
            parts.append(f"scan {ref.scan if ref.scan is not None else '-'}")
        if snap is not None:
            sd = snap.data
            ff = _num(sd.get("fill_fraction"))
            if ff is not None:
                parts.append(f"filled {100 * ff:.0f} %")
            if sd.get("detector"):
                parts.append(str(sd["detector"]))
            if sd.get("final"):
                parts.append("final")
        if done:
            parts.append(f"last scan done: {done[-1].get('scan')}")
        header = " | ".join(parts) if parts else "waiting for the live results stream..."
        info_lines: list[str] = []
        if dis is not None:
            dd = dis.data
            lines = [ln for ln in (dd.get("lines") or []) if isinstance(ln, dict)]
            mat = dd.get("material")
            info_lines.append(f"scan {dis.scan}: {len(lines)} dislocation(s)" + (f" in {mat}" if mat else ""))
            for ln in lines[:10]:
                s = f"#{ln.get('id', '?')}"
                if ln.get("track_id") is not None:
                    s += f" track {ln['track_id']}"
                length = _num(ln.get("length_nm"))
                if length is not None:
                    s += f"  {length:.0f} nm"
                uvw = ln.get("direction_uvw")
                if uvw is not None and isinstance(uvw, (list, tuple)):
                    s += " [" + " ".join(str(int(round(float(c)))) if _num(c) is not None else "?" for c in uvw) + "]"
                speed = _num(ln.get("speed_nm_s"))
                vel = ln.get("velocity_nm_s")
                if speed is None and isinstance(vel, (list, tuple)) and all(_num(c) is not None for c in vel):
                    speed = float(np.linalg.norm(np.asarray(vel, np.float64)))
                if speed is not None:
                    s += f"  v = {speed:.2f} nm/s"
                    speed_xy = _num(ln.get("speed_xy_nm_s"))
                    if speed_xy is not None:
                        s += f" (in-plane {speed_xy:.2f})"
                info_lines.append(s)
            if len(lines) > 10:
                info_lines.append(f"... {len(lines) - 10} more")
        if par is not None:
            n = par.data.get("n")
            if n is None and par.arrays.get("xyz_nm") is not None:
                n = len(par.arrays["xyz_nm"])
            info_lines.append(f"scan {par.scan}: {n} particle(s)")
        if sc is not None and (len(sc.line_connect) or len(sc.particle_pos)):
            info_lines.append(f"colour = depth: blue {sc.z_range[0]:.0f} nm ... red {sc.z_range[1]:+.0f} nm")
        with self._lock:
            if header != self.header_text:
                self.header_text = header
                self.versions["header"] += 1
            info = "\n".join(info_lines)
            if info != self.info_text:
                self.info_text = info
                self.versions["info"] += 1

    # -- output

    def status_text(self, now: float | None = None) -> str:
        """The status line: frames/s, GB/s, dropped (publisher messages missed), latency, ages."""
        now = self._clock() if now is None else now
        with self._lock:
            st = self.latest.get("status")
            dis = self.latest.get("dislocations") or self.latest.get("particles")
            dropped, received, errors, last = self.dropped, self.received, self.decode_errors, self.last_receive_time
        parts = []
        if st is not None:
            sd = st.data
            parts.append(f"{_fmt_rate(_num(sd.get('frames_per_s')))} frames/s")
            gb = _num(sd.get("gb_per_s"))
            if gb is not None:
                parts.append(f"{gb:.2f} GB/s")
            if sd.get("frames") is not None:
                parts.append(f"frames {sd['frames']}")
            if sd.get("gaps"):
                parts.append(f"frame gaps {sd['gaps']}")
            if sd.get("rejected"):
                rej = sd["rejected"]
                parts.append(f"rejected {sum(rej.values()) if isinstance(rej, dict) else rej}")
            inf = sd.get("inference")
            if isinstance(inf, dict) and inf.get("skipped"):
                parts.append(f"inference skipped {inf['skipped']}")
        parts.append(f"dropped {dropped}")
        if dis is not None:
            lat = _num(dis.data.get("latency_s"))
            if lat is not None:
                parts.append(f"latency {lat:.2f} s")
        if last is not None:
            age = now - last
            if age > 2.0:
                parts.append(f"no message for {age:.0f} s")
        else:
            parts.append("nothing received")
        if errors:
            parts.append(f"bad messages {errors}")
        return " | ".join(parts)

    def pull(self, seen: dict[str, int]) -> dict[str, Any]:
        """What changed since ``seen`` (a dict the caller keeps; updated in place)."""
        out: dict[str, Any] = {}
        with self._lock:
            for key, ver in self.versions.items():
                if seen.get(key) != ver:
                    seen[key] = ver
                    out[key] = {"pattern": self.pattern, "panels": self.panels, "scene": self.scene,
                                "header": self.header_text, "info": self.info_text}[key]
        return out

    def scans_done_since(self, n: int) -> tuple[list[dict[str, Any]], int]:
        """The scan_done contents after the first ``n`` ever received (at most the newest 1000), and the total."""
        with self._lock:
            new = min(self.n_scans_done - n, len(self.scans_done))
            return (list(self.scans_done[-new:]) if new > 0 else []), self.n_scans_done

    def detector_kind(self) -> str | None:
        with self._lock:
            snap = self.latest.get("snapshot")
        return None if snap is None else snap.data.get("detector")
