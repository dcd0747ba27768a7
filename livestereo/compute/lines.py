"""Detection maps + disparity -> 3D polylines, one per dislocation.

Pipeline of :func:`extract_lines` (all maps in the reference view's scan coordinates, view 0):

1. threshold the line-probability map (and the valid mask) and skeletonise it
   (``skimage.morphology.skeletonize``);
2. build the pixel graph of the skeleton with m-adjacency (a diagonal step counts only when
   no 4-neighbour path exists, so staircase corners are not false junctions), group
   adjacent junction pixels into one junction, and trace the branches between junctions
   and end points (closed loops without junctions are traced too);
3. drop short spurs (end-point-to-junction branches shorter than ``spur_length_px``),
   merge junctions joined by a bridge of at most ``junction_merge_px`` (an X often
   skeletonises into two T junctions), then at every junction continue a line through the
   pair of branches that are most nearly collinear (bend below ``max_bend_deg``) and at the
   same height (depths extrapolated to the junction differ by at most
   ``max_depth_jump_px`` px of disparity): two crossing dislocations form an X and stay two
   lines; other branches end at the junction (lines are split at real junctions);
   around a junction depth is ambiguous (the crossing lines' disparities mix), so it is
   interpolated along the line across a zone of ``crossing_width_px / sin(angle)``;
4. refine each skeleton point to sub-pixel precision across the line (half-maximum centroid
   of the probability profile along the local normal), sample the depth map, drop lines
   shorter than ``min_length_px``;
5. smooth x, y and z along the line (Savitzky-Golay; z more strongly, since depth is
   ~ p / beta times noisier than position), propagate the per-point depth uncertainty;
6. convert to 3D points in the microscope frame: x, y (nm) of the theta = 0 reference
   position r = r_0 + theta_0 * dz, z = dz (nm) relative to focus (E1).

Units and axes: probability/disparity maps are (ny, nx) = (row, col); pixel positions are
(x, y) = (col, row) scan px; disparities are in scan px along the baseline of each pair
(position in view i minus position in view j, projected on (theta_j - theta_i)/beta, see
:mod:`livestereo.compute.triangulate`); 3D points are (x, y, z) nm.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from skimage.morphology import skeletonize

from livestereo.compute.triangulate import dz_from_pairs, points_3d

__all__ = ["DislocationLine", "LineParams", "depth_map", "extract_lines", "skeleton_paths"]

log = logging.getLogger(__name__)


class LineParams(BaseModel):
    """Parameters of line extraction (lengths in scan px)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    threshold: float = Field(default=0.7, gt=0, lt=1)
    """Probability above which a pixel belongs to a line."""
    min_length_px: float = Field(default=8.0, ge=0)
    """Lines shorter than this (arc length, px) are dropped."""
    spur_length_px: float = Field(default=6.0, ge=0)
    """Branches from an end point to a junction shorter than this are spurs and dropped."""
    max_bend_deg: float = Field(default=40.0, ge=0, le=180)
    """At a junction, two branches continue as one line when they bend by less than this."""
    junction_merge_px: float = Field(default=5.0, ge=0)
    """Junctions joined by a branch at most this long are one junction (an X crossing)."""
    junction_exclusion_px: float = Field(default=4.0, ge=0)
    """Depth within this distance of a junction is ambiguous (crossing lines): it is
    interpolated along the line from both sides instead of read from the disparity map."""
    crossing_width_px: float = Field(default=3.0, ge=0)
    """Width (px) across which two crossing lines' depths are confused: along a line that
    crosses another at angle phi, depth is interpolated over crossing_width_px / sin(phi)
    around the junction (at least junction_exclusion_px, at most 4 times it)."""
    max_depth_jump_px: float = Field(default=2.0, ge=0)
    """At a junction, branches whose heights (extrapolated to the junction) differ by more
    than this many px of disparity (p / beta nm each) are not joined: crossing dislocations
    at different heights stay separate.  0 disables the depth test."""
    tangent_px: int = Field(default=5, ge=1)
    """Distance (px) over which branch directions are measured at a junction."""
    smooth_xy_px: int = Field(default=7, ge=1)
    """Savitzky-Golay window (px along the line) for x, y; 1 = no smoothing."""
    smooth_z_px: int = Field(default=15, ge=1)
    """Savitzky-Golay window (px along the line) for z (depth)."""
    polyorder: int = Field(default=2, ge=1, le=5)
    """Savitzky-Golay polynomial order."""
    end_trim_px: float = Field(default=1.0, ge=0)
    """Arc length (px) dropped at each open end: the skeleton of a line of finite width
    overshoots or hooks at its tips by up to about the half-width."""
    refine_subpixel: bool = True
    """Refine skeleton points to the half-maximum centroid of the probability across the line."""
    refine_radius_px: float = Field(default=2.5, gt=0)
    """Half-width (px) of the cross-line profile used for refinement."""
    min_depth_fraction: float = Field(default=0.5, ge=0, le=1)
    """Lines whose pixels have a finite depth less often than this are dropped."""
    error_correlation_px: float = Field(default=1.0, ge=0)
    """Correlation length (px along the line) of the disparity errors, for ``sigma_z_nm``:
    neighbouring pixels' errors are not independent, so the depth smoothing averages fewer
    independent errors than points; its noise gain is sqrt(c^T R c) with the smoothing
    coefficients c and R_ij = exp(-|i - j| / this). 0: independent (sqrt(sum c^2)), which
    made sigma_z too small (58 % of the points within 1 sigma of the true depth, 81 % within
    2). 1.0 puts 70 % within 1 sigma (89 % within 2: the errors have heavier tails than a
    Gaussian) on synthetic pairs at doses 10-1000 with seeds apart from the eval's."""


