"""``livestereo reconstruct INPUT``: dislocations in 3D, offline, as fast as the machine allows.

INPUT is one of

(a) a livestereo recording (or any file ``livestereo run --source`` reads, e.g. .mib);
(b) a 4D array file, ``.npy`` (scan_y, scan_x, det_y, det_x) or HDF5, with
    ``--calibration CAL.toml`` (the fields of ``livestereo.protocol.messages.Calibration``);
(c) a manifest (``.toml``) listing 2D view images, e.g.::

        # views.toml: paths are relative to this file
        scan_step_nm = 1.0          # p, nm per scan pixel (required)
        thickness_nm = 200.0        # foil thickness t, nm (required)
        material = "gamma-TiAl"     # optional: preset name (configs/materials) or a TOML path
        valid = "mask.npy"          # optional: (ny, nx) bool mask of scanned positions
        scan = 0                    # optional: scan number written to the results

        [orientation]               # optional, needs material
        zone_axis = [1, 1, 0]       # [uvw] parallel to the beam
        g = [0, 0, 2]               # an indexed reflection (hkl)
        g_angle_deg = 30.0          # direction of g in the image, deg from scan +x towards +y

        [[views]]                   # two or more; view 0 is the reference view
        file = "view_a.npy"         # 2D image (ny, nx): .npy or .tif/.tiff
        theta_mrad = [-52.0, 0.0]   # incident angle (theta_x, theta_y), mrad, scan axes
        [[views]]
        file = "view_b.tif"
        theta_mrad = [52.0, 0.0]

A segmented-detector input (a recording of a segmented run) gives nanoparticles instead:
per scan ``scan_NNNN.h5`` (``/segment_images``, ``/valid``, ``/segment_angles_mrad``,
``/particles`` with the table the daemon writes) and ``scan_NNNN_particles.csv``; the
same ``reconstruct_particles`` call the daemon makes live (``--particles-config`` for
parameters and a segment calibration).

For (a) and (b) the virtual views come from the same accumulation code the daemon runs
(``livestereo.daemon.offline.accumulate_file``; layout: stereo pair by default, change it
with ``--set layout.kind=multiview --set layout.k=4`` etc.); foil thickness, material and
orientation come from the options, else from the run's start metadata (keys
``thickness_nm``, ``material``, ``zone_axis``, ``g``, ``g_angle_deg``, at the top level or
under ``sample``).  Every scan of the input is reconstructed, and the scans of each run
are tracked as an in-situ series with the live daemon's tracker and settings (``/tracks``).

Results (in ``--output DIR``, default ``<INPUT stem>_reconstruct/`` next to INPUT)
-----------------------------------------------------------------------------------
``scan_NNNN.h5``, one per scan (in a subfolder per run id, named as the daemon names its
run folders, when the input holds several runs):

- root attrs: ``format`` = "livestereo.dislocations", ``format_version`` = 1, ``scan``,
  ``n_lines``, ``scan_step_nm``, ``thickness_nm`` (NaN if unknown), ``metadata`` (JSON),
  ``input``, ``livestereo_version``;
- ``/thetas_mrad`` (K, 2) incident angles (theta_x, theta_y) of the views, mrad; view 0 is
  the reference view in whose scan coordinates every map is given;
- ``/views/images`` (K, ny, nx) float32 virtual images; ``/views/names`` (K,) strings;
  ``/views/valid`` (ny, nx) bool, scanned positions;
- ``/maps/prob`` (K, ny, nx) float32 line probability per view (0..1);
  ``/maps/disparity`` (ny, nx) float32, px: disparity of views 0-1 along their baseline
  (position in view 0 minus position in view 1, projected on (theta_1 - theta_0)/beta;
  positive above focus), NaN where unknown; ``/maps/sigma_disparity`` (ny, nx) px;
  ``/maps/dz_nm`` (ny, nx) float32, height above focus from the disparity (nm);
- ``/lines/NNNN/`` per dislocation: ``points_nm`` (n, 3) x, y, z in nm in the microscope
  frame (x, y: scan axes, position in a theta = 0 view with scan pixel (0, 0) at the
  origin; z: height above the probe focus, beam along +z); ``sigma_z_nm`` (n,) 1-sigma
  depth uncertainty; ``pixels_px`` (n, 2) (x, y) in view 0, scan px; attrs ``length_nm``,
  ``closed``, ``mean_probability``.  With a material and orientation also ``fractional``
  (n, 3) fractional coordinates (lattice units) and attrs ``direction`` (unit vector,
  microscope frame), ``direction_indices`` (real [uvw]), ``direction_uvw`` (nearest
  low-index, max index 3), ``direction_angle_deg``, ``habit_plane`` ("determined" |
  "undetermined"), ``habit_normal``, ``habit_indices`` (real (hkl)), ``habit_hkl``,
  ``habit_angle_deg`` (the last four only when determined), ``singular_values_nm``,
  ``curvature_ratio`` (s1/s0), ``planarity`` (s2/s1);
- ``/crystal`` (with a material): attrs ``material``, ``structure``, lattice parameters
  (``a_nm`` ... ``gamma_deg``), ``zone_axis``, ``g``, ``g_angle_deg``; datasets ``A_nm``
  (3, 3) direct lattice matrix (columns a, b, c) and ``U`` (3, 3) orientation (columns:
  microscope axes in crystal-Cartesian coordinates; fractional f = A^-1 U x).
- ``/tracks`` (recordings and 4D arrays: the scans of a run are an in-situ series, tracked
  as the live daemon tracks them, same settings): datasets ``line_id``, ``track_id``,
  ``status``, ``displacement_nm``, ``velocity_nm_s``, ``speed_nm_s``, ``speed_xy_nm_s``,
  ``dt_s``, ``distance_nm`` per line and attrs ``time_s``, ``clock``; each ``/lines/NNNN``
  gets the attr ``track_id`` (see ``livestereo.compute.tracking.write_tracks_hdf5``). The
  clock is the calibration's ``frame_time_s`` (back-to-back scans); without it ``clock`` is
  "none" and the velocities are NaN (identities and displacements are still there).

``summary.json``: ``livestereo_version``, ``input``, ``input_kind`` (recording | array |
manifest), ``created`` (ISO time), ``seconds`` and per scan: ``hdf5`` (path in the folder),
``seconds`` (inference, lines), and the same content as the HDF5 file without the maps:
``scan``, ``n_lines``, ``scan_step_nm``, ``thickness_nm``, ``thetas_mrad``, ``material``,
``lattice``, ``orientation``, and ``lines``: ``id``, ``n_points``, ``length_nm``,
``closed``, ``mean_probability``, ``z_range_nm``, ``median_sigma_z_nm``, ``points_nm``,
``sigma_z_nm`` and ``crystal`` {``direction``, ``direction_uvw``, ``direction_angle_deg``,
``habit_plane``, ``habit_hkl``, ``habit_angle_deg``, ..., ``fractional``}; ``tracks``
(as ``/tracks``, one entry per line). Top level also ``tracks``: per run id, every track
(``track_id``, ``scans``, ``total_displacement_nm``, ``mean_speed_nm_s``,
``mean_speed_xy_nm_s``, ``mean_velocity_nm_s``, ...) and ``track_clock``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from livestereo.commands._common import add_set_argument, parse_set_values, track_summary_lines
from livestereo.config import ConfigError
from livestereo.inference.analysis import ViewSet, crystal_from, meta_get as _meta_get, process_viewset  # noqa: F401

NAME = "reconstruct"
HELP = "reconstruct dislocations in 3D from a recording, a 4D array file or a manifest of view images"
DESCRIPTION = __doc__.split("Results (in")[0].split("\n", 2)[2] + """
examples:
  livestereo reconstruct today.lsrec --thickness-nm 150 --material gamma-TiAl --zone-axis 1 1 0 --g 0 0 2
  livestereo reconstruct data.npy --calibration cal.toml --thickness-nm 200
  livestereo reconstruct views.toml -o results/views
