"""Simulated nanoparticles in a vitrified-ice slab, seen by a segmented (or pixelated) detector.

Physics (design.md section 1, geometric optics, absorption contrast):

- a particle at height dz above the probe crossover (beam along +z) is seen by the incident
  ray of angle theta at scan position r when r + theta*dz hits it, so in the image of that
  angle it appears shifted by -theta*dz (theta in rad = 1e-3 x mrad);
- the transmission of one ray is exp(-sum_j mu_j t_j), t_j the chord length of the ray
  through particle j (a sphere, or a sphere cut by the planes of a truncated octahedron:
  "faceted"), mu_j an effective bright-field absorption coefficient of the material (1/nm);
  the ice slab adds a smooth, slowly varying absorption;
- the image of segment X is the dose that falls on X times the response-weighted average of
  the transmissions over a few incident-angle samples covering X: a shift by -theta_X*dz
  (theta_X the effective, response-weighted angle) plus a blur of the segment's angular
  extent x |dz|. The detector response falls off towards the rim of the disc
  (``response_falloff``), so theta_X is smaller than the sector's geometric centroid;
- counts are Poisson at the chosen dose (low-dose cryo: tens of electrons per segment and
  scan position, a small fraction of an electron per pixel of a pixelated detector).

Axis order everywhere: images (n_seg, ny, nx); scan positions (row, col) = (y, x) with
x = col * scan_step_nm, y = row * scan_step_nm (nm); angles (theta_x, theta_y) in mrad in
scan axes, azimuth measured from +theta_x towards +theta_y.

``ParticleSimulator`` has the interface of the main simulator (``start_message``,
``scan_frames``, ``precompute_scan``, ``truth``, ``write_truth``) so a streamer can drive
either one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Literal

import numba
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from livestereo.protocol.messages import PROTOCOL_VERSION, Calibration, StartMessage

__all__ = [
    "MATERIAL_MU_PER_NM",
    "ParticleSimConfig",
    "ParticleSimulator",
    "segment_angle_samples",
    "render_log_transmission",
]

#: Effective bright-field absorption coefficients (1/nm) at 300 kV for a BF disc of ~20 mrad:
#: the fraction of electrons scattered outside the disc per nm of material. Order-of-magnitude
#: values (heavier = darker); what matters here is the contrast range, not exact physics.
MATERIAL_MU_PER_NM: dict[str, float] = {
    "Au": 0.10,
    "Pt": 0.09,
    "Pd": 0.07,
    "Ag": 0.06,
    "Fe3O4": 0.04,
    "CdSe": 0.045,
    "SiO2": 0.015,
}


class ParticleSimConfig(BaseModel):
    """A nanoparticle-in-ice scene and how it is imaged (simulator mode 'particles')."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = 0
    """Random seed of the scene (positions, sizes, materials) and of the noise."""

    detector: Literal["segmented", "pixelated"] = "segmented"
    """Stream segment values (n_segments per position) or pixelated 4D-STEM frames of the same scene."""

    scan_shape: tuple[int, int] = (256, 256)
    """(ny, nx) scan positions."""

    scan_step_nm: float = Field(default=1.0, gt=0)
    """Scan step p (nm per image pixel)."""

    repeat: int = Field(default=1, ge=0)
    """Number of scans in the series (in-situ; 0 = until stopped); particles diffuse between
    scans by ``brownian_nm_per_scan``."""

    brownian_nm_per_scan: float = Field(default=0.0, ge=0)
    """Standard deviation of each particle's 3D random step between consecutive scans (nm)."""

    # --- sample -----------------------------------------------------------------------
    n_particles: int = Field(default=100, ge=0, le=100_000)
    """Number of particles in the field of view."""

    radius_range_nm: tuple[float, float] = (2.0, 10.0)
    """(min, max) particle radius (nm); diameters 2-20 nm are radii 1-10 nm."""

    radius_distribution: Literal["loguniform", "uniform"] = "loguniform"
    """How radii are drawn between the limits."""

    materials: tuple[str, ...] = ("Au", "Pt", "Fe3O4")
    """Materials drawn with equal probability; names from MATERIAL_MU_PER_NM or ``material_mu_per_nm``."""

    material_mu_per_nm: dict[str, float] = Field(default_factory=dict)
    """Extra or overriding effective BF absorption coefficients (1/nm) by material name."""

    faceted_fraction: float = Field(default=0.3, ge=0, le=1)
    """Share of particles that are faceted (sphere cut by a randomly oriented truncated octahedron)."""

    min_gap_nm: float = Field(default=0.5, ge=0)
    """Smallest surface-to-surface distance between two particles in 3D (nm)."""

    slab_thickness_nm: float = Field(default=200.0, ge=10, le=2000)
    """Thickness of the vitrified-ice slab (nm); particles lie fully inside it."""

    focus_offset_nm: float = 0.0
    """Height of the probe crossover above the slab's mid-plane (nm); particle dz = z - focus_offset."""

    ice_mu_per_nm: float = Field(default=0.0015, ge=0)
    """Effective BF absorption of vitreous ice (1/nm)."""

    ice_thickness_variation: float = Field(default=0.03, ge=0, le=0.5)
    """Relative rms variation of the ice thickness across the field (smooth random field)."""

    ice_variation_length_nm: float = Field(default=80.0, gt=0)
    """Correlation length of the ice thickness variation (nm)."""

    # --- optics and detector ----------------------------------------------------------
    convergence_semiangle_mrad: float = Field(default=20.0, gt=0, le=200)
    """Probe convergence semi-angle alpha (mrad): radius of the bright-field disc."""

    high_tension_kv: float = Field(default=300.0, gt=0)
    """Accelerating voltage (kV); metadata only."""

    n_segments: int = Field(default=4, ge=1, le=64)
    """Number of detector segments: equal azimuthal sectors of the annulus (4 = quadrants)."""

    segment_rotation_deg: float = 0.0
    """Azimuth of the first segment's start edge (deg from +theta_x towards +theta_y)."""

    detector_inner_mrad: float = Field(default=0.0, ge=0)
    """Inner radius of the annular detector (mrad); electrons inside it are not counted."""

    detector_outer_mrad: float | None = Field(default=None, gt=0)
    """Outer radius of the detector (mrad); None: the BF disc radius. Only BF electrons are modelled."""

    response_falloff: float = Field(default=0.5, ge=0, lt=1)
    """Detector response 1 - falloff * (|theta| / alpha)^2: makes effective angles smaller than the centroids."""

    angle_samples: tuple[int, int] = (3, 4)
    """(radial, azimuthal) incident-angle samples per segment used to render its blur."""

    report_angles: Literal["effective", "geometric", "none"] = "effective"
    """Segment angles put in the start message: the true effective ones, the geometric sector
    centroids (an uncalibrated detector), or none."""

    dose_e_per_a2: float = Field(default=5.0, gt=0)
    """Electron dose over the scan (e/A^2); counts per position = dose * 100 * p^2 (p in nm)."""

    noise: bool = True
    """Poisson counting noise; False gives the expected counts (rounded for integer dtypes)."""

    noise_seed: int | None = None
    """Seed of the counting noise; None: ``seed``. Two recordings of one scene with independent
    noise share ``seed`` and differ in ``noise_seed``."""

    frames_per_message: int = Field(default=256, ge=1)
    """Frames per frames message (the chunks of ``scan_frames``)."""

    # --- pixelated mode ---------------------------------------------------------------
    frame_shape: tuple[int, int] = (32, 32)
    """(det_y, det_x) pixels of a pixelated frame."""

    disc_radius_px: float = Field(default=12.0, gt=1)
    """BF disc radius on the pixelated detector (px); the disc is centred on the frame."""

    @model_validator(mode="after")
    def _check(self) -> "ParticleSimConfig":
        lo, hi = self.radius_range_nm
        if not 0 < lo <= hi:
            raise ValueError(f"radius_range_nm {self.radius_range_nm} must satisfy 0 < min <= max")
        if 2 * hi >= self.slab_thickness_nm:
            raise ValueError(f"particles of radius {hi} nm do not fit in a {self.slab_thickness_nm} nm slab")
        for m in self.materials:
            if m not in MATERIAL_MU_PER_NM and m not in self.material_mu_per_nm:
                raise ValueError(f"unknown material {m!r}: known {sorted(MATERIAL_MU_PER_NM)}; add it to material_mu_per_nm")
        if not self.materials:
            raise ValueError("materials must name at least one material")
        outer = self.detector_outer_mrad or self.convergence_semiangle_mrad
        if self.detector_inner_mrad >= min(outer, self.convergence_semiangle_mrad):
            raise ValueError("detector_inner_mrad must be smaller than the detector's outer radius and the BF disc")
        if min(self.angle_samples) < 1:
            raise ValueError("angle_samples must be >= 1 each")
        if self.detector == "pixelated" and self.disc_radius_px * 2 > min(self.frame_shape):
            raise ValueError(f"disc_radius_px {self.disc_radius_px} does not fit in frame_shape {self.frame_shape}")
        return self

    @property
    def counts_per_position(self) -> float:
        """Electrons that hit the sample per scan position (dose x pixel area)."""
        return self.dose_e_per_a2 * 100.0 * self.scan_step_nm**2


