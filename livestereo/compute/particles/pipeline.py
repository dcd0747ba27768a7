"""Segment images -> 3D particle table (design.md section 1, "Nanoparticle depth (segmented)").

    images (n_seg, ny, nx) counts --denoise--> Anscombe values --LoG scale space--> circles per
    view (sub-pixel centres, radii) --line search over the slab in the other views--> depth
    hypotheses --global one-to-one assignment--> least-squares depth + uncertainty

Details (parameters in ParticleParams, configs/particles.toml):

- detection per view: scale-normalised LoG over ``radius_range_nm`` at a low threshold
  (``threshold_sigma`` in units of the propagated counting noise), centres refined to the
  contrast's centre of mass;
- matching: every view is the reference in turn; candidates within ``match_tol_px`` of the
  predicted segment r0 + (theta_A - theta_X) dz, dz in ``z_range_nm``, with consistent apparent
  radii; a match needs ``min_views`` views (default n_seg - 1: one may be missing) and a joint
  significance sqrt(sum Z_X^2) >= ``combined_threshold_sigma`` (kills chance alignments of
  noise peaks); matches are accepted best first (most views, smallest residual), each
  detection used once;
- depth: weighted least squares (weights (Z / r)^2) of q_X = r0 - theta_X dz / p; sigma_z from
  the pooled residual scale blended with the particle's own residuals, inflated for
  'crowded' and 'elongated' particles (factors measured by tools/eval_nanoparticles.py);
- flags (table.FLAGS): missing_view, edge, ambiguous, crowded, elongated.

Limits: two particles whose projections overlap by more than about half their radii are seen as
one blob (one particle is reported, often flagged 'elongated'; touching ones are separated by the
hidden scale-space maxima of ParticleParams.hidden_peaks); memory is n_scales x ny x nx
float32 per view during detection (8 scales of 2048^2 = 128 MiB).

Conventions: images (n_seg, ny, nx), segment X's image of segment counts (or anything
proportional to counts) per scan position; valid (ny, nx) True where the scan position has
been filled; segment_angles_mrad (n_seg, 2) effective incident angle (theta_x, theta_y) of
each segment in mrad, scan axes; scan_step_nm p. Output positions: x = column * p,
y = row * p (nm), z = height above the probe crossover (nm).
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from livestereo.compute.particles.circles import Detections, detect_circles
from livestereo.compute.particles.denoise import denoise_image
from livestereo.compute.particles.linesearch import assign_greedy, generate_hypotheses
from livestereo.compute.particles.params import ParticleParams
from livestereo.compute.particles.table import FLAGS, ParticleTable

PRIOR_DOF = 5.0
"""Weight (degrees of freedom) of the pooled position scale in each particle's uncertainty."""

__all__ = ["check_inputs", "detect_all_views", "reconstruct_particles", "resolve_segment_angles", "theory_sigma_z_nm"]


def resolve_segment_angles(n_segments: int, start_angles_mrad=None, calibration=None) -> np.ndarray:
    """The segment angles (n_seg, 2) mrad to use: a calibration file's (SegmentCalibration) when
    given, else the start message's ``calibration.segment_angles_mrad``. ValueError when neither
    is known or the count differs from the detector's ``n_segments``."""
    if calibration is not None:
        angles, source = np.asarray(calibration.segment_angles_mrad, float), "the calibration file"
    elif start_angles_mrad is not None:
        angles, source = np.asarray(start_angles_mrad, float), "the start message"
    else:
        raise ValueError("no segment angles: the start message has none and no calibration file is configured "
                         "(run `livestereo calibrate`)")
    if angles.ndim != 2 or angles.shape[1] != 2 or len(angles) != n_segments:
        raise ValueError(f"{source} has {len(angles)} segment angles but the detector has {n_segments} segments")
    return angles