"""

log = logging.getLogger("livestereo.reconstruct")

ARRAY_SUFFIXES = (".npy", ".h5", ".hdf5", ".hdf", ".nxs")
IMAGE_SUFFIXES = (".npy", ".tif", ".tiff")


class ManifestError(ConfigError):
    """A manifest or view image that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------
# manifest


class ManifestView(BaseModel):
    """One view image of a manifest."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    file: str = Field(min_length=1)
    """Path of a 2D image (.npy, .tif, .tiff), relative to the manifest."""
    theta_mrad: tuple[float, float]
    """Incident angle (theta_x, theta_y) of the view (mrad, scan axes)."""
    name: str | None = None
    """Name of the view (default: the file stem)."""

    @field_validator("theta_mrad")
    @classmethod
    def _finite(cls, v):
        if not all(math.isfinite(x) for x in v):
            raise ValueError("incident angle must be finite")
        return v


class OrientationModel(BaseModel):
    """Zone axis along the beam and one indexed g at a known direction in the image."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    zone_axis: tuple[int, int, int]
    """[uvw] parallel to the beam."""
    g: tuple[int, int, int]
    """An indexed reflection (hkl), not parallel to the zone axis."""
    g_angle_deg: float = 0.0
    """Direction of g in the image (deg, scan axes, from +x towards +y)."""