# ---------------------------------------------------------------------------------------
# detector geometry
# ---------------------------------------------------------------------------------------


def segment_angle_samples(cfg: ParticleSimConfig):
    """Incident-angle samples of every segment.

    Returns:
        theta: (n_seg, K, 2) sample angles (theta_x, theta_y) in mrad;
        weight: (n_seg, K) share of the incident dose counted by each sample (area x response /
            disc area), so ``weight.sum(1)`` is each segment's dose fraction;
        effective: (n_seg, 2) response-weighted mean angle of each segment (mrad);
        geometric: (n_seg, 2) area centroid of each segment's sector (mrad).
    """
    alpha = cfg.convergence_semiangle_mrad
    r1 = cfg.detector_inner_mrad
    r2 = min(cfg.detector_outer_mrad or alpha, alpha)
    nr, nphi = cfg.angle_samples
    n = cfg.n_segments
    dphi_seg = 2 * math.pi / n
    phi0 = math.radians(cfg.segment_rotation_deg)
    redges = np.sqrt(np.linspace(r1**2, r2**2, nr + 1))  # equal-area rings
    theta = np.zeros((n, nr * nphi, 2))
    weight = np.zeros((n, nr * nphi))
    geometric = np.zeros((n, 2))
    for s in range(n):
        a0 = phi0 + s * dphi_seg
        k = 0
        for i in range(nr):
            ra, rb = redges[i], redges[i + 1]
            # exact integrals over the ring-sector piece of resp(r) = 1 - f (r / alpha)^2:
            # weight = dphi * int resp r dr; the sample sits at the piece's response-weighted centroid
            dphi = dphi_seg / nphi
            f = cfg.response_falloff / alpha**2
            w_int = dphi * ((rb**2 - ra**2) / 2 - f * (rb**4 - ra**4) / 4)
            m_int = ((rb**3 - ra**3) / 3 - f * (rb**5 - ra**5) / 5) * 2 * math.sin(dphi / 2)
            rc = m_int / w_int
            for j in range(nphi):
                phi = a0 + (j + 0.5) * dphi
                theta[s, k] = (rc * math.cos(phi), rc * math.sin(phi))
                weight[s, k] = w_int / (math.pi * alpha**2)
                k += 1
        rcs = 2.0 / 3.0 * (r2**3 - r1**3) / (r2**2 - r1**2) * math.sin(dphi_seg / 2) / (dphi_seg / 2)
        geometric[s] = (rcs * math.cos(a0 + dphi_seg / 2), rcs * math.sin(a0 + dphi_seg / 2))
        if n == 1:
            geometric[s] = 0.0
    effective = (theta * weight[..., None]).sum(1) / weight.sum(1)[:, None]
    return theta, weight, effective, geometric


