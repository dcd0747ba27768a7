"""Parameters of the nanoparticle pipeline (configs/particles.toml, table ``[particles]``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ParticleConfig", "ParticleParams", "load_particle_config"]


class ParticleParams(BaseModel):
    """How segment images become a 3D particle table (denoise, detect circles, line search, depth)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    radius_range_nm: tuple[float, float] = (1.5, 12.0)
    """(min, max) radius (nm) of the circles searched for (apparent, i.e. blur included)."""

    n_scales: int = Field(default=8, ge=2, le=32)
    """Number of log-spaced filter scales between the radius limits."""

    denoise: Literal["anscombe", "tv", "nlm", "none"] = "anscombe"
    """Low-dose denoising before the scale-space blob filter: 'anscombe' (variance-stabilising
    transform only: the Laplacian-of-Gaussian matched filter does the smoothing), 'tv'
    (Anscombe + skimage.restoration.denoise_tv_chambolle), 'nlm' (Anscombe +
    skimage.restoration.denoise_nl_means), 'none' (raw counts)."""

    tv_weight: float = Field(default=0.15, gt=0)
    """Weight of the TV denoiser (in Anscombe units, noise sigma = 1)."""

    threshold_sigma: float = Field(default=3.5, gt=0)
    """Detection threshold: filter response in units of its robust noise sigma (per scale)."""

    min_noise_contrast: float = Field(default=0.002, ge=0)
    """Floor of the per-pixel noise sigma in contrast units (relative to the mean), so that
    noise-free or very high-dose images do not give unbounded significance to faint ripples."""

    combined_threshold_sigma: float = Field(default=7.0, ge=0)
    """A match is kept only if the root-sum-square of its views' significances reaches this
    (4 views at 3.5 sigma = 7.0): rejects chance alignments of noise peaks across views."""

    scale_nms: Literal["2d", "3d"] = "2d"
    """Peak finding: '2d' local maxima of the largest significance over scales (default: most
    sensitive to faint particles, merges touching ones); '3d' maxima in scale space (separates
    touching particles: for crowded fields, with overlap_prune = 1.0; eval: raw F1 0.87 vs 0.83
    at 500 particles per 512^2 nm^2, 0.89 vs 0.92 at 100)."""

    hidden_peaks: bool = True
    """With scale_nms '2d': also take scale-space maxima that have no maximum of their own in the
    largest significance over scales (a particle touching a bigger or stronger one, merged into its
    blob), kept only where the projected thickness dips between them and the neighbour (needs
    localize = 'centroid'; eval, 6 scenes: F1 0.940 -> 0.950 at 100 and 0.824 -> 0.852 at 500
    particles per 512^2 nm^2, precision unchanged, depth RMSE +0.1 nm at 100 and +1.2 nm at 500
    (the recovered particles overlap a neighbour), ~+4 ms per 512x512 view)."""

    localize: Literal["centroid", "filter"] = "centroid"
    """Sub-pixel centres: 'centroid' (centre of mass of the contrast above 2 noise sigma within
    the apparent radius + 1 px, from the filter peak: the centre of mass of a blurred particle
    is what moves by exactly -theta_X dz; eval: median depth error 10-25 % lower) or 'filter'
    (parabola through the LoG peak)."""

    overlap_prune: float = Field(default=0.7, gt=0, le=2)
    """Drop a weaker detection whose centre lies within this fraction of the stronger one's radius."""

    z_range_nm: tuple[float, float] = (-150.0, 150.0)
    """(min, max) height dz above the probe crossover (nm) searched: the ice slab plus a margin."""

    match_tol_px: float = Field(default=1.5, gt=0)
    """Largest distance (scan px) of a detection from the predicted position in another view."""

    radius_tol: float = Field(default=0.5, ge=0)
    """Largest relative difference of apparent radii between views of one particle (0.5 = 50 %)."""

    min_views: int | None = Field(default=None, ge=2)
    """Fewest views a particle must be found in; None: max(2, n_segments - 1) (one may be missing)."""

    hypotheses_per_detection: int = Field(default=3, ge=1, le=16)
    """Alternative matches kept per reference detection for the global one-to-one assignment."""

    ambiguity_ratio: float = Field(default=2.0, ge=1)
    """A particle is flagged 'ambiguous' when a different match of as many views costs less than
    this factor times its own."""

    crowded_distance: float = Field(default=1.2, ge=0)
    """A particle is 'crowded' when, in some view it uses, another detection lies closer than
    this factor times the sum of their apparent radii."""

    crowded_sigma_factor: float = Field(default=1.2, ge=1)
    """sigma_z of crowded particles is multiplied by this (a neighbour biases the centres of
    both in a depth-correlated way the fit residuals do not show; measured on simulations,
    tools/eval_nanoparticles.py)."""

    elongation_flag: float = Field(default=1.5, ge=1)
    """Flag 'elongated' when the median over views of sqrt(major / minor second moment) of the
    blob exceeds this (needs localize = 'centroid'); such particles are often two overlapping
    ones (eval: depth RMSE ~2.5x that of the rest)."""

    elongated_sigma_factor: float = Field(default=2.5, ge=1)
    """sigma_z of elongated particles is multiplied by this (measured, tools/eval_nanoparticles.py)."""

    fft_workers: int = Field(default=2, ge=1, le=64)
    """Threads of scipy.fft for the scale-space filter when views are processed one by one."""

    view_threads: int = Field(default=1, ge=1, le=64)
    """Views detected in parallel threads (FFT, numba and numpy release the GIL); 1: one by one."""

    @model_validator(mode="after")
    def _check(self) -> "ParticleParams":
        lo, hi = self.radius_range_nm
        if not 0 < lo < hi:
            raise ValueError(f"radius_range_nm {self.radius_range_nm} must satisfy 0 < min < max")
        if not self.z_range_nm[0] < self.z_range_nm[1]:
            raise ValueError(f"z_range_nm {self.z_range_nm} must satisfy min < max")
        return self


class ParticleConfig(BaseModel):
    """A particle-pipeline config file (configs/particles.toml)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    calibration: str | None = None
    """Segment calibration TOML (from ``livestereo calibrate``), relative to this file; None:
    the segment angles of the run's start message."""

    particles: ParticleParams = Field(default_factory=ParticleParams)
    """Pipeline parameters."""


def load_particle_config(path) -> tuple[ParticleParams, "object | None"]:
    """(ParticleParams, SegmentCalibration or None) from a particles TOML; ConfigError naming the bad key."""
    from pathlib import Path

    from livestereo.compute.particles.calibration import load_segment_calibration
    from livestereo.config import load_toml

    cfg = load_toml(path, ParticleConfig)
    cal = None
    if cfg.calibration:
        p = Path(cfg.calibration)
        if not p.is_absolute():
            p = Path(path).parent / p
        cal = load_segment_calibration(p)
    return cfg.particles, cal