class Manifest(BaseModel):
    """A set of 2D view images of one scan with their geometry."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    scan_step_nm: float = Field(gt=0, le=1e6)
    """Scan step p (nm per pixel)."""
    thickness_nm: float = Field(gt=0, le=1e6)
    """Foil thickness t (nm)."""
    material: str | None = None
    """Material preset name or TOML path (relative to the manifest)."""
    orientation: OrientationModel | None = None
    """Crystal orientation (needs material)."""
    valid: str | None = None
    """Optional (ny, nx) bool image of scanned positions (relative to the manifest)."""
    scan: int = Field(default=0, ge=0)
    """Scan number written to the results."""
    views: list[ManifestView] = Field(min_length=2)
    """Two or more views; view 0 is the reference."""


def read_image(path: Path, what: str) -> np.ndarray:
    """A 2D float64 image from .npy / .tif / .tiff; ManifestError naming ``what`` and the path."""
    if not path.is_file():
        raise ManifestError(f"{what}: file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            raise ManifestError(f"{what}: {path}: unsupported image type {suffix!r} (use .npy, .tif or .tiff)")
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file
        raise ManifestError(f"{what}: cannot read {path}: {exc}") from None
    arr = np.asarray(arr)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ManifestError(f"{what}: {path}: expected a 2D image (ny, nx), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ManifestError(f"{what}: {path}: pixel type {arr.dtype} is not a real number")
    return arr.astype(np.float64)


def load_manifest(path: str | Path, *, material: str | None = None, orientation: OrientationModel | None = None) -> ViewSet:
    """Read a manifest (TOML) and its view images into a :class:`ViewSet`.

    ``material`` / ``orientation`` override the manifest's.  Raises ManifestError (a
    ConfigError) naming the file and problem: unknown keys, a missing image, images of
    different shapes, NaN/inf pixels at scanned positions, identical incident angles of
    views 0 and 1, an orientation without a material.
    """
    import tomllib

    from livestereo.compute.crystal import MaterialError, Orientation, load_material
    from livestereo.protocol.codec import format_validation_error

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML ({exc})") from None
    try:
        man = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, str(path)).replace("; ", "\n")) from None
    base = path.parent
    images, names = [], []
    for i, v in enumerate(man.views):
        f = (base / v.file) if not Path(v.file).is_absolute() else Path(v.file)
        img = read_image(f, f"{path}: views[{i}].file")
        if img.dtype == bool:
            img = img.astype(np.float64)
        if images and img.shape != images[0].shape:
            raise ManifestError(
                f"{path}: views[{i}] {v.file} has shape {img.shape} but views[0] {man.views[0].file} "
                f"has shape {images[0].shape}: all views must be images of the same scan"
            )
        images.append(img)
        names.append(v.name or Path(v.file).stem)
    shape = images[0].shape
    if min(shape) < 8:
        raise ManifestError(f"{path}: views are {shape}: too small to reconstruct (need at least 8 x 8)")
    if man.valid is not None:
        vf = base / man.valid if not Path(man.valid).is_absolute() else Path(man.valid)
        valid = read_image(vf, f"{path}: valid").astype(bool)
        if valid.shape != shape:
            raise ManifestError(f"{path}: valid mask {man.valid} has shape {valid.shape} but the views have {shape}")
    else:
        valid = np.ones(shape, dtype=bool)
    for i, img in enumerate(images):
        bad = ~np.isfinite(img) & valid
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ManifestError(
                f"{path}: views[{i}] {man.views[i].file}: {int(bad.sum())} NaN/inf pixel(s) "
                f"(first at row {r}, col {c}); mark positions that were not scanned in a 'valid' mask"
            )
    thetas = np.array([v.theta_mrad for v in man.views], dtype=np.float64)
    if np.allclose(thetas[0], thetas[1]):
        raise ManifestError(f"{path}: views[0] and views[1] have the same incident angle {tuple(thetas[0])}: no stereo baseline")
    mat_name = material if material is not None else man.material
    orient = orientation if orientation is not None else man.orientation
    mat = ori = None
    if mat_name is not None:
        mp = Path(mat_name)
        if material is None and mp.suffix.lower() == ".toml" and not mp.is_absolute():
            mat_name = str(base / mp)
        try:
            mat = load_material(mat_name)
        except MaterialError as exc:
            raise ManifestError(f"{path}: material: {exc}") from None
    if orient is not None:
        if mat is None:
            raise ManifestError(f"{path}: an orientation needs a material (add material = \"...\")")
        try:
            ori = Orientation.from_zone_axis(mat.lattice, orient.zone_axis, orient.g, orient.g_angle_deg)
        except ValueError as exc:
            raise ManifestError(f"{path}: orientation: {exc}") from None
    views = np.stack([np.where(valid, im, 0.0) for im in images])
    return ViewSet(views, valid, thetas, names, man.scan_step_nm, man.thickness_nm, man.scan, mat, ori,
                   {"manifest": str(path), "files": [v.file for v in man.views]})


# --------------------------------------------------------------------------------------
# command


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="recording, 4D array (.npy / HDF5) or manifest (.toml)")
    p.add_argument("-o", "--output", type=Path, help="results folder (default <INPUT stem>_reconstruct next to INPUT)")
    p.add_argument("--calibration", type=Path, help="calibration TOML (Calibration fields) for a 4D array file")
    p.add_argument("--scan-shape", type=int, nargs=2, metavar=("NY", "NX"), help="scan shape for sources that do not carry it")
    p.add_argument("--thickness-nm", type=float, help="foil thickness t (nm)")
    p.add_argument("--material", help="material preset (gamma-TiAl, Al, Ni, Cu, Fe) or a material TOML")
    p.add_argument("--zone-axis", type=int, nargs=3, metavar=("U", "V", "W"), help="zone axis [uvw] along the beam")
    p.add_argument("--g", type=int, nargs=3, metavar=("H", "K", "L"), help="an indexed reflection g = (hkl)")
    p.add_argument("--g-angle-deg", type=float, default=None, help="direction of g in the image (deg from scan +x towards +y; default 0)")
    p.add_argument("--particles-config", type=Path, help="particle parameters and segment calibration (TOML) for segmented input")
    add_set_argument(p)
    p.epilog = ("--set keys: layout.* (LayoutSpec fields, recordings and arrays), lines.* (LineParams fields) and "
                "track.max_distance_nm / track.z_weight (in-situ tracking gate and depth weight; default: the live "
                "daemon's track_max_distance_nm, track_z_weight)")


def _orientation_from_args(args) -> OrientationModel | None:
    if args.zone_axis is None and args.g is None:
        return None
    if args.zone_axis is None or args.g is None:
        raise ConfigError("--zone-axis and --g go together")
    return OrientationModel(zone_axis=tuple(args.zone_axis), g=tuple(args.g), g_angle_deg=args.g_angle_deg or 0.0)


def _crystal(material: str | None, orient: OrientationModel | None, meta: dict):
    return crystal_from(material, orient, meta)


_TRACK_KEYS = ("max_distance_nm", "z_weight")


def _split_sets(pairs) -> tuple[dict, dict, dict]:
    """--set values as (layout.*, lines.*, track.*) dicts, prefixes removed."""
    groups: dict[str, dict] = {"layout": {}, "lines": {}, "track": {}}
    for key, value in parse_set_values(pairs).items():
        head, _, field = key.partition(".")
        if head not in groups or not field or (head == "track" and field not in _TRACK_KEYS):
            raise ConfigError(f"--set {key}: unknown key (use layout.<field>, lines.<field>, "
                              "track.max_distance_nm or track.z_weight)")
        groups[head][field] = value
    return groups["layout"], groups["lines"], groups["track"]


def accumulate_input(args, layout_overrides: dict) -> tuple[str, list]:
    """(input kind, ScanImages per scan) of a recording / 4D array via the daemon's accumulation."""
    from livestereo.config import load_toml, parse_config

    from livestereo.compute.layouts import LayoutSpec
    from livestereo.protocol.messages import Calibration

    suffix = args.input.suffix.lower()
    kind = "array" if suffix in ARRAY_SUFFIXES else "recording"
    if not args.input.exists():
        raise ConfigError(f"{args.input}: input not found")
    cal = load_toml(args.calibration, Calibration) if args.calibration else None
    if kind == "array" and suffix == ".npy" and cal is None:
        raise ConfigError(f"{args.input}: a .npy 4D array needs --calibration CAL.toml (fields of Calibration)")
    layout = parse_config(layout_overrides, LayoutSpec, "--set layout.*") if layout_overrides else None
    try:
        from livestereo.daemon.offline import accumulate_file
    except ImportError as exc:  # pragma: no cover - the daemon ships with the package
        raise RuntimeError(f"offline accumulation (livestereo.daemon.offline) is not available: {exc}") from None
    kw: dict[str, Any] = {"calibration": cal, "layout": layout}
    if args.scan_shape:
        kw["scan_shape"] = tuple(args.scan_shape)
    return kind, accumulate_file(args.input, **kw)