@dataclasses.dataclass
class DislocationLine:
    """One reconstructed dislocation line.

    Attributes:
        id: 0, 1, ... in the order returned (longest first).
        points_nm: (n, 3) float64 points (x, y, z) in nm, microscope frame; x, y = position
            in a theta = 0 view (scan pixel (row 0, col 0) at the origin), z = height above
            the probe crossover (focus), beam along +z.
        sigma_z_nm: (n,) float64 1-sigma depth uncertainty per point (nm); NaN if unknown.
        length_nm: 3D arc length (nm), including the closing segment of a loop.
        pixels_px: (n, 2) float64 (x, y) positions in the reference view (scan px, sub-pixel).
        closed: True for a closed loop (the last point connects to the first).
        mean_probability: mean detection probability along the line.
    """

    id: int
    points_nm: np.ndarray
    sigma_z_nm: np.ndarray
    length_nm: float
    pixels_px: np.ndarray
    closed: bool = False
    mean_probability: float = float("nan")

    @property
    def n_points(self) -> int:
        return int(self.points_nm.shape[0])


# --------------------------------------------------------------------------------------
# depth


def depth_map(disparity, thetas_mrad, scan_step_nm: float, *, pairs=None, sigma_disparity=None):
    """Height map dz (nm) and its sigma (nm) on the reference view's grid.

    Args:
        disparity: (ny, nx) disparity of pair (0, 1), or (P, ny, nx) for ``pairs``; px along
            each pair's baseline, measured at reference-view pixels; NaN = unknown.
        thetas_mrad: (K, 2) incident angles (theta_x, theta_y) of the views (mrad).
        scan_step_nm: p (nm/px).
        pairs: (P, 2) view index pairs; default [(0, 1)].
        sigma_disparity: (ny, nx) / (P, ny, nx) disparity sigma (px) or None.

    Returns:
        (dz (ny, nx), sigma_dz (ny, nx)) float64 nm; sigma NaN where unknown (a single pair
        without sigma_disparity).
    """
    d = np.asarray(disparity, dtype=np.float64)
    if d.ndim == 2:
        d = d[None]
    if pairs is None:
        pairs = [(0, 1)] if d.shape[0] == 1 else None
    if pairs is None:
        raise ValueError(f"{d.shape[0]} disparity maps need explicit pairs")
    s = None
    if sigma_disparity is not None:
        s = np.asarray(sigma_disparity, dtype=np.float64)
        if s.ndim == 2:
            s = s[None]
        if s.shape != d.shape:
            raise ValueError(f"sigma_disparity shape {s.shape} does not match disparity {d.shape}")
    dz, sig = dz_from_pairs(d, pairs, thetas_mrad, scan_step_nm, s)
    return dz, sig


# --------------------------------------------------------------------------------------
# skeleton graph