def check_inputs(images, valid, segment_angles_mrad, scan_step_nm):
    """Validate and convert the pipeline inputs; ValueError naming what is wrong."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (n_seg, ny, nx), got shape {images.shape}")
    n_seg, ny, nx = images.shape
    if n_seg == 0 or ny == 0 or nx == 0:
        raise ValueError(f"images are empty (shape {images.shape})")
    if ny < 8 or nx < 8:
        raise ValueError(f"images of {ny}x{nx} scan positions are too small (need at least 8x8)")
    angles = np.asarray(segment_angles_mrad, dtype=np.float64)
    if angles.ndim != 2 or angles.shape[1] != 2:
        raise ValueError(f"segment_angles_mrad must be (n_seg, 2) (theta_x, theta_y) mrad, got shape {angles.shape}")
    if angles.shape[0] != n_seg:
        raise ValueError(
            f"images have {n_seg} segments but segment_angles_mrad has {angles.shape[0]} "
            "(the calibration does not match the detector)")
    if not np.isfinite(angles).all():
        raise ValueError("segment_angles_mrad contains NaN or inf")
    if n_seg < 2:
        raise ValueError("depth needs at least 2 segments")
    if np.ptp(angles, axis=0).max() == 0:
        raise ValueError("all segment angles are equal: no stereo baseline")
    if not (np.isfinite(scan_step_nm) and scan_step_nm > 0):
        raise ValueError(f"scan_step_nm must be a positive number, got {scan_step_nm!r}")
    if valid is None:
        valid = np.ones((ny, nx), dtype=bool)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (ny, nx):
        raise ValueError(f"valid mask has shape {valid.shape} but images are {ny}x{nx}")
    if not valid.any():
        raise ValueError("no valid scan position: the valid mask is all False (empty images)")
    if images.dtype.kind not in "uif":
        raise ValueError(f"images must be numeric, got dtype {images.dtype}")
    if images.dtype.kind == "f":
        bad = ~np.isfinite(images) & valid[None]
        if bad.any():
            s, r, c = np.argwhere(bad)[0]
            raise ValueError(f"images contain {int(bad.sum())} NaN/inf values at valid scan positions "
                             f"(first: segment {s}, row {r}, col {c})")
    return images, valid, angles


def detect_all_views(images, valid, scan_step_nm, params: ParticleParams) -> list[Detections]:
    """Circles in every segment image (checked inputs); positions and radii in px."""
    n_seg, ny, nx = images.shape
    p = float(scan_step_nm)
    rr = (params.radius_range_nm[0] / p, params.radius_range_nm[1] / p)
    edge_dist = None
    if not valid.all():
        edge_dist = ndimage.distance_transform_edt(np.pad(valid, 1))[1:-1, 1:-1]
    all_valid = bool(valid.all())

    def one(s: int) -> Detections:
        img = images[s] if all_valid else np.where(valid, images[s], 0)
        a = denoise_image(img, params.denoise, params.tv_weight)
        mean = float(a.mean()) if all_valid else float(a[valid].mean())
        if mean <= 0:
            return Detections.empty()
        c = (mean - a) / mean
        if not all_valid:
            c = np.where(valid, c, 0).astype(np.float32)
        return detect_circles(c, valid, rr, params.n_scales, params.threshold_sigma, params.overlap_prune, edge_dist,
                              workers=1 if params.view_threads > 1 else params.fft_workers,
                              noise_model="white" if params.denoise in ("anscombe", "none") else "mad",
                              min_noise=params.min_noise_contrast, scale_nms=params.scale_nms,
                              centroid=params.localize == "centroid", hidden_peaks=params.hidden_peaks)

    if params.view_threads > 1 and n_seg > 1:
        # FFTs, numba kernels and most numpy calls release the GIL: views run in parallel
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(params.view_threads, n_seg)) as ex:
            return list(ex.map(one, range(n_seg)))
    return [one(s) for s in range(n_seg)]


def theory_sigma_z_nm(sigma_xy_nm: float, segment_angles_mrad) -> float:
    """sigma_z ~ sigma_xy / sqrt(sum_X |theta_X - theta_mean|^2) (theta in rad), nm."""
    th = np.asarray(segment_angles_mrad, float) * 1e-3
    return float(sigma_xy_nm / np.sqrt(((th - th.mean(0)) ** 2).sum()))


def reconstruct_particles(images, valid, segment_angles_mrad, scan_step_nm: float,
                          params: ParticleParams | None = None) -> ParticleTable:
    """3D particles from segment images.

    Args:
        images: (n_seg, ny, nx) segment counts (a partial scan is fine: see ``valid``).
        valid: (ny, nx) bool, filled scan positions; None = all.
        segment_angles_mrad: (n_seg, 2) effective (theta_x, theta_y) per segment (mrad, scan
            axes), e.g. from ``calibrate_segment_angles`` or the start message.
        scan_step_nm: p (nm per pixel).
        params: ParticleParams (None: defaults).

    Returns:
        ParticleTable (x, y nm in scan axes; z nm above the crossover; sigma_z nm; views used).

    Raises:
        ValueError naming the problem: shape, segment count vs calibration, empty, NaN.
    """
    params = params or ParticleParams()
    t0 = time.perf_counter()
    images, valid, angles = check_inputs(images, valid, segment_angles_mrad, scan_step_nm)
    n_seg = images.shape[0]
    p = float(scan_step_nm)
    S = -angles * 1e-3 / p  # px per nm of dz
    dets = detect_all_views(images, valid, p, params)
    t1 = time.perf_counter()
    counts = np.array([len(d) for d in dets])
    meta = {"segment_angles_mrad": angles, "scan_step_nm": p, "n_detections": counts,
            "params_json": params.model_dump_json()}
    min_views = params.min_views if params.min_views is not None else max(2, n_seg - 1)
    min_views = min(min_views, n_seg)
    if counts.sum() == 0:
        meta["timings_ms"] = {"detect": 1e3 * (t1 - t0), "match": 0.0}
        return ParticleTable.empty(n_seg, meta)
    offs = np.concatenate([[0], np.cumsum(counts)])
    det_x = np.concatenate([d.x for d in dets])
    det_y = np.concatenate([d.y for d in dets])
    det_r = np.concatenate([d.radius for d in dets])
    det_snr = np.concatenate([d.snr for d in dets])
    det_edge = np.concatenate([d.edge for d in dets])
    det_elong = np.concatenate([d.elongation if d.elongation is not None else np.ones(len(d)) for d in dets])
    det_w = (det_snr / det_r) ** 2
    det_w = det_w / det_w.mean()
    zmin, zmax = params.z_range_nm
    tol = params.match_tol_px
    trees = [cKDTree(np.stack([d.x, d.y], 1)) if len(d) else None for d in dets]
    hyps = []
    for A in range(n_seg):
        nA = counts[A]
        if nA == 0:
            continue
        qa = np.stack([dets[A].x, dets[A].y], 1)
        ptr = np.zeros((n_seg, nA + 1), dtype=np.int64)
        idx_parts = []
        total = 0
        for X in range(n_seg):
            if X == A or trees[X] is None:
                ptr[X, :] = total
                continue
            D = S[X] - S[A]
            centre = qa + D * (0.5 * (zmin + zmax))
            rad = float(np.hypot(*D)) * 0.5 * (zmax - zmin) + tol
            lists = trees[X].query_ball_point(centre, r=rad, return_sorted=False)
            lens = np.fromiter((len(L) for L in lists), dtype=np.int64, count=nA)
            flat = np.fromiter((g for L in lists for g in L), dtype=np.int64, count=int(lens.sum())) + offs[X]
            ptr[X, 0] = total
            ptr[X, 1:] = total + np.cumsum(lens)
            total += int(lens.sum())
            idx_parts.append(flat)
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
        ref_idx = np.arange(offs[A], offs[A + 1], dtype=np.int64)
        hyps.append(generate_hypotheses(A, ref_idx, det_x, det_y, det_r, det_w, ptr, idx, S,
                                        float(zmin), float(zmax), float(tol), float(params.radius_tol),
                                        int(min_views), int(params.hypotheses_per_detection),
                                        float(params.ambiguity_ratio)))
    mem = np.concatenate([h[0] for h in hyps]) if hyps else np.zeros((0, n_seg), np.int64)
    if len(mem) == 0:
        meta["timings_ms"] = {"detect": 1e3 * (t1 - t0), "match": 1e3 * (time.perf_counter() - t1)}
        return ParticleTable.empty(n_seg, meta)
    nv = np.concatenate([h[1] for h in hyps])
    cost = np.concatenate([h[2] for h in hyps])
    r0 = np.concatenate([h[3] for h in hyps])
    dz = np.concatenate([h[4] for h in hyps])
    amb = np.concatenate([h[6] for h in hyps])
    # joint significance of the views of each match: the per-view threshold is low (faint
    # particles), so chance alignments of noise peaks are removed here
    comb = np.sqrt((np.where(mem >= 0, det_snr[np.maximum(mem, 0)], 0.0) ** 2).sum(1))
    ok = comb >= params.combined_threshold_sigma
    mem, nv, cost, r0, dz, amb = mem[ok], nv[ok], cost[ok], r0[ok], dz[ok], amb[ok]
    order = np.lexsort((cost, -nv))
    acc = assign_greedy(order.astype(np.int64), mem, len(det_x))
    mem, nv, cost, r0, dz, amb = mem[acc], nv[acc], cost[acc], r0[acc], dz[acc], amb[acc]
    # stable ids: sort by position
    o = np.lexsort((r0[:, 0], r0[:, 1]))
    mem, nv, cost, r0, dz, amb = mem[o], nv[o], cost[o], r0[o], dz[o], amb[o]
    n = len(mem)
    used = mem >= 0
    g = np.where(used, mem, 0)
    view_xy = np.where(used[..., None], np.stack([det_x[g], det_y[g]], -1), np.nan)
    w = np.where(used, det_w[g], 0.0)
    # residuals and pooled position scale s0: sigma_X = s0 / sqrt(w_X)
    pred = r0[:, None, :] + S[None, :, :] * dz[:, None, None]
    e2 = np.where(used, ((view_xy - pred) ** 2).sum(-1), 0.0)
    dof = 2 * nv - 3
    s0 = float(np.sqrt((w * e2).sum() / max(dof[dof > 0].sum(), 1))) if n else 0.0
    sw = w.sum(1)
    smean = (w[..., None] * S[None]).sum(1) / sw[:, None]
    info = (w * ((S[None] - smean[:, None, :]) ** 2).sum(-1)).sum(1)
    # per particle: pooled scale blended with the particle's own residuals (prior weight PRIOR_DOF
    # degrees of freedom), so a particle whose views disagree more gets a larger sigma_z
    s_i = np.sqrt((PRIOR_DOF * s0**2 + (w * e2).sum(1)) / (PRIOR_DOF + np.maximum(dof, 0)))
    sigma_z = np.where(info > 0, s_i / np.sqrt(np.maximum(info, 1e-300)), np.inf)
    # crowded: another detection of the same view touches a detection this particle uses
    crowded_det = np.zeros(len(det_x), dtype=bool)
    for X in range(n_seg):
        if trees[X] is None or counts[X] < 2:
            continue
        pairs = trees[X].query_pairs(float(params.crowded_distance * 2 * det_r[offs[X]:offs[X + 1]].max()),
                                     output_type="ndarray")
        if len(pairs):
            i, j = pairs[:, 0] + offs[X], pairs[:, 1] + offs[X]
            close = np.hypot(det_x[i] - det_x[j], det_y[i] - det_y[j]) < params.crowded_distance * (det_r[i] + det_r[j])
            crowded_det[i[close]] = True
            crowded_det[j[close]] = True
    crowded = (used & crowded_det[g]).any(1)
    sigma_z = np.where(crowded, sigma_z * params.crowded_sigma_factor, sigma_z)
    elong = np.nanmedian(np.where(used, det_elong[g], np.nan), axis=1)
    elongated = elong > params.elongation_flag
    sigma_z = np.where(elongated, sigma_z * params.elongated_sigma_factor, sigma_z)
    radius = np.nanmedian(np.where(used, det_r[g], np.nan), axis=1) * p
    views = (used * (1 << np.arange(n_seg))[None]).sum(1).astype(np.uint32)
    flags = np.zeros(n, np.uint32)
    flags |= np.where(nv < n_seg, FLAGS["missing_view"], 0).astype(np.uint32)
    flags |= np.where((used & det_edge[g]).any(1), FLAGS["edge"], 0).astype(np.uint32)
    flags |= np.where(amb, FLAGS["ambiguous"], 0).astype(np.uint32)
    flags |= np.where(crowded, FLAGS["crowded"], 0).astype(np.uint32)
    flags |= np.where(elongated, FLAGS["elongated"], 0).astype(np.uint32)
    t2 = time.perf_counter()
    meta["elongation"] = elong
    meta["sigma_xy_px"] = s0 / np.sqrt(np.mean(det_w[mem[used]])) if n else float("nan")
    meta["timings_ms"] = {"detect": 1e3 * (t1 - t0), "match": 1e3 * (t2 - t1)}
    return ParticleTable(
        id=np.arange(n, dtype=np.int64), x_nm=r0[:, 0] * p, y_nm=r0[:, 1] * p, z_nm=dz, radius_nm=radius,
        sigma_z_nm=sigma_z, n_views=nv.astype(np.int64), views=views, residual_px=cost, flags=flags,
        view_xy_px=view_xy, meta=meta)
