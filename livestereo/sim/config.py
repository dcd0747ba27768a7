"""Configuration of the physics-based 4D-STEM simulator (``configs/sim_*.toml``).

Read a file with ``livestereo.config.load_toml(path, SimConfig)``; the TOML keys are the
field names below at the top level. Axis conventions: scan positions (row, col) = (y, x),
``scan_shape`` = (ny, nx); detector frames (det_y, det_x); incident angles (theta_x, theta_y)
in mrad in scan axes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SimConfig(BaseModel):
    """Everything that defines a simulated run; deterministic given ``seed``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    # --- sample -------------------------------------------------------------------------------
    seed: int = Field(default=0, ge=0)
    """Seed of every random choice (scene, motion, jitter, noise); same seed, same frames."""

    material: Literal["gamma-TiAl", "Al", "Ni", "Cu", "Fe"] = "gamma-TiAl"
    """Material preset (livestereo.sim.materials): lattice parameters and glide systems."""

    zone_axis: tuple[int, int, int] = (1, 1, 0)
    """Zone axis [uvw] along the beam at zero foil tilt (direct-lattice indices)."""

    thickness_nm: float = Field(default=150.0, gt=0, le=5000)
    """Foil thickness t (nm), along the foil normal."""

    foil_tilt_mrad: tuple[float, float] = (0.0, 0.0)
    """Tilt of the foil normal (and crystal) towards +x and +y (mrad)."""

    focus_nm: float = Field(default=0.0, ge=-5000, le=5000)
    """Probe focus (crossover) height z_f relative to the foil mid-plane (nm, +z along the beam)."""

    n_dislocations: int = Field(default=6, ge=0, le=200)
    """Number of dislocation lines in the field of view (a dipole counts as two)."""

    line_width_nm: float = Field(default=1.5, gt=0, le=100)
    """FWHM of the Gaussian tube profile around each dislocation core (nm)."""

    contrast: float = Field(default=0.3, ge=0, le=5)
    """Attenuation at the centre of a line lying in the foil plane: T = exp(-contrast) (unitless)."""

    contrast_variation: float = Field(default=0.5, ge=0, le=3)
    """Relative change of each line's contrast across the disc (unitless): strength x
    (1 + v cos(2 pi g.theta / period + phase)); v > 1 lets lines change sign (turn bright)."""

    bend_contours: float = Field(default=0.15, ge=0, le=1)
    """Depth of the bend-contour bands (unitless, fraction of transmission removed at the band centre)."""

    thickness_fringes: float = Field(default=0.05, ge=0, le=1)
    """Relative amplitude of the thickness-fringe modulation (unitless)."""

    glide_velocity_nm_per_scan: float = Field(default=2.0, ge=0, le=1000)
    """Mean glide speed of the dislocations in an in-situ series (nm per scan)."""

    # --- scan -----------------------------------------------------------------------------------
    scan_shape: tuple[int, int] = (64, 64)
    """Scan positions (ny, nx) per scan."""

    scan_step_nm: float = Field(default=1.0, gt=0, le=1000)
    """Distance between neighbouring scan positions p (nm)."""

    scan_rotation_deg: float = 0.0
    """Rotation from detector axes to scan axes (deg, counter-clockwise), as in the calibration."""

    drift_nm_per_scan: tuple[float, float] = (0.0, 0.0)
    """Sample drift (x, y) relative to the scan frame (nm per scan)."""

    jitter_nm: float = Field(default=0.0, ge=0, le=100)
    """RMS random offset of each scan row in x and y (nm); not in the truth maps."""

    repeat: int = Field(default=1, ge=0)
    """Number of scans in the series (in-situ); 0 = until stopped."""

    frame_time_s: float = Field(default=1e-4, gt=0)
    """Dwell time per scan position (s)."""

    frames_per_message: int = Field(default=64, ge=1, le=1 << 20)
    """Frames per chunk yielded by Simulator.scan_frames (one frames message each)."""

    # --- probe and detector ---------------------------------------------------------------------
    high_tension_kv: float = Field(default=300.0, gt=0)
    """Accelerating voltage (kV); reported in the calibration only."""

    convergence_semiangle_mrad: float = Field(default=30.0, gt=0, le=500)
    """Probe convergence semi-angle alpha (mrad): the radius of the BF disc."""

    detector: Literal["pixelated", "segmented"] = "pixelated"
    """Pixelated (a frame per position) or segmented (n_segments values per position)."""

    frame_shape: tuple[int, int] = (128, 128)
    """Detector pixels (det_y, det_x) per frame; pixelated only."""

    dtype: Literal["uint8", "uint16", "uint32"] = "uint16"
    """Pixel / segment dtype; counts are clipped to its range."""

    mrad_per_px: float = Field(default=0.5, gt=0)
    """Angular size of one detector pixel (mrad/px)."""

    disc_center_px: tuple[float, float] | None = None
    """BF disc centre (row, col) on the detector (px); None = detector centre ((h-1)/2, (w-1)/2)."""

    send_disc_calibration: bool = True
    """Put disc centre and radius into the start message; False: the daemon must find them."""

    n_segments: int = Field(default=4, ge=1, le=64)
    """Segmented: number of annular segments (equal azimuthal sectors; 4 = quadrants)."""

    segment_inner_mrad: float = Field(default=0.0, ge=0)
    """Segmented: inner radius of the segments (mrad)."""

    segment_outer_mrad: float | None = None
    """Segmented: outer radius of the segments (mrad); None = the convergence semi-angle."""

    segment_rotation_deg: float = 0.0
    """Segmented: azimuth of the centre of segment 0 in detector axes (deg, counter-clockwise
    from det_x); segment k is centred at this + 360 k / n_segments."""

    dose_e_per_A2: float = Field(default=50.0, gt=0)
    """Electron dose (electrons per square angstrom): dose * (10 p)^2 electrons per scan
    position, spread over the BF disc."""

    dark_field_background: float = Field(default=0.02, ge=0)
    """Mean counts per detector pixel per frame outside the BF disc (counts)."""

    disc_edge_falloff: float = Field(default=0.1, ge=0, le=1)
    """Relative drop of the BF illumination from disc centre to edge, I ~ 1 - f (|theta|/alpha)^2."""

    mtf_sigma_px: float = Field(default=0.7, ge=0, le=20)
    """Detector point-spread (Gaussian sigma, px); blurs the disc edge."""

    angle_bins: int = Field(default=12, ge=2, le=64)
    """Angle bins across the disc diameter: one rendered view per bin, detector pixels
    interpolate bilinearly between bins (accuracy vs. generation time)."""

    @model_validator(mode="after")
    def _check(self) -> "SimConfig":
        if min(self.scan_shape) < 1:
            raise ValueError(f"scan_shape {self.scan_shape} must be positive")
        if min(self.frame_shape) < 1:
            raise ValueError(f"frame_shape {self.frame_shape} must be positive")
        if tuple(self.zone_axis) == (0, 0, 0):
            raise ValueError("zone_axis must not be [000]")
        outer = self.outer_mrad
        if not outer > self.segment_inner_mrad:
            raise ValueError(f"segment_outer_mrad ({outer}) must exceed segment_inner_mrad ({self.segment_inner_mrad})")
        return self

    @property
    def outer_mrad(self) -> float:
        """Segment outer radius (mrad) with the None default resolved."""
        return float(self.segment_outer_mrad if self.segment_outer_mrad is not None else self.convergence_semiangle_mrad)

    @property
    def center_px(self) -> tuple[float, float]:
        """Disc centre (row, col) (px) with the None default resolved."""
        if self.disc_center_px is not None:
            return (float(self.disc_center_px[0]), float(self.disc_center_px[1]))
        return ((self.frame_shape[0] - 1) / 2.0, (self.frame_shape[1] - 1) / 2.0)

    @property
    def disc_radius_px(self) -> float:
        """BF disc radius on the detector (px)."""
        return self.convergence_semiangle_mrad / self.mrad_per_px

    @property
    def electrons_per_position(self) -> float:
        """Electrons per scan position: dose (e/A^2) x (10 p)^2 (A^2)."""
        return self.dose_e_per_A2 * (10.0 * self.scan_step_nm) ** 2