_OFFS4 = ((-1, 0), (1, 0), (0, -1), (0, 1))
_OFFSD = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def _neighbours(sk: np.ndarray):
    """m-adjacency neighbour lists of skeleton pixels: (coords (n, 2) rows/cols, list of lists)."""
    ny, nx = sk.shape
    S = np.zeros((ny + 2, nx + 2), dtype=bool)
    S[1:-1, 1:-1] = sk
    coords = np.argwhere(sk)
    idx = -np.ones((ny + 2, nx + 2), dtype=np.int64)
    idx[coords[:, 0] + 1, coords[:, 1] + 1] = np.arange(len(coords))
    r = coords[:, 0] + 1
    c = coords[:, 1] + 1
    nbrs: list[list[int]] = [[] for _ in range(len(coords))]
    src_all, dst_all = [], []
    for dr, dc in _OFFS4:
        j = idx[r + dr, c + dc]
        m = j >= 0
        src_all.append(np.nonzero(m)[0])
        dst_all.append(j[m])
    for dr, dc in _OFFSD:
        j = idx[r + dr, c + dc]
        m = (j >= 0) & ~S[r + dr, c] & ~S[r, c + dc]
        src_all.append(np.nonzero(m)[0])
        dst_all.append(j[m])
    src = np.concatenate(src_all)
    dst = np.concatenate(dst_all)
    for a, b in zip(src.tolist(), dst.tolist()):
        nbrs[a].append(b)
    return coords, nbrs


@dataclasses.dataclass
class _Edge:
    pix: list  # pixel indices, from node end 0 to node end 1
    ends: tuple[int, int]  # node ids (-1: none, for a closed loop)
    alive: bool = True


def _trace_graph(sk: np.ndarray):
    coords, nbrs = _neighbours(sk)
    n = len(coords)
    deg = np.array([len(x) for x in nbrs], dtype=np.int64)
    # nodes: end points (deg 1) are single nodes; junction pixels (deg >= 3) grouped
    node_of = -np.ones(n, dtype=np.int64)
    n_nodes = 0
    junction_nodes = set()
    for i in range(n):
        if deg[i] == 1:
            node_of[i] = n_nodes
            n_nodes += 1
    for i in range(n):
        if deg[i] >= 3 and node_of[i] < 0:
            stack = [i]
            node_of[i] = n_nodes
            while stack:
                p = stack.pop()
                for q in nbrs[p]:
                    if deg[q] >= 3 and node_of[q] < 0:
                        node_of[q] = n_nodes
                        stack.append(q)
            junction_nodes.add(n_nodes)
            n_nodes += 1
    edges: list[_Edge] = []
    used = set()  # directed (a, b) pixel steps already walked
    for s in range(n):
        if node_of[s] < 0:
            continue
        for nb in nbrs[s]:
            if (s, nb) in used or node_of[nb] == node_of[s]:
                continue
            path = [s, nb]
            used.add((s, nb))
            used.add((nb, s))
            prev, cur = s, nb
            while node_of[cur] < 0:
                nxt = [q for q in nbrs[cur] if q != prev]
                if not nxt:
                    break
                q = nxt[0]
                used.add((cur, q))
                used.add((q, cur))
                path.append(q)
                prev, cur = cur, q
            edges.append(_Edge(path, (int(node_of[s]), int(node_of[cur]) if node_of[cur] >= 0 else -1)))
    # closed loops of degree-2 pixels only
    seen = np.zeros(n, dtype=bool)
    for e in edges:
        seen[e.pix] = True
    for s in range(n):
        if seen[s] or deg[s] != 2:
            continue
        path = [s]
        seen[s] = True
        prev, cur = s, nbrs[s][0]
        while cur != s and not seen[cur]:
            path.append(cur)
            seen[cur] = True
            nxt = [q for q in nbrs[cur] if q != prev]
            if not nxt:
                break
            prev, cur = cur, nxt[0]
        edges.append(_Edge(path, (-1, -1)))
    return coords, edges, junction_nodes, node_of


def _arc_len(xy: np.ndarray) -> float:
    return float(np.hypot(*np.diff(xy, axis=0).T).sum()) if len(xy) > 1 else 0.0


def skeleton_paths(mask: np.ndarray, params: LineParams = LineParams()) -> list[tuple[np.ndarray, bool]]:
    """Link the skeleton of a binary line mask into paths, one per line.

    Returns a list of (points (m, 2) float as (row, col), closed) paths: branches split at
    junctions, spurs removed, collinear branches continued through junctions (gaps across a
    junction are filled with points at <= 1 px spacing).
    """
    return _link(mask, params)[0]


