"""Dislocations tracked through an in-situ series: stable identities, displacement, velocity.

Each completed scan's 3D lines are matched to the tracks of the previous scans by a
minimum-cost assignment (``scipy.optimize.linear_sum_assignment``) on a curve distance:
the median distance of each point of one curve to the other curve (point-to-curve, on a
densely resampled polyline), taken in both directions and averaged; pairs farther apart
than ``max_distance_nm`` (the gate) are never matched.  A matched line continues its
track; an unmatched line starts a new track (new id); a track without a match for more
than ``max_missed`` scans ends (kept in the history, never reused).

Fragments: a dislocation is often detected in pieces (a stretch too faint in one scan).
An unmatched line whose points lie along the previous curve of a track that another line
continues (median distance within the gate), while lying beside that line rather than
alongside it (median distance to it beyond the gate: a parallel line that close is a
neighbour in a pile-up), becomes a "fragment" of that track: same id.  The track's curve
for the next scan's matching is then all its pieces (no segment bridges the gaps), and a
step's motion is measured from the nearest previous piece; the track's own motion
(displacements, speeds in the summary) counts its one-to-one line only.  On the
simulator's in-situ series this halved the identities lost (tools/eval_tracking.py).

Motion: ``displacement_nm`` (3,) is the mean vector from each point of the previous curve
to its nearest point of the new one, averaged with the same in the other direction, over
the points whose nearest point is not a curve end (so a line that grows or shrinks at its
ends does not bias it).  It is the motion **perpendicular to the line**: a shift along a
line's own direction is not observable.  ``velocity_nm_s`` = displacement / dt and
``speed_nm_s`` its length, with dt the time between the scans' mid-times (s).  The centroid
shift is reported as well (``centroid_shift_nm``), but it moves whenever the visible part
of a line changes.

Uncertainty: given the lines' per-point depth uncertainty, a step's z velocity gets a 1-sigma
``velocity_sigma_z_nm_s`` = sqrt(s_old^2 + s_new^2) / dt, s being a line's median point
sigma: the depth errors along a line are correlated over tens of points (smooth disparity
biases), so averaging over its points does not shrink them.

numpy / scipy, with the nearest-point queries and projections as numba kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numba
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

_BIG = 1e9
#: nearest-point queries of up to this many point pairs are answered by brute force: for
#: curves of a few hundred points that is ~10x faster than a KD-tree query (per-call cost)
_BRUTE_MAX_PAIRS = 4_000_000


@numba.njit(nogil=True, cache=True)
def _nearest_brute(pts, ref):
    """(distance, index) of the nearest row of ``ref`` (m, 3) to each row of ``pts`` (n, 3);
    ties go to the lowest index."""
    n = pts.shape[0]
    m = ref.shape[0]
    dist = np.empty(n)
    idx = np.empty(n, np.int64)
    for i in range(n):
        best = np.inf
        bj = 0
        for j in range(m):
            dx = pts[i, 0] - ref[j, 0]
            dy = pts[i, 1] - ref[j, 1]
            dz = pts[i, 2] - ref[j, 2]
            d2 = dx * dx + dy * dy + dz * dz
            if d2 < best:
                best = d2
                bj = j
        dist[i] = np.sqrt(best)
        idx[i] = bj
    return dist, idx


@numba.njit(nogil=True, cache=True, fastmath=True)
def _nearest_dist_brute(pts, ref):
    """Distance of each point ``pts[:, i]`` (3, n) to the nearest point ``ref[:, j]`` (3, m):
    coordinates in rows and a min reduction without the index, so the inner loop vectorises."""
    n = pts.shape[1]
    m = ref.shape[1]
    rx, ry, rz = ref[0], ref[1], ref[2]
    dist = np.empty(n)
    for i in range(n):
        px, py, pz = pts[0, i], pts[1, i], pts[2, i]
        best = np.inf
        for j in range(m):
            dx = px - rx[j]
            dy = py - ry[j]
            dz = pz - rz[j]
            best = min(best, dx * dx + dy * dy + dz * dz)
        dist[i] = np.sqrt(best)
    return dist


@numba.njit(nogil=True, cache=True)
def _project_near(pts, dense, scale, idx, seg_ok):
    """For each point (n, 3): the nearest of dense[idx] and its orthogonal projections onto
    the two segments beside it (clamped to them), nearest in the metric scaled by ``scale``;
    segment ``lo -> lo + 1`` only where ``seg_ok[lo]`` (not between two pieces of a curve)."""
    n = pts.shape[0]
    m = dense.shape[0]
    out = np.empty((n, 3))
    f = np.empty(3)
    for k in range(n):
        i = idx[k]
        bd = 0.0
        for c in range(3):
            out[k, c] = dense[i, c]
            e = (pts[k, c] - dense[i, c]) * scale[c]
            bd += e * e
        for lo in (i - 1, i):
            if lo < 0 or lo + 1 >= m or not seg_ok[lo]:
                continue
            l2 = 0.0
            dot = 0.0
            for c in range(3):
                ab = dense[lo + 1, c] - dense[lo, c]
                l2 += ab * ab
                dot += (pts[k, c] - dense[lo, c]) * ab
            t = min(max(dot / l2 if l2 > 0 else 0.0, 0.0), 1.0)
            d = 0.0
            for c in range(3):
                f[c] = dense[lo, c] + t * (dense[lo + 1, c] - dense[lo, c])
                e = (pts[k, c] - f[c]) * scale[c]
                d += e * e
            if d < bd:
                bd = d
                for c in range(3):
                    out[k, c] = f[c]
    return out


@numba.njit(nogil=True, cache=True)
def _median_nearest_dist(pts, ref):
    """np.median of :func:`_nearest_dist_brute` (one call instead of two)."""
    return np.median(_nearest_dist_brute(pts, ref))


def resample_polyline(points: np.ndarray, spacing: float) -> np.ndarray:
    """(n, 3) polyline resampled at a uniform arc-length spacing <= ``spacing`` (ends kept)."""
    pts = np.asarray(points, dtype=np.float64)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < 2:
        return pts.copy()
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    if s[-1] <= 0:
        return pts[:1].copy()
    n = int(np.ceil(s[-1] / spacing)) + 1
    t = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(t, s, pts[:, k]) for k in range(pts.shape[1])], axis=1)


def warm_kernels() -> None:
    """Compile (or load from numba's cache) the nearest-point kernels now, at start-up: the
    first tracked scan would otherwise wait for them (~0.2 s from the cache, ~2 s without)."""
    a = np.zeros((2, 3))
    a[1, 0] = 1.0
    t = np.ascontiguousarray(a.T)
    _nearest_dist_brute(t, t)
    _median_nearest_dist(t, t)
    _, idx = _nearest_brute(a, a)
    _project_near(a, a, np.ones(3), idx, np.ones(1, np.bool_))


class _Curve:
    """A curve prepared for distance queries: dense points, z-scaled copies (rows and
    columns) for the compiled kernels, and a KD tree built only for very long curves.

    A track's curve may be several pieces (a dislocation seen as fragments): their dense
    samples one after the other, ``seg_ok`` False between pieces, ``end`` marking every
    piece's ends (see :meth:`union`)."""

    def __init__(self, points: np.ndarray, spacing: float, z_weight: float, closed: bool = False):
        dense = resample_polyline(np.asarray(points, dtype=np.float64), spacing)
        if len(dense) == 0:
            raise ValueError("a curve needs at least one finite point")
        n = len(dense)
        end = np.zeros(n, bool)
        if not closed and n > 2:
            k = max(1, int(np.ceil(1.0 / spacing)))  # samples within ~1 nm of each end
            end[:k] = True
            end[-k:] = True
        self._set(dense, end, np.ones(max(n - 1, 0), bool), np.array([1.0, 1.0, z_weight]))

    def _set(self, dense: np.ndarray, end: np.ndarray, seg_ok: np.ndarray, scale: np.ndarray) -> None:
        self.dense, self.end, self.seg_ok, self.scale = dense, end, seg_ok, scale
        self.scaled = np.ascontiguousarray(dense * scale)
        self.scaled_t = np.ascontiguousarray(self.scaled.T)  # (3, n) for the brute-force distances
        self._tree: cKDTree | None = None  # built when a query is too large for brute force
        self.centroid = dense.mean(axis=0)
        self.lo, self.hi = self.scaled.min(axis=0), self.scaled.max(axis=0)
        self.length = float(np.sum(np.linalg.norm(np.diff(dense, axis=0), axis=1)[seg_ok])) if len(dense) > 1 else 0.0

    @classmethod
    def union(cls, pieces: Sequence[_Curve]) -> _Curve:
        """One curve of several pieces (the same z weight), for the next scan's matching."""
        if len(pieces) == 1:
            return pieces[0]
        out = cls.__new__(cls)
        seg_ok = np.concatenate([np.append(p.seg_ok, False) for p in pieces])[:-1]
        out._set(np.concatenate([p.dense for p in pieces]), np.concatenate([p.end for p in pieces]), seg_ok,
                 pieces[0].scale)
        return out

    def _query(self, pts: np.ndarray) -> tuple[np.ndarray, bool]:
        """(the points (n, 3) in the scaled metric, whether brute force answers for them)."""
        q = np.asarray(pts, dtype=np.float64).reshape(-1, 3) * self.scale
        return q, len(q) * len(self.scaled) <= _BRUTE_MAX_PAIRS

    def _tree_query(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._tree is None:
            self._tree = cKDTree(self.scaled)
        return self._tree.query(q)

    def nearest(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distances in the scaled metric, indices into dense) of each point."""
        q, brute = self._query(pts)
        return _nearest_brute(np.ascontiguousarray(q), self.scaled) if brute else self._tree_query(q)

    def distance(self, pts: np.ndarray) -> np.ndarray:
        """Distance in the scaled metric of each point to the nearest dense sample."""
        q, brute = self._query(pts)
        return _nearest_dist_brute(np.ascontiguousarray(q.T), self.scaled_t) if brute else self._tree_query(q)[0]

    def median_distance(self, pts: np.ndarray) -> float:
        """Median over the points of :meth:`distance`."""
        q, brute = self._query(pts)
        if brute:
            return float(_median_nearest_dist(np.ascontiguousarray(q.T), self.scaled_t))
        return float(np.median(self._tree_query(q)[0]))

    def foot(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(nearest point on the polyline (n, 3), index of the nearest dense sample) of each point:
        the orthogonal projection onto the segments next to the nearest sample."""
        pts = np.ascontiguousarray(pts, dtype=np.float64).reshape(-1, 3)
        _, i = self.nearest(pts)
        return _project_near(pts, self.dense, self.scale, np.asarray(i, dtype=np.int64), self.seg_ok), i


def curve_distance(a: _Curve, b: _Curve) -> tuple[float, float]:
    """(median distance a -> b, median distance b -> a), scaled metric (nm)."""
    return b.median_distance(a.dense), a.median_distance(b.dense)


def curve_displacement(old: _Curve, new: _Curve) -> np.ndarray:
    """Mean perpendicular motion (3,) nm from ``old`` to ``new`` (see the module docstring)."""
    vecs = []
    f, i = new.foot(old.dense)              # old point -> nearest point of the new curve
    keep = ~new.end[i]
    if keep.any():
        vecs.append((f - old.dense)[keep])
    f, j = old.foot(new.dense)              # new point -> nearest point of the old curve
    keep = ~old.end[j]
    if keep.any():
        vecs.append((new.dense - f)[keep])
    if not vecs:
        return new.centroid - old.centroid
    return np.mean([v.mean(axis=0) for v in vecs], axis=0)


@dataclasses.dataclass
class TrackStep:
    """What tracking says about one line of a scan."""

    line_index: int
    """Index of the line in the list given to :meth:`LineTracker.update`."""
    track_id: int
    status: str
    """"new" (first seen in this scan), "continued" (the track's one-to-one line) or
    "fragment" (a further piece of the track's dislocation in this scan)."""
    distance_nm: float | None = None
    """Matching cost to the track's previous curve (nm), None for a new track."""
    dt_s: float | None = None
    """Time since the track was last seen (s)."""
    displacement_nm: np.ndarray | None = None
    """(3,) perpendicular motion since the track was last seen (nm)."""
    centroid_shift_nm: np.ndarray | None = None
    velocity_nm_s: np.ndarray | None = None
    speed_nm_s: float | None = None
    speed_xy_nm_s: float | None = None
    """Length of the velocity's (x, y) part: the motion seen in the image plane, free of the
    depth error that dominates ``speed_nm_s`` when lines move by a few nm per scan."""
    velocity_sigma_z_nm_s: float | None = None
    """1-sigma uncertainty of the velocity's z part (nm/s) from the two lines' depth
    uncertainties (module docstring); None where either is unknown or there is no dt."""

    def to_json_dict(self) -> dict[str, Any]:
        def r(x, nd=4):
            return None if x is None else np.round(np.asarray(x, dtype=float), nd).tolist()

        return {"line_index": int(self.line_index), "track_id": int(self.track_id), "status": self.status,
                "distance_nm": r(self.distance_nm), "dt_s": r(self.dt_s, 6), "displacement_nm": r(self.displacement_nm),
                "centroid_shift_nm": r(self.centroid_shift_nm), "velocity_nm_s": r(self.velocity_nm_s),
                "speed_nm_s": r(self.speed_nm_s), "speed_xy_nm_s": r(self.speed_xy_nm_s),
                "velocity_sigma_z_nm_s": r(self.velocity_sigma_z_nm_s)}


@dataclasses.dataclass
class Track:
    """One dislocation followed through the series."""

    id: int
    scans: list[int] = dataclasses.field(default_factory=list)
    times_s: list[float] = dataclasses.field(default_factory=list)
    centroids_nm: list[np.ndarray] = dataclasses.field(default_factory=list)
    lengths_nm: list[float] = dataclasses.field(default_factory=list)
    displacements_nm: list[np.ndarray] = dataclasses.field(default_factory=list)
    """(3,) per continuation (one fewer than scans)."""
    speeds_nm_s: list[float] = dataclasses.field(default_factory=list)
    speeds_xy_nm_s: list[float] = dataclasses.field(default_factory=list)
    velocity_sigmas_z_nm_s: list[float] = dataclasses.field(default_factory=list)
    """Per continuation where both lines had a depth sigma: the z velocity's 1-sigma (nm/s)."""
    ended: bool = False
    missed: int = 0
    curve: _Curve | None = dataclasses.field(default=None, repr=False)
    """The last scan's curve for matching: all the track's lines of that scan (fragments too)."""
    pieces: list[_Curve] = dataclasses.field(default_factory=list, repr=False)
    """The last scan's lines one by one; a step's motion is measured from the nearest."""
    sigma_z_nm: float | None = None
    """Depth uncertainty of the last curve (median point sigma, nm), None if unknown."""

    def piece_near(self, c: _Curve) -> _Curve:
        """The piece of the last scan's curve nearest to ``c`` (median distance of its points)."""
        if len(self.pieces) == 1:
            return self.pieces[0]
        return min(self.pieces, key=lambda p: p.median_distance(c.dense))

    def to_json_dict(self) -> dict[str, Any]:
        disp = np.sum(self.displacements_nm, axis=0) if self.displacements_nm else np.zeros(3)
        span = (self.times_s[-1] - self.times_s[0]) if len(self.times_s) > 1 else 0.0
        return {
            "track_id": self.id, "scans": list(self.scans), "first_scan": self.scans[0], "last_scan": self.scans[-1],
            "ended": self.ended, "total_displacement_nm": np.round(disp, 4).tolist(),
            "mean_speed_nm_s": round(float(np.mean(self.speeds_nm_s)), 6) if self.speeds_nm_s else None,
            "mean_speed_xy_nm_s": round(float(np.mean(self.speeds_xy_nm_s)), 6) if self.speeds_xy_nm_s else None,
            "median_velocity_sigma_z_nm_s": (round(float(np.median(self.velocity_sigmas_z_nm_s)), 6)
                                             if self.velocity_sigmas_z_nm_s else None),
            "mean_velocity_nm_s": np.round(disp / span, 6).tolist() if span > 0 else None,
            "lengths_nm": [round(float(x), 3) for x in self.lengths_nm],
        }


class LineTracker:
    """Follows 3D dislocation lines through the completed scans of one in-situ series.

    Args:
        max_distance_nm: gate: lines farther than this from a track (curve distance) never
            continue it.
        z_weight: weight of z in the distances used for matching (depth is the least
            precise coordinate; 1 = plain 3D distance). Displacements are always in 3D.
        max_missed: scans a track may go unmatched and still be continued later.
        spacing_nm: resampling step of the curves (nm).
    """

    def __init__(self, max_distance_nm: float = 15.0, *, z_weight: float = 1.0, max_missed: int = 1,
                 spacing_nm: float = 1.0):
        if max_distance_nm <= 0 or spacing_nm <= 0 or z_weight < 0 or max_missed < 0:
            raise ValueError("max_distance_nm and spacing_nm must be > 0, z_weight and max_missed >= 0")
        self.max_distance_nm = float(max_distance_nm)
        self.z_weight = float(z_weight)
        self.max_missed = int(max_missed)
        self.spacing_nm = float(spacing_nm)
        self.tracks: dict[int, Track] = {}
        self.next_id = 0
        self.history: list[dict[str, Any]] = []
        """Per update: {"scan", "time_s", "steps": [TrackStep as dict]}."""

    # ------------------------------------------------------------------ matching
    def _prepare(self, curves: Sequence[np.ndarray], closed: Sequence[bool] | None) -> list[_Curve | None]:
        out = []
        for k, c in enumerate(curves):
            c = np.asarray(c, dtype=np.float64).reshape(-1, 3)
            try:
                out.append(_Curve(c, self.spacing_nm, self.z_weight, bool(closed[k]) if closed is not None else False))
            except ValueError:
                out.append(None)
        return out

    @property
    def active(self) -> list[Track]:
        return [t for t in self.tracks.values() if not t.ended]

    def _assign(self, prepared: list[_Curve | None]) -> tuple[dict[int, tuple[int, float]], dict[int, tuple[int, float]]]:
        """({line index: (track id, cost)} of the lines that continue a track one to one,
        {line index: (track id, distance)} of the fragments: further lines lying along the
        previous curve of a track that another line of this scan continues)."""
        tracks = [t for t in self.active if t.curve is not None]
        if not tracks or not prepared:
            return {}, {}
        cost = np.full((len(prepared), len(tracks)), _BIG)
        along = np.full((len(prepared), len(tracks)), _BIG)  # median distance of a line's points to a track's curve
        gate = self.max_distance_nm
        for i, c in enumerate(prepared):
            if c is None:
                continue
            for j, t in enumerate(tracks):
                gap = np.maximum(0.0, np.maximum(c.lo - t.curve.hi, t.curve.lo - c.hi))
                if np.linalg.norm(gap) > gate:
                    continue  # bounding boxes farther apart than the gate: no point can be within it
                dab, dba = curve_distance(c, t.curve)
                along[i, j] = dab
                if min(dab, dba) <= gate:
                    cost[i, j] = 0.5 * (dab + dba)
        rows, cols = linear_sum_assignment(cost)
        matched, line_of = {}, {}
        for i, j in zip(rows, cols):
            if cost[i, j] < _BIG:
                matched[int(i)] = (tracks[j].id, float(cost[i, j]))
                line_of[int(j)] = int(i)
        fragments = {}
        for i, c in enumerate(prepared):
            if c is None or i in matched:
                continue
            # along the track's previous curve, and beside (not alongside) the line that
            # continues it: a line running parallel to that one within the gate is another
            # dislocation (a pile-up), not a piece of this one
            near = [j for j, k in line_of.items()
                    if along[i, j] <= gate and prepared[k].median_distance(c.dense) > gate]
            if near:
                j = min(near, key=lambda j: along[i, j])
                fragments[i] = (tracks[j].id, float(along[i, j]))
        return matched, fragments

    def match(self, curves: Sequence[np.ndarray], closed: Sequence[bool] | None = None) -> list[tuple[int | None, float | None]]:
        """Provisional (track id or None, cost) per curve, without changing any track (for
        partial scans: the live snapshot's lines against the last completed scans);
        fragments get their track's id."""
        prepared = self._prepare(curves, closed)
        matched, fragments = self._assign(prepared)
        return [matched.get(i) or fragments.get(i) or (None, None) for i in range(len(prepared))]

    def displacement(self, track_id: int, curve: np.ndarray) -> np.ndarray | None:
        """(3,) perpendicular motion of ``curve`` from the nearest piece of the track's last
        curve (nm), or None."""
        t = self.tracks.get(track_id)
        if t is None or t.curve is None:
            return None
        new = self._prepare([curve], None)[0]
        return None if new is None else curve_displacement(t.piece_near(new), new)

    # ------------------------------------------------------------------ update
    @staticmethod
    def _step(i: int, t: Track, cost: float, status: str, c: _Curve, time_s: float,
              sigma: float | None) -> TrackStep:
        """Line ``i`` (curve ``c``) as a step of track ``t``, measured from its previous curve."""
        dt = float(time_s - t.times_s[-1])
        old = t.piece_near(c)
        disp = curve_displacement(old, c)
        vel = disp / dt if dt > 0 else None
        speed = float(np.linalg.norm(disp) / dt) if dt > 0 else None
        speed_xy = float(np.linalg.norm(disp[:2]) / dt) if dt > 0 else None
        sig = float(np.hypot(t.sigma_z_nm, sigma) / dt) if dt > 0 and t.sigma_z_nm is not None and sigma is not None else None
        return TrackStep(i, t.id, status, cost, dt, disp, c.centroid - old.centroid, vel, speed, speed_xy, sig)

    def update_lines(self, scan: int, time_s: float, lines: Sequence[Any]) -> list[TrackStep]:
        """:meth:`update` with a scan's 3D lines (objects with ``points_nm``, ``closed`` and
        ``sigma_z_nm``, as livestereo.compute.lines gives them)."""
        return self.update(scan, time_s, [ln.points_nm for ln in lines], [ln.closed for ln in lines],
                           [ln.sigma_z_nm for ln in lines])

    def update(self, scan: int, time_s: float, curves: Sequence[np.ndarray],
               closed: Sequence[bool] | None = None, sigma_z: Sequence[Any] | None = None) -> list[TrackStep]:
        """Match one completed scan's curves ((n, 3) nm each) taken at ``time_s`` (s, the
        scan's mid-time) to the tracks; returns one :class:`TrackStep` per curve.
        ``sigma_z``: per curve its depth uncertainty (nm), a number or one per point (the
        median of the finite ones is taken), None where unknown."""
        prepared = self._prepare(curves, closed)
        line_sigma = [_line_sigma(sigma_z[i] if sigma_z is not None else None) for i in range(len(prepared))]
        matched, fragments = self._assign(prepared)
        steps: list[TrackStep] = []
        for i, c in enumerate(prepared):  # every step against the tracks' previous curves
            link = matched.get(i) or fragments.get(i)
            if link is None:
                tid = self.next_id
                self.next_id += 1
                self.tracks[tid] = Track(tid)
                steps.append(TrackStep(i, tid, "new"))
            else:
                steps.append(self._step(i, self.tracks[link[0]], link[1], "continued" if i in matched else "fragment",
                                        c, time_s, line_sigma[i]))
        lines_of: dict[int, list[int]] = {}  # track id -> its lines in this scan, the one-to-one line first
        for st in steps:
            lines_of.setdefault(st.track_id, []).append(st.line_index)
        for tid, idx in lines_of.items():
            idx.sort(key=lambda i: steps[i].status == "fragment")
            t = self.tracks[tid]
            first = steps[idx[0]]
            if first.status == "continued":  # the track's motion: its one-to-one line's
                t.displacements_nm.append(first.displacement_nm)
                if first.speed_nm_s is not None:
                    t.speeds_nm_s.append(first.speed_nm_s)
                    t.speeds_xy_nm_s.append(first.speed_xy_nm_s)
                if first.velocity_sigma_z_nm_s is not None:
                    t.velocity_sigmas_z_nm_s.append(first.velocity_sigma_z_nm_s)
            pieces = [prepared[i] for i in idx if prepared[i] is not None]
            if pieces:
                t.curve = _Curve.union(pieces)
                t.pieces = pieces
                t.sigma_z_nm = next((line_sigma[i] for i in idx if line_sigma[i] is not None), None)
                t.centroids_nm.append(t.curve.centroid)
                t.lengths_nm.append(t.curve.length)
            t.scans.append(int(scan))
            t.times_s.append(float(time_s))
            t.missed = 0
        seen = set(lines_of)
        for t in self.active:
            if t.id not in seen:
                t.missed += 1
                if t.missed > self.max_missed:
                    t.ended = True
        self.history.append({"scan": int(scan), "time_s": float(time_s), "steps": [s.to_json_dict() for s in steps]})
        return steps

    def summary(self) -> list[dict[str, Any]]:
        """Every track so far (ended ones too), as JSON-ready dicts."""
        return [t.to_json_dict() for t in sorted(self.tracks.values(), key=lambda t: t.id)]


def _line_sigma(sigma: Any) -> float | None:
    """A line's depth uncertainty (nm): the median of its finite point sigmas, or None."""
    if sigma is None:
        return None
    s = np.asarray(sigma, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s) & (s >= 0)]
    return float(np.median(s)) if s.size else None


def steps_json(steps: Sequence[TrackStep], lines: Sequence[Any]) -> list[dict[str, Any]]:
    """The JSON entries of one scan's track steps, each with the ``line_id`` of its line
    (``lines``: the curves given to :meth:`LineTracker.update`, objects with an ``id``)."""
    return [dict(s.to_json_dict(), line_id=int(lines[s.line_index].id)) for s in steps]


def write_tracks_hdf5(group, steps: Sequence[TrackStep], lines: Sequence[Any], tracker: LineTracker,
                      time_s: float | None, clock: str) -> None:
    """Group ``tracks`` of a scan's results under ``group`` (an h5py group that holds the
    scan's ``lines/NNNN``, each of which gets the attr ``track_id``): datasets ``line_id``,
    ``track_id`` (L,) int64, ``status`` (L,) str, ``displacement_nm`` and ``velocity_nm_s``
    (L, 3) float64 (NaN for new tracks, and velocities NaN without a clock), ``speed_nm_s``,
    ``speed_xy_nm_s``, ``velocity_sigma_z_nm_s``, ``dt_s``, ``distance_nm`` (L,); attrs ``time_s``, ``clock``,
    ``max_distance_nm``, ``z_weight``. ``lines``: as for :func:`steps_json`."""
    import h5py

    line_ids = [int(lines[s.line_index].id) for s in steps]
    for s, lid in zip(steps, line_ids):
        group["lines"][f"{lid:04d}"].attrs["track_id"] = int(s.track_id)
    t = group.create_group("tracks")
    nan3 = np.full(3, np.nan)
    t.create_dataset("line_id", data=np.asarray(line_ids, dtype=np.int64).reshape(-1))
    t.create_dataset("track_id", data=np.array([s.track_id for s in steps], dtype=np.int64))
    t.create_dataset("status", data=np.array([s.status for s in steps], dtype=h5py.string_dtype()))
    for key in ("displacement_nm", "velocity_nm_s"):
        rows = [getattr(s, key) if getattr(s, key) is not None else nan3 for s in steps]
        t.create_dataset(key, data=np.array(rows, dtype=np.float64).reshape(-1, 3))
    for key in ("speed_nm_s", "speed_xy_nm_s", "velocity_sigma_z_nm_s", "dt_s", "distance_nm"):
        t.create_dataset(key, data=np.array([np.nan if getattr(s, key) is None else getattr(s, key) for s in steps],
                                            dtype=np.float64))
    t.attrs["time_s"] = float(time_s) if time_s is not None else np.nan
    t.attrs["clock"] = clock or ""
    t.attrs["max_distance_nm"] = tracker.max_distance_nm
    t.attrs["z_weight"] = tracker.z_weight