def is_segmented(scans) -> bool:
    """True when the scans' virtual images are the segments of a segmented detector."""
    roles = tuple(getattr(scans[0].layout, "roles", ()))
    return len(roles) >= 2 and all(r == "segment" for r in roles)


def views_from_scans(args, scans) -> list[ViewSet]:
    """Stereo view sets (the layout's views) of accumulated scans."""
    orient = _orientation_from_args(args)
    out = []
    for s in scans:
        meta = dict(getattr(s, "metadata", {}) or {})
        layout_info = getattr(s, "layout", None)
        idx = list(layout_info.view_indices) if layout_info is not None else list(range(s.images.shape[0]))
        if len(idx) < 2:
            raise ConfigError(f"{args.input}: scan {s.scan}: the layout gives {len(idx)} stereo view(s); need 2 or more")
        thickness = args.thickness_nm if args.thickness_nm is not None else _meta_get(meta, "thickness_nm")
        if thickness is None:
            raise ConfigError(f"{args.input}: foil thickness unknown: give --thickness-nm")
        mat, ori = _crystal(args.material, orient, meta)
        names = list(s.names)
        out.append(ViewSet(
            views=np.asarray(s.images)[idx], valid=np.asarray(s.valid, dtype=bool),
            thetas_mrad=np.asarray(s.centroids_mrad, dtype=np.float64)[idx], names=[names[i] for i in idx],
            scan_step_nm=float(s.calibration.scan_step_nm), thickness_nm=float(thickness), scan=int(s.scan),
            material=mat, orientation=ori, metadata={"run_id": getattr(s, "run_id", None), "start_metadata": meta},
        ))
    return out