def _branch_depth(pix, xy_of, coords, centre, r0: float, dz: np.ndarray, span: float = 8.0) -> float | None:
    """Height of a branch (pixels ordered away from a junction) linearly extrapolated to the
    junction centre from its points between r0 and r0 + span px from the centre."""
    xy = xy_of[pix]
    dist = np.hypot(*(xy - centre).T)
    sel = (dist >= r0) & (dist <= r0 + span)
    if sel.sum() < 3:
        return None
    z = dz[coords[pix][sel, 0], coords[pix][sel, 1]]
    ok = np.isfinite(z)
    if ok.sum() < 3:
        return None
    d, z = dist[sel][ok], z[ok]
    if np.ptp(d) < 1.0:
        return float(np.median(z))
    b, a = np.polyfit(d, z, 1)
    return float(a)


def _link(mask: np.ndarray, params: LineParams, dz: np.ndarray | None = None, depth_tol_nm: float | None = None):
    """(paths, junction zones [(centre (x, y) px, radius px)]): see skeleton_paths.  Depth
    inside a junction zone is ambiguous (crossing lines) and is interpolated instead."""
    mask = np.asarray(mask, dtype=bool)
    sk = skeletonize(mask)
    if not sk.any():
        return [], []
    coords, edges, junctions, node_of = _trace_graph(sk)
    xy_of = coords[:, ::-1].astype(np.float64)
    lengths = [_arc_len(xy_of[e.pix]) for e in edges]

    # live degree of every node (a self-loop counts twice), kept up to date as edges die and
    # nodes merge (recounting it after every change made pruning quadratic in the edges:
    # seconds for the skeleton of a noisy mask). A dropped self-loop's -2 waits in ``stale``
    # until the next pruned spur, merge or pass, which is when the decisions have seen it.
    deg: dict[int, int] = {}
    for e in edges:
        for nd in e.ends:
            if nd >= 0:
                deg[nd] = deg.get(nd, 0) + 1
    stale: list[int] = []

    # union-find over nodes, to contract short junction-junction edges (an X often
    # skeletonises into two T junctions joined by a short bridge); edge ends are resolved
    # to their merged node through find() when read
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent.get(a, a) != a:
            parent[a] = parent.get(parent[a], parent[a])
            a = parent[a]
        return a

    def ends_of(e: _Edge) -> tuple[int, int]:
        return (find(e.ends[0]) if e.ends[0] >= 0 else -1, find(e.ends[1]) if e.ends[1] >= 0 else -1)

    def drop(a: int, b: int) -> None:
        """Take a dead edge a-b off the degrees and apply the pending self-loops."""
        for nd in (a, b):
            if nd >= 0:
                deg[nd] -= 1
        refresh()

    def refresh() -> None:
        for nd in stale:
            deg[find(nd)] -= 2
        stale.clear()

    extra_pix: dict[int, list[int]] = {}
    changed = True
    while changed:
        changed = False
        for k in np.argsort(lengths, kind="stable").tolist():  # shortest first
            e = edges[k]
            if not e.alive or e.ends == (-1, -1):
                continue
            a, b = ends_of(e)
            if a == b and lengths[k] < max(params.spur_length_px, 3):
                e.alive = False  # tiny self-loop: skeleton artefact
                stale.append(a)
                changed = True
                continue
            da, db = deg.get(a, 0), deg.get(b, 0)
            is_spur = (da == 1 and db >= 3) or (db == 1 and da >= 3)
            if is_spur and lengths[k] < params.spur_length_px:
                e.alive = False
                changed = True
                drop(a, b)
            elif a != b and a in junctions and b in junctions and da >= 3 and db >= 3 \
                    and lengths[k] <= params.junction_merge_px:
                e.alive = False
                ra, rb = find(a), find(b)
                parent[rb] = ra
                deg[ra] = deg.get(ra, 0) + deg.pop(rb, 0) - 2  # the bridge counted once at each end
                extra_pix.setdefault(ra, []).extend(e.pix)
                extra_pix[ra].extend(extra_pix.pop(rb, []))
                junctions.add(ra)
                changed = True
                refresh()
        refresh()
    for e in edges:
        e.ends = ends_of(e)
    live = [e for e in edges if e.alive]

    # junction pixels (for the caller: depth is ambiguous there) and centres
    jpix: dict[int, list[int]] = {}
    for i in np.nonzero(node_of >= 0)[0].tolist():
        nd = find(int(node_of[i]))
        if nd in junctions:
            jpix.setdefault(nd, []).append(i)
    for nd, extra in extra_pix.items():
        jpix.setdefault(find(nd), []).extend(extra)
    centres = {nd: xy_of[pix].mean(axis=0) for nd, pix in jpix.items()}
    spans = {nd: float(np.hypot(*(xy_of[pix] - centres[nd]).T).max()) for nd, pix in jpix.items()}
    zone_radius = {nd: params.junction_exclusion_px for nd in jpix}

    # pair branch ends at junctions
    ends_at: dict[int, list[tuple[int, int]]] = {}
    for k, e in enumerate(live):
        for side, nd in enumerate(e.ends):
            if nd >= 0:
                ends_at.setdefault(nd, []).append((k, side))
    link: dict[tuple[int, int], tuple[int, int]] = {}
    cos_max = math.cos(math.radians(180.0 - params.max_bend_deg))
    for nd, ends in ends_at.items():
        if len(ends) < 2:
            continue
        centre = centres.get(nd)
        if len(ends) == 2:  # a bend (or a pruned spur): one line unless the heights disagree
            if dz is not None and centre is not None and depth_tol_nm is not None and ends[0][0] != ends[1][0]:
                r0 = zone_radius.get(nd, params.junction_exclusion_px)
                z2 = [_branch_depth(live[k].pix if side == 0 else live[k].pix[::-1], xy_of, coords, centre, r0, dz)
                      for k, side in ends]
                if z2[0] is not None and z2[1] is not None and abs(z2[0] - z2[1]) > depth_tol_nm:
                    continue
            link[ends[0]] = ends[1]
            link[ends[1]] = ends[0]
            continue
        dirs = []
        for k, side in ends:
            pix = live[k].pix if side == 0 else live[k].pix[::-1]
            xy = xy_of[pix]
            p0 = centre if centre is not None else xy[0]
            j = min(params.tangent_px, len(xy) - 1)
            v = xy[j] - p0
            nv = np.hypot(*v)
            dirs.append(v / nv if nv > 0 else np.zeros(2))
        # depth is confused along a crossing over ~ crossing_width / sin(crossing angle)
        dd = np.array(dirs)
        cmax = float(np.max((dd @ dd.T)[np.triu_indices(len(dd), 1)]))
        phi = math.acos(min(1.0, max(-1.0, cmax)))
        if nd in zone_radius and phi > 0:
            r = params.crossing_width_px / max(math.sin(min(phi, math.pi / 2)), 1e-3)
            zone_radius[nd] = min(max(params.junction_exclusion_px, r), 4 * params.junction_exclusion_px)
        # depth of each branch extrapolated to the junction (outside the confused zone)
        zpred: list[float | None] = []
        for k, side in ends:
            zpred.append(_branch_depth(live[k].pix if side == 0 else live[k].pix[::-1], xy_of, coords,
                                       centre, zone_radius.get(nd, params.junction_exclusion_px), dz)
                         if dz is not None and centre is not None else None)
        cand = []
        for i in range(len(ends)):
            for j in range(i + 1, len(ends)):
                if ends[i][0] == ends[j][0]:
                    continue
                c = float(dirs[i] @ dirs[j])  # -1: straight through
                if c > cos_max:
                    continue
                bend = math.degrees(math.pi - math.acos(max(-1.0, min(1.0, c))))
                cost = bend / max(params.max_bend_deg, 1e-6)
                if zpred[i] is not None and zpred[j] is not None and depth_tol_nm is not None:
                    jump = abs(zpred[i] - zpred[j])
                    if jump > depth_tol_nm:
                        continue  # the branches are at different heights: not one line
                    cost += jump / depth_tol_nm
                else:
                    cost += 0.5
                cand.append((cost, i, j))
        cand.sort()
        taken: set[int] = set()
        for c, i, j in cand:
            if i in taken or j in taken:
                continue
            taken.update((i, j))
            link[ends[i]] = ends[j]
            link[ends[j]] = ends[i]

    # walk chains
    out: list[tuple[np.ndarray, bool]] = []
    done = [False] * len(live)

    def walk(k0: int, side0: int):
        pix: list[int] = []
        k, side = k0, side0
        closed = False
        while True:
            done[k] = True
            seg = live[k].pix if side == 0 else live[k].pix[::-1]
            for q in seg:
                if not pix or pix[-1] != q:
                    pix.append(q)
            nxt = link.get((k, 1 - side))
            if nxt is None:
                break
            if done[nxt[0]]:
                closed = nxt == (k0, side0)
                break
            k, side = nxt
        return pix, closed

    def emit(pix: list[int], closed: bool):
        if closed and len(pix) > 1 and pix[0] == pix[-1]:
            pix = pix[:-1]
        rc = coords[pix].astype(np.float64)
        out.append((_fill_gaps(rc, closed), closed))

    for k, e in enumerate(live):
        if e.ends == (-1, -1):
            done[k] = True
            emit(list(e.pix), True)
    for k, e in enumerate(live):
        for side in (0, 1):
            if not done[k] and (k, side) not in link:
                emit(*walk(k, side))
    for k, e in enumerate(live):  # what is left are cycles through junctions
        if not done[k]:
            pix, _ = walk(k, 0)
            emit(pix, True)
    zones = [(centres[nd], spans[nd] + zone_radius[nd]) for nd in jpix]
    return out, zones


