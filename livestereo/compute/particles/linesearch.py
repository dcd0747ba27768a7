"""Matching detections across segment views along predicted line segments, and depth by least squares.

Model (design.md section 1): a particle at lateral position r0 (px, the position seen along
theta = 0) and height dz (nm above the probe crossover) appears in view X at

    q_X = r0 + S_X * dz,      S_X = -theta_X * 1e-3 / p   (px per nm; theta_X in mrad, p in nm)

so a particle seen at q_A in the reference view A lies in view X on the segment
q_A + (S_X - S_A) * dz, dz in [z_min, z_max] (= r0 + (theta_A - theta_X) * dz, in nm units).

For every detection of every view (each view takes its turn as reference, so particles
missing in any one view are still found), candidates within ``tol`` of the segment in the
other views give depth hypotheses; each hypothesis collects, per view, the detection closest
to its prediction, is refitted by weighted least squares (unknowns r0x, r0y, dz) and kept if
every residual is within ``tol`` and at least ``min_views`` views agree. A global greedy
assignment, best first (most views, then smallest residual), accepts hypotheses whose
detections are all still free: one detection belongs to one particle only.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["fit_depth", "generate_hypotheses", "assign_greedy"]


@numba.njit(cache=True, nogil=True)
def _fit(members, det_x, det_y, det_w, S):
    """Weighted LS of q_X = r0 + S_X dz over the views with members[X] >= 0.

    Returns (r0x, r0y, dz, max_residual_px, weighted rms residual px, info = sum w |S - S_mean|^2).
    """
    n = members.shape[0]
    sw = 0.0
    sx = 0.0
    sy = 0.0
    qx = 0.0
    qy = 0.0
    for X in range(n):
        g = members[X]
        if g < 0:
            continue
        w = det_w[g]
        sw += w
        sx += w * S[X, 0]
        sy += w * S[X, 1]
        qx += w * det_x[g]
        qy += w * det_y[g]
    sx /= sw
    sy /= sw
    qx /= sw
    qy /= sw
    num = 0.0
    den = 0.0
    for X in range(n):
        g = members[X]
        if g < 0:
            continue
        w = det_w[g]
        ax = S[X, 0] - sx
        ay = S[X, 1] - sy
        num += w * (ax * (det_x[g] - qx) + ay * (det_y[g] - qy))
        den += w * (ax * ax + ay * ay)
    dz = num / den if den > 1e-300 else 0.0
    r0x = qx - sx * dz
    r0y = qy - sy * dz
    emax = 0.0
    e2 = 0.0
    for X in range(n):
        g = members[X]
        if g < 0:
            continue
        ex = det_x[g] - r0x - S[X, 0] * dz
        ey = det_y[g] - r0y - S[X, 1] * dz
        e = math.sqrt(ex * ex + ey * ey)
        if e > emax:
            emax = e
        e2 += det_w[g] * (ex * ex + ey * ey)
    return r0x, r0y, dz, emax, math.sqrt(e2 / sw), den


@numba.njit(cache=True, nogil=True)
def generate_hypotheses(A, ref_idx, det_x, det_y, det_r, det_w, ptr, idx, S,
                        zmin, zmax, tol, rtol, min_views, K, ambiguity_ratio):
    """Depth hypotheses for the reference detections ``ref_idx`` (global indices) of view A.

    ptr (n_views, n_ref + 1), idx: for view X, the global indices of the detections near the
    search segment of reference i are idx[ptr[X, i]:ptr[X, i + 1]] (a KD-tree ball query).

    Returns members (m, n_views) global detection index or -1, n_views (m,), cost (m,) weighted
    rms residual px, r0 (m, 2) px, dz (m,) nm, ref (m,) reference global index, ambiguous (m,) bool.
    """
    n = S.shape[0]
    nref = ref_idx.shape[0]
    out_mem = np.full((nref * K, n), -1, np.int64)
    out_nv = np.zeros(nref * K, np.int64)
    out_cost = np.zeros(nref * K)
    out_r0 = np.zeros((nref * K, 2))
    out_dz = np.zeros(nref * K)
    out_ref = np.zeros(nref * K, np.int64)
    out_amb = np.zeros(nref * K, np.bool_)
    m = 0
    maxc = 64
    cand_v = np.empty(maxc * n, np.int64)
    cand_g = np.empty(maxc * n, np.int64)
    cand_z = np.empty(maxc * n)
    mem = np.empty(n, np.int64)
    best_d = np.empty(n)
    loc_mem = np.full((K, n), -1, np.int64)
    loc_nv = np.zeros(K, np.int64)
    loc_cost = np.zeros(K)
    loc_r0 = np.zeros((K, 2))
    loc_dz = np.zeros(K)
    # depth equivalent (nm) of the position tolerance along the longest baseline from A
    dmax = 0.0
    for X in range(n):
        d = math.sqrt((S[X, 0] - S[A, 0]) ** 2 + (S[X, 1] - S[A, 1]) ** 2)
        if d > dmax:
            dmax = d
    zmargin = tol / dmax if dmax > 0 else 0.0
    for i in range(nref):
        a = ref_idx[i]
        qax = det_x[a]
        qay = det_y[a]
        ra = det_r[a]
        nc = 0
        for X in range(n):
            if X == A:
                continue
            Dx = S[X, 0] - S[A, 0]
            Dy = S[X, 1] - S[A, 1]
            D2 = Dx * Dx + Dy * Dy
            Dn = math.sqrt(D2)
            for t in range(ptr[X, i], ptr[X, i + 1]):
                g = idx[t]
                rg = det_r[g]
                if abs(rg - ra) > rtol * max(rg, ra) + 0.5:
                    continue
                cx = det_x[g] - qax
                cy = det_y[g] - qay
                if D2 > 1e-300:
                    z = (cx * Dx + cy * Dy) / D2
                    margin = tol / Dn
                    if z < zmin - margin or z > zmax + margin:
                        continue
                    zc = min(max(z, zmin), zmax)
                    px = cx - Dx * zc
                    py = cy - Dy * zc
                else:
                    z = np.nan
                    px = cx
                    py = cy
                if px * px + py * py > tol * tol:
                    continue
                if nc < maxc * n:
                    cand_v[nc] = X
                    cand_g[nc] = g
                    cand_z[nc] = z
                    nc += 1
        nloc = 0
        nseed = nc if nc > 0 else 0
        for sidx in range(nseed):
            zh = cand_z[sidx]
            if np.isnan(zh):
                zh = 0.5 * (zmin + zmax)
            for X in range(n):
                mem[X] = -1
                best_d[X] = 1e300
            mem[A] = a
            for c in range(nc):
                X = cand_v[c]
                g = cand_g[c]
                ex = det_x[g] - qax - (S[X, 0] - S[A, 0]) * zh
                ey = det_y[g] - qay - (S[X, 1] - S[A, 1]) * zh
                d = ex * ex + ey * ey
                if d <= 2.25 * tol * tol and d < best_d[X]:
                    best_d[X] = d
                    mem[X] = g
            nv = 0
            for X in range(n):
                if mem[X] >= 0:
                    nv += 1
            if nv < min_views:
                continue
            # fit; drop the worst view while residuals exceed tol and views remain
            while True:
                r0x, r0y, dz, emax, erms, info = _fit(mem, det_x, det_y, det_w, S)
                if emax <= tol or nv <= min_views:
                    break
                worst = -1
                wv = -1.0
                for X in range(n):
                    g = mem[X]
                    if g < 0 or X == A:
                        continue
                    ex = det_x[g] - r0x - S[X, 0] * dz
                    ey = det_y[g] - r0y - S[X, 1] * dz
                    e = ex * ex + ey * ey
                    if e > wv:
                        wv = e
                        worst = X
                if worst < 0:
                    break
                mem[worst] = -1
                nv -= 1
            if emax > tol or nv < min_views:
                continue
            if dz < zmin - zmargin or dz > zmax + zmargin:
                continue
            # duplicate?
            dup = False
            for h in range(nloc):
                same = True
                for X in range(n):
                    if loc_mem[h, X] != mem[X]:
                        same = False
                        break
                if same:
                    dup = True
                    break
            if dup:
                continue
            # insert into the local top-K (sorted by nv desc, cost asc)
            pos = nloc
            for h in range(nloc):
                if nv > loc_nv[h] or (nv == loc_nv[h] and erms < loc_cost[h]):
                    pos = h
                    break
            if pos >= K:
                continue
            last = min(nloc, K - 1)
            for h in range(last, pos, -1):
                loc_mem[h] = loc_mem[h - 1]
                loc_nv[h] = loc_nv[h - 1]
                loc_cost[h] = loc_cost[h - 1]
                loc_r0[h] = loc_r0[h - 1]
                loc_dz[h] = loc_dz[h - 1]
            loc_mem[pos] = mem
            loc_nv[pos] = nv
            loc_cost[pos] = erms
            loc_r0[pos, 0] = r0x
            loc_r0[pos, 1] = r0y
            loc_dz[pos] = dz
            if nloc < K:
                nloc += 1
        amb = nloc >= 2 and loc_nv[1] == loc_nv[0] and loc_cost[1] < ambiguity_ratio * loc_cost[0] + 0.05
        for h in range(nloc):
            out_mem[m] = loc_mem[h]
            out_nv[m] = loc_nv[h]
            out_cost[m] = loc_cost[h]
            out_r0[m] = loc_r0[h]
            out_dz[m] = loc_dz[h]
            out_ref[m] = a
            out_amb[m] = amb
            m += 1
    return out_mem[:m], out_nv[:m], out_cost[:m], out_r0[:m], out_dz[:m], out_ref[:m], out_amb[:m]


@numba.njit(cache=True, nogil=True)
def assign_greedy(order, members, n_det):
    """Accept hypotheses in ``order`` whose detections are all unused; returns accepted indices."""
    used = np.zeros(n_det, np.bool_)
    acc = np.empty(order.shape[0], np.int64)
    na = 0
    n = members.shape[1]
    for h in order:
        ok = True
        for X in range(n):
            g = members[h, X]
            if g >= 0 and used[g]:
                ok = False
                break
        if not ok:
            continue
        for X in range(n):
            g = members[h, X]
            if g >= 0:
                used[g] = True
        acc[na] = h
        na += 1
    return acc[:na]


def fit_depth(q_px: np.ndarray, S_px_per_nm: np.ndarray, weights: np.ndarray | None = None):
    """Weighted least squares of q_X = r0 + S_X dz for one particle (plain numpy; reference).

    Args:
        q_px: (n_views, 2) observed positions (x, y) px; NaN rows are ignored.
        S_px_per_nm: (n_views, 2) = -theta_X * 1e-3 / p.
        weights: (n_views,) or None (equal).
    Returns:
        (r0 (2,) px, dz nm, residuals (n_views, 2) px, NaN for ignored views).
    """
    q = np.asarray(q_px, float)
    S = np.asarray(S_px_per_nm, float)
    ok = np.isfinite(q).all(1)
    w = np.ones(len(q)) if weights is None else np.asarray(weights, float)
    w = np.where(ok, w, 0.0)
    qm = (w[:, None] * np.where(ok[:, None], q, 0)).sum(0) / w.sum()
    sm = (w[:, None] * S).sum(0) / w.sum()
    A = S - sm
    den = (w * (A * A).sum(1)).sum()
    if den <= 0:
        raise ValueError("the views used have identical angles: depth is undetermined")
    dz = (w * (A * (np.where(ok[:, None], q, 0) - qm)).sum(1)).sum() / den
    r0 = qm - sm * dz
    res = np.where(ok[:, None], q - r0 - S * dz, np.nan)
    return r0, float(dz), res