def reconstruct_particles_offline(args, scans, outdir: Path, summary: dict) -> list[Path]:
    """Segmented input: nanoparticles per scan, the same call the daemon makes live."""
    from livestereo.compute.particles.params import ParticleParams, load_particle_config
    from livestereo.compute.particles.pipeline import reconstruct_particles, resolve_segment_angles
    from livestereo.compute.particles.table import write_particle_table

    params, seg_cal = (load_particle_config(args.particles_config) if args.particles_config else (ParticleParams(), None))
    written = []
    for s in scans:
        angles = resolve_segment_angles(len(s.layout.roles), s.calibration.segment_angles_mrad, seg_cal)
        t0 = time.perf_counter()
        table = reconstruct_particles(s.images, s.valid, angles, s.calibration.scan_step_nm, params)
        secs = time.perf_counter() - t0
        h5 = scan_file(outdir, scans, getattr(s, "run_id", None), s.scan)
        csv_path = h5.with_name(h5.stem + "_particles.csv")
        import h5py

        with h5py.File(h5, "w") as f:
            f.attrs["format"] = "livestereo.particles"
            f.attrs["scan"] = s.scan
            f.attrs["scan_step_nm"] = s.calibration.scan_step_nm
            f.create_dataset("segment_images", data=s.images.astype(np.float32))
            f.create_dataset("valid", data=s.valid)
            f.create_dataset("segment_angles_mrad", data=angles)
            write_particle_table(table, f.create_group("particles"), csv_path)
        written.append(h5)
        summary["scans"].append({"scan": s.scan, "hdf5": h5.relative_to(outdir).as_posix(),
                                 "csv": csv_path.relative_to(outdir).as_posix(), "n_particles": len(table),
                                 "seconds": round(secs, 4), "segment_angles_mrad": angles.tolist()})
        print(f"scan {s.scan}: {len(table)} particle(s) in {secs:.2f} s -> {h5}, {csv_path}")
    return written