def _fill_gaps(rc: np.ndarray, closed: bool) -> np.ndarray:
    """Insert points so that consecutive points are at most ~1 px apart."""
    if len(rc) < 2:
        return rc
    pts = np.vstack([rc, rc[:1]]) if closed else rc
    step = np.hypot(*np.diff(pts, axis=0).T)
    if np.all(step <= 1.5):
        return rc
    out = [pts[:1]]
    for i, st in enumerate(step):
        n = int(math.ceil(st)) if st > 1.5 else 1
        f = np.arange(1, n + 1)[:, None] / n
        out.append(pts[i] + f * (pts[i + 1] - pts[i]))
    res = np.vstack(out)
    return res[:-1] if closed else res


# --------------------------------------------------------------------------------------
# smoothing helpers


def _window(w: int, n: int, polyorder: int) -> int:
    w = min(int(w), n if n % 2 == 1 else n - 1)
    if w % 2 == 0:
        w -= 1
    return w if w > polyorder else 0


@lru_cache(maxsize=64)
def _sg_matrix(w: int, polyorder: int) -> np.ndarray:
    """(w, w) hat matrix of a least-squares polynomial fit over w samples: row i gives the
    fitted value at sample i (row w // 2: the Savitzky-Golay coefficients)."""
    x = np.arange(w, dtype=np.float64) - w // 2
    V = np.vander(x, polyorder + 1, increasing=True)
    H = V @ np.linalg.pinv(V)
    H.setflags(write=False)
    return H