# ---------------------------------------------------------------------------------------
# rendering (numba)
# ---------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _splat(L, row0, cx, cy, rad, mu, planes, nplanes, ss):
    """Add mu * (mean chord length) of every particle to L (rows row0 .. row0 + L.shape[0]).

    cx, cy, rad in px (pixel (i, j) centre at x = j, y = i); mu per px; planes (n, P, 4) with
    unit normals (nx, ny, nz) and offsets d (px) relative to the particle centre: n.x <= d.
    """
    h, w = L.shape
    inv = 1.0 / (ss * ss)
    for p in range(cx.shape[0]):
        r = rad[p]
        x0 = cx[p]
        y0 = cy[p]
        i_lo = max(int(math.floor(y0 - r)) - row0, 0)
        i_hi = min(int(math.ceil(y0 + r)) - row0, h - 1)
        j_lo = max(int(math.floor(x0 - r)), 0)
        j_hi = min(int(math.ceil(x0 + r)), w - 1)
        if i_lo > i_hi or j_lo > j_hi:
            continue
        r2 = r * r
        npl = nplanes[p]
        for i in range(i_lo, i_hi + 1):
            for j in range(j_lo, j_hi + 1):
                acc = 0.0
                for a in range(ss):
                    y = (i + row0) - 0.5 + (a + 0.5) / ss - y0
                    for b in range(ss):
                        x = j - 0.5 + (b + 0.5) / ss - x0
                        rho2 = x * x + y * y
                        if rho2 >= r2:
                            continue
                        hz = math.sqrt(r2 - rho2)
                        zlo = -hz
                        zhi = hz
                        for k in range(npl):
                            nx = planes[p, k, 0]
                            ny = planes[p, k, 1]
                            nz = planes[p, k, 2]
                            rhs = planes[p, k, 3] - nx * x - ny * y
                            if abs(nz) < 1e-12:
                                if rhs < 0:
                                    zhi = zlo
                                    break
                            elif nz > 0:
                                v = rhs / nz
                                if v < zhi:
                                    zhi = v
                            else:
                                v = rhs / nz
                                if v > zlo:
                                    zlo = v
                        if zhi > zlo:
                            acc += zhi - zlo
                if acc > 0.0:
                    L[i, j] += mu[p] * acc * inv