def scan_file(outdir: Path, scans, run_id, scan: int, suffix: str = ".h5") -> Path:
    """``outdir/scan_NNNN<suffix>``; in a subfolder per run (named as the daemon names it)
    when the input holds several runs, whose scan numbers would collide."""
    if len({getattr(s, "run_id", None) for s in scans}) > 1:
        from livestereo.daemon.results import safe_name

        outdir = outdir / safe_name(str(run_id))
        outdir.mkdir(parents=True, exist_ok=True)
    return outdir / f"scan_{int(scan):04d}{suffix}"


def _tracker_settings(overrides: dict) -> dict:
    """LineTracker arguments: the live daemon's tracking settings (DaemonConfig's
    track_max_distance_nm, track_z_weight), with ``overrides`` (from --set track.*) validated there."""
    from livestereo.config import parse_config
    from livestereo.daemon.config import DaemonConfig

    cfg = parse_config({f"track_{k}": v for k, v in overrides.items()}, DaemonConfig, "--set track.*")
    return {"max_distance_nm": cfg.track_max_distance_nm, "z_weight": cfg.track_z_weight}


def _load_pipeline():
    """The trained dislocation pipeline (lazy: only livestereo.inference imports torch)."""
    try:
        from livestereo.inference.pipeline import DislocationPipeline
    except ImportError as exc:
        raise RuntimeError(
            "the dislocation networks are not available: cannot import "
            f"livestereo.inference.pipeline.DislocationPipeline ({exc})"
        ) from None
    return DislocationPipeline.load()


def write_scan(path: Path, vs: ViewSet, res, maps: dict, source: str, tracking: dict | None = None) -> None:
    """One scan's HDF5 results (layout in the module docstring); ``tracking``: the
    keyword arguments of write_tracks_hdf5 but the group (None: no ``/tracks``)."""
    import h5py

    from livestereo.compute.tracking import write_tracks_hdf5

    from livestereo import __version__

    with h5py.File(path, "w") as f:
        res.write_hdf5(f)
        f.attrs["input"] = source
        f.attrs["livestereo_version"] = __version__
        v = f.create_group("views")
        v.create_dataset("images", data=vs.views.astype(np.float32), compression="gzip", compression_opts=1)
        v.create_dataset("names", data=np.array(vs.names, dtype=h5py.string_dtype()))
        v.create_dataset("valid", data=vs.valid, compression="gzip", compression_opts=1)
        m = f.create_group("maps")
        for key, arr in maps.items():
            if arr is not None:
                m.create_dataset(key, data=arr, compression="gzip", compression_opts=1)
        m.attrs["frame"] = "view-0 scan coordinates (row, col); disparity in px along the baseline of views 0-1"
        if tracking is not None:
            write_tracks_hdf5(f, **tracking)


def scan_mid_times(scans) -> dict[tuple[Any, int], float | None]:
    """{(run id, scan): mid-time (s)} of accumulated scans on the live daemon's "frames"
    clock (back-to-back scans of frame_time_s per position); None without a frame time
    (offline, arrival times say nothing about the acquisition)."""
    from livestereo.inference.live import scan_time

    out: dict[tuple[Any, int], float | None] = {}
    for s in scans:
        try:
            t, _ = scan_time(s, "frames")
        except ValueError:  # no frame_time_s in the calibration
            t = None
        out[(getattr(s, "run_id", None), int(s.scan))] = t
    return out