@lru_cache(maxsize=64)
def _noise_gain(w: int, polyorder: int, corr_px: float) -> float:
    """Standard deviation of the Savitzky-Golay output (window centre) for unit-variance
    input errors with correlation exp(-|i - j| / corr_px) (0: independent, sqrt(sum c^2))."""
    c = _sg_matrix(w, polyorder)[w // 2]
    if corr_px <= 0:
        return float(np.sqrt((c**2).sum()))
    i = np.arange(w)
    R = np.exp(-np.abs(i[:, None] - i[None, :]) / corr_px)
    return float(np.sqrt(c @ R @ c))


def _smooth(v: np.ndarray, w: int, polyorder: int, closed: bool) -> tuple[np.ndarray, float]:
    """Savitzky-Golay smoothing along axis 0 (polynomial fits at the ends of open lines,
    wrap-around for closed ones); returns (smoothed, noise gain for independent errors)."""
    v = np.asarray(v, dtype=np.float64)
    n = len(v)
    w = _window(w, n, polyorder) if not closed else (_window(w, n, polyorder) if n > polyorder + 1 else 0)
    if w <= 1:
        return v.copy(), 1.0
    H = _sg_matrix(w, polyorder)
    half = w // 2
    c = H[half]
    vv = v if v.ndim == 2 else v[:, None]
    if closed:
        pad = np.concatenate([vv[n - half:], vv, vv[:half]], axis=0)
        win = np.lib.stride_tricks.sliding_window_view(pad, w, axis=0)  # (n, m, w)
        out = win @ c
    else:
        out = np.empty_like(vv)
        win = np.lib.stride_tricks.sliding_window_view(vv, w, axis=0)  # (n - w + 1, m, w)
        out[half:n - half] = win @ c
        out[:half] = H[:half] @ vv[:w]
        out[n - half:] = H[half + 1:] @ vv[n - w:]
    return (out if v.ndim == 2 else out[:, 0]), _noise_gain(w, polyorder, 0.0)


def _tangents(xy: np.ndarray, closed: bool) -> np.ndarray:
    if len(xy) < 2:
        return np.tile([1.0, 0.0], (len(xy), 1))
    if closed and len(xy) > 2:
        t = np.roll(xy, -1, axis=0) - np.roll(xy, 1, axis=0)
    else:
        t = np.gradient(xy, axis=0)
    n = np.hypot(t[:, 0], t[:, 1])[:, None]
    return np.where(n > 0, t / np.where(n > 0, n, 1), [1.0, 0.0])


def _refine(xy: np.ndarray, prob: np.ndarray, closed: bool, params: LineParams) -> np.ndarray:
    """Move points across the line to the half-maximum centroid of the probability profile."""
    sm, _ = _smooth(xy, 5, 2, closed) if len(xy) >= 5 else (xy, 1.0)
    t = _tangents(sm, closed)
    nrm = np.stack([-t[:, 1], t[:, 0]], axis=1)
    R = params.refine_radius_px
    s = np.linspace(-R, R, int(round(4 * R)) + 1)
    pts = xy[:, None, :] + s[None, :, None] * nrm[:, None, :]  # (n, m, 2) as (x, y)
    prof = ndimage.map_coordinates(prob, [pts[..., 1].ravel(), pts[..., 0].ravel()], order=1,
                                   mode="constant", cval=0.0).reshape(pts.shape[:2])
    peak = prof.max(axis=1, keepdims=True)
    w = np.clip(prof - 0.5 * peak, 0.0, None)
    # keep only the lobe around s = 0 (contiguous positive weights through the centre)
    c = len(s) // 2
    pos = w > 0
    left = np.cumprod(pos[:, c::-1], axis=1)[:, ::-1]
    right = np.cumprod(pos[:, c:], axis=1)
    lobe = np.concatenate([left[:, :-1], right], axis=1).astype(bool)
    w = np.where(lobe, w, 0.0)
    sw = w.sum(axis=1)
    off = np.where(sw > 0, (w * s).sum(axis=1) / np.where(sw > 0, sw, 1.0), 0.0)
    off = np.clip(off, -1.0, 1.0)
    return xy + off[:, None] * nrm


# --------------------------------------------------------------------------------------
# main entry


def _effective_beta_rad(thetas: np.ndarray, pairs, n_maps: int) -> float:
    """sqrt(sum beta^2) over the pairs (rad): depth nm per px of disparity is p / this."""
    pr = [(0, 1)] if pairs is None else [tuple(x) for x in np.asarray(pairs).reshape(-1, 2)]
    b2 = sum(float(np.hypot(*(thetas[j] - thetas[i]))) ** 2 for i, j in pr[:max(n_maps, 1)])
    return max(math.sqrt(b2) * 1e-3, 1e-12)


def extract_lines(
    prob,
    disparity,
    thetas_mrad,
    scan_step_nm: float,
    *,
    pairs=None,
    sigma_disparity=None,
    valid=None,
    params: LineParams | None = None,
) -> list[DislocationLine]:
    """3D dislocation lines from a reference-view probability map and disparity map(s).

    Args:
        prob: (ny, nx) line probability of the reference view (view 0), or (K, ny, nx)
            per-view maps (only view 0 is used: all maps live in view-0 scan coordinates).
        disparity: (ny, nx) disparity of pair (0, 1) in px along its baseline, measured at
            view-0 pixels (position in view 0 minus position in view 1, projected on
            (theta_1 - theta_0)/beta); or (P, ny, nx) for ``pairs``.  NaN = unknown.
        thetas_mrad: (K, 2) incident angles (theta_x, theta_y) mrad of the views; view 0 is
            the reference.
        scan_step_nm: scan step p (nm/px).
        pairs: (P, 2) view pairs of the disparity maps (default [(0, 1)]); depth is the
            least-squares fit over the pairs.
        sigma_disparity: per-pixel disparity sigma (px), shaped like ``disparity``; None:
            sigma_z from the scatter of the raw depths about the smoothed line.
        valid: (ny, nx) bool mask of scanned positions (default all).
        params: :class:`LineParams`.

    Returns:
        list of :class:`DislocationLine`, longest first, ids 0, 1, ...
    """
    params = params or LineParams()
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim == 3:
        p = p[0]
    if p.ndim != 2:
        raise ValueError(f"prob must be (ny, nx) or (K, ny, nx), got shape {np.shape(prob)}")
    thetas = np.asarray(thetas_mrad, dtype=np.float64)
    d = np.asarray(disparity, dtype=np.float64)
    if d.shape[-2:] != p.shape:
        raise ValueError(f"disparity shape {d.shape} does not match prob {p.shape}")
    dz, sdz = depth_map(d, thetas, scan_step_nm, pairs=pairs, sigma_disparity=sigma_disparity)
    p = np.where(np.isfinite(p), p, 0.0)
    mask = p >= params.threshold
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        if v.shape != p.shape:
            raise ValueError(f"valid shape {v.shape} does not match prob {p.shape}")
        mask &= v
    lines: list[DislocationLine] = []
    beta_eff = _effective_beta_rad(thetas, pairs, d.shape[0] if d.ndim == 3 else 1)
    depth_tol = params.max_depth_jump_px * scan_step_nm / beta_eff if params.max_depth_jump_px > 0 else None
    paths, zones = _link(mask, params, dz, depth_tol)
    zc = np.array([z[0] for z in zones]).reshape(-1, 2)
    zr = np.array([z[1] for z in zones])
    for rc, closed in paths:
        if len(rc) < 2:
            continue
        xy = rc[:, ::-1].copy()
        if _arc_len(xy) + (np.hypot(*(xy[0] - xy[-1])) if closed else 0.0) < params.min_length_px:
            continue
        if not closed and params.end_trim_px > 0:
            arc0 = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(xy, axis=0).T))])
            keep = (arc0 >= params.end_trim_px - 1e-9) & (arc0 <= arc0[-1] - params.end_trim_px + 1e-9)
            if keep.sum() < 2:
                continue
            rc, xy = rc[keep], xy[keep]
        ir = np.rint(rc).astype(np.int64)
        if len(zr) and params.junction_exclusion_px > 0:
            dist = np.hypot(xy[:, None, 0] - zc[None, :, 0], xy[:, None, 1] - zc[None, :, 1])
            near = np.any(dist <= zr[None, :], axis=1)
        else:
            near = np.zeros(len(xy), dtype=bool)
        z_raw = np.where(near, np.nan, dz[ir[:, 0], ir[:, 1]])
        s_raw = np.where(near, np.nan, sdz[ir[:, 0], ir[:, 1]])
        ok = np.isfinite(z_raw)
        frac = ok.sum() / max(int((~near).sum()), 1)
        if frac < params.min_depth_fraction or ok.sum() < 2:
            log.debug("line of %d px dropped: depth known at %.0f%% of it", len(rc), 100 * frac)
            continue
        if params.refine_subpixel:
            xy = np.where(near[:, None], xy, _refine(xy, p, closed, params))
        arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(xy, axis=0).T))])
        if not ok.all():
            z_raw = np.interp(arc, arc[ok], z_raw[ok])
            if np.isfinite(s_raw).any():
                s_ok = np.isfinite(s_raw)
                s_raw = np.interp(arc, arc[s_ok], s_raw[s_ok])
        xys, _ = _smooth(xy, params.smooth_xy_px, params.polyorder, closed)
        zs, gain = _smooth(z_raw, params.smooth_z_px, params.polyorder, closed)
        if np.isfinite(s_raw).all():
            # the local mean of the per-pixel variances through the smoothing's noise gain for
            # errors correlated over error_correlation_px
            w = max(_window(params.smooth_z_px, len(z_raw), params.polyorder), 1)
            s2 = ndimage.uniform_filter1d(s_raw**2, w, mode="wrap" if closed else "nearest")
            sig = np.sqrt(s2) * (_noise_gain(w, params.polyorder, params.error_correlation_px) if w > 1 else 1.0)
        else:
            # the scatter about the smoothed line sees only the independent part of the errors
            res = z_raw - zs
            w = _window(params.smooth_z_px, len(z_raw), params.polyorder)
            dof_corr = math.sqrt(w / (w - params.polyorder - 1)) if w > params.polyorder + 1 else 1.0
            mad = float(np.median(np.abs(res - np.median(res)))) * 1.4826 * dof_corr
            sig = np.full(len(zs), mad * gain)
        pts = points_3d(xys, zs, thetas[0], scan_step_nm)
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1).sum()
        if closed and len(pts) > 2:
            seg += float(np.linalg.norm(pts[0] - pts[-1]))
        mp = float(p[ir[:, 0], ir[:, 1]].mean())
        lines.append(DislocationLine(0, pts, sig, float(seg), xys, bool(closed), mp))
    lines.sort(key=lambda ln: -ln.length_nm)
    for i, ln in enumerate(lines):
        ln.id = i
    return lines