def render_log_transmission(shape, particles: dict, theta_mrad, scan_step_nm: float, row0: int = 0, ss: int = 3) -> np.ndarray:
    """-log(transmission) of the particles for one incident angle, rows row0 .. row0 + shape[0].

    Args:
        shape: (rows, nx) of the block to render.
        particles: arrays x_nm, y_nm, dz_nm, radius_nm, mu_per_nm, planes (n, P, 4) in nm,
            nplanes (n,), as made by ParticleSimulator.
        theta_mrad: (theta_x, theta_y) of the incident ray (mrad).
        scan_step_nm: p (nm).
        row0: first scan row of the block.
        ss: sub-samples per pixel side.
    """
    p = float(scan_step_nm)
    t = np.asarray(theta_mrad, dtype=np.float64) * 1e-3
    cx = (particles["x_nm"] - t[0] * particles["dz_nm"]) / p
    cy = (particles["y_nm"] - t[1] * particles["dz_nm"]) / p
    planes = particles["planes"].copy()
    planes[..., 3] /= p
    L = np.zeros(shape, dtype=np.float64)
    _splat(L, int(row0), cx, cy, particles["radius_nm"] / p, particles["mu_per_nm"] * p, planes,
           particles["nplanes"], int(ss))
    return L


def _truncated_octahedron_planes(rng, radius):
    """14 planes (unit normals, offsets) of a randomly oriented truncated octahedron that cuts a
    sphere of ``radius``: {100} at 0.80 R and {111} at 0.85 R."""
    normals = []
    for ax in range(3):
        for sgn in (1.0, -1.0):
            v = np.zeros(3)
            v[ax] = sgn
            normals.append((v, 0.80))
    for sx in (1, -1):
        for sy in (1, -1):
            for sz in (1, -1):
                normals.append((np.array([sx, sy, sz]) / math.sqrt(3.0), 0.85))
    # random rotation (QR of a Gaussian matrix)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    out = np.zeros((14, 4))
    for k, (n, f) in enumerate(normals):
        out[k, :3] = q @ n
        out[k, 3] = f * radius
    return out