def _jsonable(x):
    """numpy scalars/arrays -> Python, NaN/inf -> None, unknown objects -> str."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


def run(args) -> int:
    from livestereo import __version__
    from livestereo.compute.lines import LineParams
    from livestereo.config import parse_config

    layout_over, line_over, track_over = _split_sets(args.set)
    line_params = parse_config(line_over, LineParams, "--set lines.*") if line_over else None
    track_settings = _tracker_settings(track_over)
    src = args.input
    t_start = time.perf_counter()
    if src.suffix.lower() == ".toml":
        kind, scans = "manifest", []  # one scan of view images: no run, nothing to track
        orient = _orientation_from_args(args)
        vsets = [load_manifest(src, material=args.material, orientation=orient)]
        if args.thickness_nm is not None:
            vsets[0].thickness_nm = args.thickness_nm
    else:
        try:
            kind, scans = accumulate_input(args, layout_over)
            segmented = is_segmented(scans)
            vsets = [] if segmented else views_from_scans(args, scans)
        except ConfigError:
            raise
        except (ValueError, OSError, RuntimeError) as exc:
            print(f"livestereo reconstruct: {src}: {exc}", file=sys.stderr)
            return 2
        if segmented:
            outdir = args.output or src.with_name(src.stem + "_reconstruct")
            outdir.mkdir(parents=True, exist_ok=True)
            summary = {"livestereo_version": __version__, "input": str(src), "input_kind": kind + " (segmented: particles)",
                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "scans": []}
            try:
                reconstruct_particles_offline(args, scans, outdir, summary)
            except ValueError as exc:
                print(f"livestereo reconstruct: {src}: {exc}", file=sys.stderr)
                return 2
            summary["seconds"] = round(time.perf_counter() - t_start, 3)
            (outdir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1), encoding="utf-8")
            print(f"summary: {outdir / 'summary.json'}")
            return 0
    try:
        pipeline = _load_pipeline()
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"livestereo reconstruct: {exc}", file=sys.stderr)
        return 2
    outdir = args.output or src.with_name(src.stem + "_reconstruct")
    outdir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "livestereo_version": __version__,
        "input": str(src),
        "input_kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scans": [],
    }
    from livestereo.compute.tracking import LineTracker, steps_json

    times = scan_mid_times(scans)
    trackers: dict[Any, Any] = {}
    written = []
    for vs in vsets:
        res, maps, secs = process_viewset(pipeline, vs, line_params)
        h5 = scan_file(outdir, scans, vs.metadata.get("run_id"), vs.scan)
        tracking = steps = None
        if kind != "manifest":  # the scans of a run: an in-situ series
            run_id = vs.metadata.get("run_id")
            if run_id not in trackers:
                trackers[run_id] = LineTracker(**track_settings)
            tracker = trackers[run_id]
            t = times.get((run_id, vs.scan))
            # without an acquisition clock every scan gets time 0: no velocities, the rest stays
            steps = tracker.update_lines(vs.scan, 0.0 if t is None else t, res.lines)
            tracking = {"steps": steps, "lines": res.lines, "tracker": tracker, "time_s": t,
                        "clock": "frames" if t is not None else "none"}
        write_scan(h5, vs, res, maps, str(src), tracking)
        written.append(h5)
        entry = res.to_json_dict()
        entry["hdf5"] = h5.relative_to(outdir).as_posix()
        entry["seconds"] = secs
        if tracking is not None:
            entry["tracks"] = steps_json(steps, res.lines)
        summary["scans"].append(entry)
        n_det = sum(1 for a in (res.analyses or []) if a.habit == "determined")
        n_cont = sum(1 for st in steps or [] if st.status != "new")
        print(f"scan {vs.scan}: {len(res.lines)} dislocation line(s)"
              + (f", {n_det} with a habit plane" if res.analyses is not None else "")
              + (f", {n_cont} continuing a track" if steps is not None and vs.scan > 0 else "")
              + f" ({secs['inference']:.2f} s inference, {secs['lines']:.2f} s lines) -> {h5}")
    if trackers:
        summary["tracks"] = {str(run_id): tr.summary() for run_id, tr in trackers.items()}
        summary["track_clock"] = "frames" if any(t is not None for t in times.values()) else "none"
        if len(vsets) > 1:
            for run_id, tracks in summary["tracks"].items():
                print("\n".join(track_summary_lines(run_id, tracks)))
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    sp = outdir / "summary.json"
    tmp = sp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(summary), indent=1, allow_nan=False), encoding="utf-8")
    tmp.replace(sp)
    print(f"summary: {sp}")
    return 0