def _smooth_field(rng, shape, length_px):
    """Zero-mean, unit-rms smooth random field (Gaussian spectrum of correlation length ``length_px``)."""
    # drawn on a grid of at least 4 correlation lengths (then cropped), so the rms is right
    # even for a scan smaller than the correlation length
    ny, nx = max(shape[0], int(4 * length_px)), max(shape[1], int(4 * length_px))
    noise = rng.normal(size=(ny, nx))
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.rfftfreq(nx)[None, :]
    g = np.exp(-2 * (math.pi * length_px) ** 2 * (fx**2 + fy**2) / 4)
    f = np.fft.irfft2(np.fft.rfft2(noise) * g, s=(ny, nx))
    s = f.std()
    f = f / s if s > 0 else f
    return f[: shape[0], : shape[1]]


# ---------------------------------------------------------------------------------------
# simulator
# ---------------------------------------------------------------------------------------


class ParticleSimulator:
    """Nanoparticles in ice imaged by a segmented detector (or pixelated 4D-STEM frames).

    Deterministic: the same config gives the same scene and the same noise, scan by scan.
    """

    def __init__(self, cfg: ParticleSimConfig | None = None, **kwargs):
        if cfg is None:
            cfg = ParticleSimConfig(**kwargs)
        elif kwargs:
            cfg = cfg.model_copy(update=kwargs)
            cfg = ParticleSimConfig.model_validate(cfg.model_dump())
        self.cfg = cfg
        self._noise_seed = cfg.seed if cfg.noise_seed is None else cfg.noise_seed
        self.theta_samples, self.sample_weights, self.effective_angles_mrad, self.geometric_angles_mrad = (
            segment_angle_samples(cfg)
        )
        self._mu_table = {**MATERIAL_MU_PER_NM, **cfg.material_mu_per_nm}
        self._scene0 = self._make_scene()
        ny, nx = cfg.scan_shape
        rng = np.random.default_rng([cfg.seed, 7])
        p = cfg.scan_step_nm
        self._ice = cfg.ice_mu_per_nm * cfg.slab_thickness_nm * (
            1.0 + cfg.ice_thickness_variation * _smooth_field(rng, (ny, nx), cfg.ice_variation_length_nm / p)
        )
        self._cache: dict[int, np.ndarray] = {}

    # ----- scene ---------------------------------------------------------------------
    def _make_scene(self) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1])
        ny, nx = cfg.scan_shape
        p = cfg.scan_step_nm
        n = cfg.n_particles
        lo, hi = cfg.radius_range_nm
        if cfg.radius_distribution == "loguniform":
            radii = np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
        else:
            radii = rng.uniform(lo, hi, size=n)
        radii = np.sort(radii)[::-1]  # place big ones first
        half = cfg.slab_thickness_nm / 2
        pos = np.zeros((n, 3))
        kept = np.zeros(n, dtype=bool)
        placed: list[int] = []
        # rejection sampling on a coarse grid hash (3D non-overlap)
        cell = 2 * hi + cfg.min_gap_nm
        grid: dict[tuple[int, int, int], list[int]] = {}
        for i in range(n):
            r = radii[i]
            for _ in range(200):
                c = np.array([rng.uniform(0, nx * p), rng.uniform(0, ny * p), rng.uniform(-half + r, half - r)])
                key = tuple((c // cell).astype(int))
                ok = True
                for dx in (-1, 0, 1):
                    for dy in (-1, 0, 1):
                        for dzc in (-1, 0, 1):
                            for j in grid.get((key[0] + dx, key[1] + dy, key[2] + dzc), ()):
                                if np.linalg.norm(pos[j] - c) < r + radii[j] + cfg.min_gap_nm:
                                    ok = False
                                    break
                            if not ok:
                                break
                        if not ok:
                            break
                    if not ok:
                        break
                if ok:
                    pos[i] = c
                    kept[i] = True
                    placed.append(i)
                    grid.setdefault(key, []).append(i)
                    break
        idx = np.flatnonzero(kept)
        pos, radii = pos[idx], radii[idx]
        m = len(idx)
        mats = np.array(cfg.materials)[rng.integers(0, len(cfg.materials), size=m)] if m else np.array([], dtype=str)
        faceted = rng.uniform(size=m) < cfg.faceted_fraction
        planes = np.zeros((m, 14, 4))
        nplanes = np.zeros(m, dtype=np.int64)
        for i in np.flatnonzero(faceted):
            planes[i] = _truncated_octahedron_planes(rng, radii[i])
            nplanes[i] = 14
        order = rng.permutation(m)  # ids in random order (not by size)
        return {
            "x_nm": pos[order, 0], "y_nm": pos[order, 1], "z_nm": pos[order, 2],
            "radius_nm": radii[order], "material": mats[order], "faceted": faceted[order],
            "planes": planes[order], "nplanes": nplanes[order],
            "mu_per_nm": np.array([self._mu_table[str(s)] for s in mats[order]], dtype=np.float64),
        }

    def scene(self, scan: int = 0) -> dict:
        """Particles of scan ``scan``: x_nm, y_nm (scan axes), z_nm (height above the slab mid-plane),
        dz_nm (height above the probe crossover), radius_nm, material, faceted, mu_per_nm, planes, nplanes."""
        cfg = self.cfg
        s = dict(self._scene0)
        if cfg.brownian_nm_per_scan > 0 and scan > 0:
            pos = np.stack([s["x_nm"], s["y_nm"], s["z_nm"]], 1)
            for k in range(scan):
                pos = pos + np.random.default_rng([cfg.seed, 2, k]).normal(scale=cfg.brownian_nm_per_scan, size=pos.shape)
            half = cfg.slab_thickness_nm / 2
            pos[:, 2] = np.clip(pos[:, 2], -half + s["radius_nm"], half - s["radius_nm"])
            s["x_nm"], s["y_nm"], s["z_nm"] = pos[:, 0], pos[:, 1], pos[:, 2]
        s["dz_nm"] = s["z_nm"] - cfg.focus_offset_nm
        return s

    # ----- images --------------------------------------------------------------------
    def expected_images(self, scan: int = 0) -> np.ndarray:
        """Noise-free expected counts (n_seg, ny, nx) float64 of the segmented detector."""
        cfg = self.cfg
        sc = self.scene(scan)
        out = np.zeros((cfg.n_segments, *cfg.scan_shape))
        for s in range(cfg.n_segments):
            for k in range(self.theta_samples.shape[1]):
                L = render_log_transmission(cfg.scan_shape, sc, self.theta_samples[s, k], cfg.scan_step_nm)
                out[s] += self.sample_weights[s, k] * np.exp(-L)
        out *= np.exp(-self._ice)[None] * cfg.counts_per_position
        return out

    def segment_images(self, scan: int = 0) -> np.ndarray:
        """Noisy segment images (n_seg, ny, nx) float64 counts (what the accumulator would give)."""
        return self.precompute_scan(scan).T.reshape(self.cfg.n_segments, *self.cfg.scan_shape).astype(np.float64)

    def precompute_scan(self, scan: int = 0) -> np.ndarray:
        """Segment counts of every scan position of scan ``scan``: (n_positions, n_segments) uint32."""
        cfg = self.cfg
        if cfg.detector != "segmented":
            raise ValueError("precompute_scan is for the segmented detector; pixelated frames are made row by row")
        if scan in self._cache:
            return self._cache[scan]
        lam = self.expected_images(scan)
        if cfg.noise:
            counts = np.random.default_rng([self._noise_seed, 3, scan]).poisson(lam)
        else:
            counts = np.rint(lam)
        frames = np.ascontiguousarray(counts.reshape(cfg.n_segments, -1).T).astype(np.uint32)
        self._cache = {scan: frames}  # keep one scan
        return frames

    # pixelated ------------------------------------------------------------------------
    def detector_angles(self):
        """Pixelated detector: (rows, cols, theta (m, 2) mrad, weight (m,)) of the pixels inside the BF disc."""
        cfg = self.cfg
        h, w = cfg.frame_shape
        cy, cx = (h - 1) / 2, (w - 1) / 2
        mpp = cfg.convergence_semiangle_mrad / cfg.disc_radius_px
        rr, cc = np.mgrid[0:h, 0:w]
        tx = (cc - cx) * mpp
        ty = (rr - cy) * mpp
        inside = np.hypot(tx, ty) <= cfg.convergence_semiangle_mrad
        rows, cols = rr[inside], cc[inside]
        theta = np.stack([tx[inside], ty[inside]], 1)
        weight = np.full(len(rows), mpp**2 / (math.pi * cfg.convergence_semiangle_mrad**2))
        return rows, cols, theta, weight

    def _pixelated_block(self, scan: int, row0: int, nrows: int, sc: dict, rng) -> np.ndarray:
        cfg = self.cfg
        ny, nx = cfg.scan_shape
        rows, cols, theta, weight = self.detector_angles()
        lam = np.zeros((nrows, nx, *cfg.frame_shape), dtype=np.float64)
        ice = np.exp(-self._ice[row0:row0 + nrows]) * cfg.counts_per_position
        for k in range(len(rows)):
            L = render_log_transmission((nrows, nx), sc, theta[k], cfg.scan_step_nm, row0=row0)
            lam[:, :, rows[k], cols[k]] = weight[k] * np.exp(-L) * ice
        counts = rng.poisson(lam) if cfg.noise else np.rint(lam)
        return counts.reshape(nrows * nx, *cfg.frame_shape).astype(np.uint16)

    # ----- stream interface ------------------------------------------------------------
    def start_message(self, run_id: str) -> StartMessage:
        """The start message of a run of this scene."""
        cfg = self.cfg
        angles = None
        if cfg.detector == "segmented":
            if cfg.report_angles == "effective":
                angles = tuple((float(a), float(b)) for a, b in self.effective_angles_mrad)
            elif cfg.report_angles == "geometric":
                angles = tuple((float(a), float(b)) for a, b in self.geometric_angles_mrad)
        calib = Calibration(
            convergence_semiangle_mrad=cfg.convergence_semiangle_mrad,
            scan_step_nm=cfg.scan_step_nm,
            mrad_per_px=(cfg.convergence_semiangle_mrad / cfg.disc_radius_px) if cfg.detector == "pixelated" else None,
            disc_center_px=((cfg.frame_shape[0] - 1) / 2, (cfg.frame_shape[1] - 1) / 2) if cfg.detector == "pixelated" else None,
            disc_radius_px=cfg.disc_radius_px if cfg.detector == "pixelated" else None,
            high_tension_kv=cfg.high_tension_kv,
            segment_angles_mrad=angles,
        )
        meta = {
            "simulator": "particles",
            "sample": "nanoparticles in vitrified ice",
            "seed": cfg.seed,
            "slab_thickness_nm": cfg.slab_thickness_nm,
            "focus_offset_nm": cfg.focus_offset_nm,
            "dose_e_per_a2": cfg.dose_e_per_a2,
            "n_particles": int(len(self._scene0["x_nm"])),
            "materials": list(cfg.materials),
            "radius_range_nm": list(cfg.radius_range_nm),
        }
        return StartMessage(
            version=PROTOCOL_VERSION,
            run_id=run_id,
            detector=cfg.detector,
            scan_shape=cfg.scan_shape,
            frame_shape=cfg.frame_shape if cfg.detector == "pixelated" else None,
            n_segments=cfg.n_segments if cfg.detector == "segmented" else None,
            dtype="uint32" if cfg.detector == "segmented" else "uint16",
            repeat=cfg.repeat,
            calibration=calib,
            metadata=meta,
        )

    def scan_frames(self, scan: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(first flat scan index, frames) chunks of scan ``scan`` in scan order.

        Segmented: frames (count, n_segments) uint32; pixelated: (count, det_y, det_x) uint16.
        """
        cfg = self.cfg
        ny, nx = cfg.scan_shape
        per = cfg.frames_per_message
        if cfg.detector == "segmented":
            frames = self.precompute_scan(scan)
            for first in range(0, ny * nx, per):
                yield first, frames[first:first + per]
            return
        sc = self.scene(scan)
        rng = np.random.default_rng([self._noise_seed, 4, scan])
        block_rows = max(1, min(ny, 16))
        pending: list[np.ndarray] = []
        first_out = 0
        for row0 in range(0, ny, block_rows):
            nrows = min(block_rows, ny - row0)
            pending.append(self._pixelated_block(scan, row0, nrows, sc, rng))
            buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
            n_full = (len(buf) // per) * per
            for i in range(0, n_full, per):
                yield first_out, buf[i:i + per]
                first_out += per
            pending = [buf[n_full:]] if n_full < len(buf) else []
        if pending and len(pending[0]):
            yield first_out, pending[0]

    def truth(self, scan: int = 0) -> dict:
        """Ground truth of scan ``scan``: per particle x_nm, y_nm (scan axes), z_nm (above the slab
        mid-plane), dz_nm (above the crossover), radius_nm, material, faceted; per segment
        effective and geometric angles (mrad); per particle and segment the image position
        (n, n_seg, 2) px (x, y) = (x - theta_X * dz) / p and whether it lies inside the field."""
        cfg = self.cfg
        sc = self.scene(scan)
        th = self.effective_angles_mrad * 1e-3
        p = cfg.scan_step_nm
        vx = (sc["x_nm"][:, None] - th[None, :, 0] * sc["dz_nm"][:, None]) / p
        vy = (sc["y_nm"][:, None] - th[None, :, 1] * sc["dz_nm"][:, None]) / p
        ny, nx = cfg.scan_shape
        inside = (vx >= 0) & (vx <= nx - 1) & (vy >= 0) & (vy <= ny - 1)
        return {
            "id": np.arange(len(sc["x_nm"])),
            "x_nm": sc["x_nm"], "y_nm": sc["y_nm"], "z_nm": sc["z_nm"], "dz_nm": sc["dz_nm"],
            "radius_nm": sc["radius_nm"], "material": sc["material"].astype(str), "faceted": sc["faceted"],
            "view_xy_px": np.stack([vx, vy], -1), "in_view": inside,
            "segment_angles_mrad": self.effective_angles_mrad.copy(),
            "geometric_angles_mrad": self.geometric_angles_mrad.copy(),
            "slab_thickness_nm": cfg.slab_thickness_nm, "focus_offset_nm": cfg.focus_offset_nm,
            "scan_step_nm": p,
        }

    def write_truth(self, path: str | Path, scans=(0,)) -> None:
        """Write the ground truth of ``scans`` to HDF5: /scan_{k}/<field> datasets and the config as JSON attribute."""
        import h5py

        with h5py.File(path, "w") as f:
            f.attrs["config_json"] = self.cfg.model_dump_json()
            f.attrs["kind"] = "livestereo particle truth"
            for scan in scans:
                g = f.create_group(f"scan_{int(scan)}")
                for k, v in self.truth(scan).items():
                    if isinstance(v, np.ndarray) and v.dtype.kind == "U":
                        g.create_dataset(k, data=v.astype("S"))
                    else:
                        g.create_dataset(k, data=v)
