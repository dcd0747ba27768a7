"""3D scenes for the simulator: a foil with dislocation lines, and their motion between scans.

Frame: the microscope frame in nm: x along scan columns, y along scan rows, z along the beam
(+z downstream), z = 0 at the foil mid-plane. The scan position (row, col) sits at
(x, y) = (col p, row p) for scan step p, so the field of view spans
[0, (nx-1) p] x [0, (ny-1) p]. The probe focus is at z = ``focus_nm``; a point at height z
has dz = z - focus_nm.

Every dislocation is a densely sampled 3D polyline (<= 0.4 nm apart) lying in a glide plane
of the crystal, clipped at the two foil surfaces (and at a margin around the field of view).
Each one is rebuilt from a few generator parameters (``Dislocation.params``), of which one
coordinate ``q`` moves in an in-situ series: the bulge of a pinned bowed segment, the in-plane
offset of a straight line / spline / dipole, the radius of a loop.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
from scipy.interpolate import BSpline

from livestereo.sim.config import SimConfig
from livestereo.sim.materials import (
    GlideSystem,
    Material,
    get_material,
    glide_systems,
    orientation_matrix,
    default_g,
    reciprocal_matrix,
    tilt_matrix,
)

#: maximum distance between neighbouring points of a dislocation (nm)
POINT_SPACING_NM = 0.4

KINDS = ("bowed", "spline", "straight", "loop", "dipole")
_KIND_P = np.array([0.35, 0.25, 0.15, 0.15, 0.10])


@dataclasses.dataclass
class Dislocation:
    """One dislocation line in the microscope frame."""

    id: int
    """Stable identifier (kept through an in-situ series)."""
    points_nm: np.ndarray
    """(n, 3) points x, y, z (nm), microscope frame, z = 0 at the foil mid-plane, consecutive
    points <= 0.4 nm apart; (0, 3) when the line has left the foil / field."""
    glide_plane_normal: np.ndarray
    """(3,) unit normal of the glide plane in the microscope frame (x, y, z)."""
    kind: str
    """"bowed" | "spline" | "straight" | "loop" | "dipole"."""
    glide_plane_hkl: tuple[int, int, int] = (0, 0, 0)
    """Miller indices of the glide plane (crystal frame)."""
    line_direction_uvw: tuple[int, int, int] | None = None
    """Preferred crystal direction of the line (straight / dipole lines; the chord otherwise)."""
    closed: bool = False
    """True for a complete loop: the last point repeats the first."""
    velocity_nm_per_scan: float = 0.0
    """Signed glide speed of the moving coordinate (nm per scan)."""
    contrast_strength: float = 1.0
    """Base strength of the diffraction contrast (unitless multiplier of ``contrast``)."""
    contrast_phase: float = 0.0
    """Phase (rad) of the contrast variation across the disc."""
    params: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    """Generator parameters (private to this module)."""


@dataclasses.dataclass
class Background:
    """Smooth random fields of the foil: bend contours and thickness fringes.

    Both are sums of plane waves sum_m amp_m cos(k_m . r + phase_m) over r = (x, y) in nm,
    lying at the foil mid-plane (z = 0); their angle dependence is a shift of the field
    value proportional to g . theta / alpha_ref.
    """

    bend_k: np.ndarray
    """(M, 2) wave vectors (rad/nm) of the bend-contour field."""
    bend_amp: np.ndarray
    bend_phase: np.ndarray
    bend_level: float
    """Field value at the centre of the contour band."""
    bend_width: float
    """Gaussian half-width of the band (field units)."""
    bend_shift: float
    """Change of the field at the band per unit g.theta/alpha_ref."""
    fringe_k: np.ndarray
    """(M, 2) wave vectors (rad/nm) of the fringe phase field."""
    fringe_amp: np.ndarray
    """(M,) amplitudes (rad) of the fringe phase field."""
    fringe_phase: np.ndarray
    fringe_shift: float
    """Fringe phase change (rad) per unit g.theta/alpha_ref."""
    alpha_ref_mrad: float
    """Angle scale (mrad) of the angle dependence (the convergence semi-angle)."""


@dataclasses.dataclass
class Scene:
    """A foil with dislocations at one moment of a series (nm, microscope frame)."""

    thickness_nm: float
    """Foil thickness t (nm) along the foil normal."""
    focus_nm: float
    """Probe focus height z_f (nm) relative to the foil mid-plane."""
    extent_nm: tuple[float, float]
    """(x, y) size of the field of view (nm): (nx p, ny p)."""
    dislocations: list[Dislocation]
    material: str
    zone_axis: tuple[int, int, int]
    foil_normal: np.ndarray
    """(3,) unit normal of the foil surfaces (microscope frame)."""
    center_nm: np.ndarray
    """(3,) centre of the foil mid-plane under the field of view (x, y, z) (nm)."""
    orientation: np.ndarray
    """(3, 3) crystal Cartesian -> microscope rotation (includes the foil tilt)."""
    g_hkl: tuple[int, int, int]
    """Reflection defining e_x and the direction of the excitation-error change."""
    g_direction: np.ndarray
    """(2,) unit direction (x, y) of g projected on the scan plane."""
    line_width_nm: float
    """FWHM of the line profile (nm)."""
    contrast: float
    """Attenuation at the centre of a line lying in the foil plane (unitless)."""
    contrast_variation: float
    """Relative contrast change across the disc (unitless)."""
    contrast_period_mrad: float
    """Period (mrad along g) of the contrast variation across the disc."""
    bend_contours: float
    thickness_fringes: float
    background: Background
    margin_nm: float
    """Lines are kept up to this far outside the field of view (nm)."""
    scan_index: int = 0
    """Number of scans this scene has been advanced from the initial one."""
    offset_nm: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2))
    """(x, y) drift offset (nm) already applied to the points (see :func:`translate`)."""

    @property
    def ids(self) -> list[int]:
        return [d.id for d in self.dislocations]

    def by_id(self, ident: int) -> Dislocation:
        for d in self.dislocations:
            if d.id == ident:
                return d
        raise KeyError(ident)


# ------------------------------------------------------------------------------- geometry helpers

def _resample(points: np.ndarray, spacing: float) -> np.ndarray:
    """Uniform arc-length resampling with spacing <= ``spacing`` (ends kept)."""
    if len(points) < 2:
        return points.copy()
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    total = s[-1]
    if total <= 0:
        return points[:1].copy()
    n = int(np.ceil(total / spacing)) + 1
    t = np.linspace(0.0, total, n)
    return np.stack([np.interp(t, s, points[:, k]) for k in range(3)], axis=1)


def _inside_fn(scene_geom: dict) -> Any:
    nf, c0, half_t = scene_geom["foil_normal"], scene_geom["center"], scene_geom["thickness"] / 2.0
    lo, hi = scene_geom["box_lo"], scene_geom["box_hi"]

    def f(p: np.ndarray) -> np.ndarray:
        """Signed distance-like margin (> 0 inside the slab and box)."""
        h = half_t - np.abs((p - c0) @ nf)
        bx = np.minimum(p[:, 0] - lo[0], hi[0] - p[:, 0])
        by = np.minimum(p[:, 1] - lo[1], hi[1] - p[:, 1])
        return np.minimum(h, np.minimum(bx, by))

    return f


def _clip(points: np.ndarray, closed: bool, geom: dict) -> tuple[np.ndarray, bool]:
    """Longest piece of the dense polyline inside the slab and box, ends interpolated onto the boundary."""
    f = _inside_fn(geom)(points)
    inside = f >= 0
    if inside.all():
        return points, closed
    if not inside.any():
        return np.zeros((0, 3)), False
    if closed:
        # rotate so the polyline starts outside; drop the duplicated closing point
        pts, ff = points[:-1], f[:-1]
        k = int(np.argmin(ff >= 0))
        points = np.concatenate([pts[k:], pts[:k], pts[k:k + 1]])
        f = np.concatenate([ff[k:], ff[:k], ff[k:k + 1]])
        inside = f >= 0
    # runs of inside samples
    edges = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    j = int(np.argmax(stops - starts))
    a, b = int(starts[j]), int(stops[j])  # inside samples a .. b-1
    piece = [points[a:b]]
    if a > 0:
        w = f[a] / (f[a] - f[a - 1])
        piece.insert(0, (points[a] + w * (points[a - 1] - points[a]))[None])
    if b < len(points):
        w = f[b - 1] / (f[b - 1] - f[b])
        piece.append((points[b - 1] + w * (points[b] - points[b - 1]))[None])
    return np.concatenate(piece), False


def _curve_points(params: dict) -> tuple[np.ndarray, bool]:
    """Unclipped dense curve of a dislocation from its generator parameters."""
    kind = params["kind"]
    q = params["q"]
    origin, u, m = params["origin"], params["u"], params["m"]
    if kind == "bowed":
        A, B = params["A"], params["B"]
        harm = params["harm"]
        L = float(np.linalg.norm(B - A))

        def fn(s):
            bow = np.sin(np.pi * s)
            for k, a in enumerate(harm, start=2):
                bow = bow + a * np.sin(k * np.pi * s)
            return A[None] + s[:, None] * (B - A)[None] + (q * bow)[:, None] * m[None]

        n = int(np.ceil((L + 3 * abs(q)) / 0.1)) + 2
        return fn(np.linspace(0, 1, n)), False
    if kind in ("straight", "dipole"):
        half = params["half_length"]
        n = int(np.ceil(2 * half / 0.1)) + 2
        s = np.linspace(-half, half, n)
        return origin[None] + q * m[None] + s[:, None] * u[None], False
    if kind == "spline":
        ctrl = params["ctrl"]  # (k, 2) in (u, m) coordinates relative to origin
        k = 3
        nc = len(ctrl)
        knots = np.concatenate([np.zeros(k), np.linspace(0, 1, nc - k + 1), np.ones(k)])
        spl = BSpline(knots, ctrl, k)
        length = float(np.sum(np.linalg.norm(np.diff(ctrl, axis=0), axis=1)))
        n = int(np.ceil(length / 0.1)) + 2
        uv = spl(np.linspace(0, 1, n))
        return origin[None] + (uv[:, :1]) * u[None] + (uv[:, 1:2] + q) * m[None], False
    if kind == "loop":
        harm = params["harm"]  # (a2, psi2, a3, psi3)
        n = int(np.ceil(2 * np.pi * q * 1.3 / 0.1)) + 8
        phi = np.linspace(0, 2 * np.pi, n)
        r = q * (1 + harm[0] * np.cos(2 * phi + harm[1]) + harm[2] * np.cos(3 * phi + harm[3]))
        pts = origin[None] + (r * np.cos(phi))[:, None] * u[None] + (r * np.sin(phi))[:, None] * m[None]
        pts[-1] = pts[0]
        return pts, True
    raise ValueError(f"unknown dislocation kind {kind!r}")


def _build(params: dict, geom: dict, offset: np.ndarray) -> tuple[np.ndarray, bool]:
    pts, closed = _curve_points(params)
    pts, closed = _clip(pts, closed, geom)
    if len(pts) >= 2:
        pts = _resample(pts, POINT_SPACING_NM)
        if closed:
            pts[-1] = pts[0]
    elif len(pts) == 1:
        pts = np.zeros((0, 3))
    if len(pts):
        pts = pts + np.array([offset[0], offset[1], 0.0])[None]
    return pts, closed


def _geom(scene: Scene) -> dict:
    ex, ey = scene.extent_nm
    m = scene.margin_nm
    return {
        "foil_normal": scene.foil_normal, "center": scene.center_nm, "thickness": scene.thickness_nm,
        "box_lo": np.array([-m, -m]), "box_hi": np.array([ex + m, ey + m]),
    }


def _plane_frame(n: np.ndarray, nf: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(dip, strike): unit in-plane directions, dip = steepest w.r.t. the foil normal."""
    d = nf - np.dot(nf, n) * n
    if np.linalg.norm(d) < 0.05:  # plane ~ parallel to the foil: any in-plane direction
        a = rng.uniform(0, 2 * np.pi)
        t = np.array([np.cos(a), np.sin(a), 0.0])
        d = t - np.dot(t, n) * n
    d /= np.linalg.norm(d)
    s = np.cross(n, d)
    return d, s / np.linalg.norm(s)


# ----------------------------------------------------------------------------------- generation

def _pick_system(systems: list[GlideSystem], nf: np.ndarray, rng: np.random.Generator) -> GlideSystem:
    cos_t = np.array([abs(float(np.dot(s.normal, nf))) for s in systems])
    sin_t = np.sqrt(np.clip(1 - cos_t ** 2, 0, 1))
    w = 0.15 + 2 * cos_t * sin_t  # prefer inclined planes (lines that span depth)
    return systems[int(rng.choice(len(systems), p=w / w.sum()))]


def _nearest_uvw(system: GlideSystem, direction: np.ndarray) -> tuple[int, int, int] | None:
    if not len(system.directions):
        return None
    k = int(np.argmax(np.abs(system.directions @ direction)))
    return system.directions_uvw[k]


def _propose(kind: str, system: GlideSystem, geom: dict, E: np.ndarray, t: float,
             rng: np.random.Generator) -> dict:
    """Random generator parameters of one dislocation of ``kind`` in ``system``."""
    n, nf, c0 = system.normal, geom["foil_normal"], geom["center"]
    dip, strike = _plane_frame(n, nf, rng)
    Emin = float(min(E))
    # a point of the plane inside the slab, over the central part of the field
    xy = c0[:2] + rng.uniform(-0.3, 0.3, 2) * E

    def at(h: float) -> np.ndarray:
        """The point above (x, y) = xy at slab coordinate h (nm along the foil normal from the mid-plane)."""
        z = (h - (xy - c0[:2]) @ nf[:2]) / nf[2] + c0[2]
        return np.array([xy[0], xy[1], z])

    origin = at(rng.uniform(-0.3, 0.3) * t)
    p: dict[str, Any] = {"kind": kind, "n": n, "origin": origin}
    if kind == "bowed":
        beta = rng.uniform(-0.5, 0.5)
        u = np.cos(beta) * dip + np.sin(beta) * strike
        uh = abs(float(np.dot(u, nf)))
        uxy = float(np.linalg.norm(u[:2]))
        L = min(0.92 * t / max(uh, 1e-6), 0.8 * Emin / max(uxy, 1e-6)) * rng.uniform(0.7, 1.0)
        # keep both ends inside the slab
        hmax = 0.5 * t - 0.5 * L * uh - 0.5
        origin = at(rng.uniform(-1, 1) * max(hmax, 0.0))
        p["origin"] = origin
        p["A"], p["B"] = origin - 0.5 * L * u, origin + 0.5 * L * u
        m = np.cross(n, u)
        p["u"], p["m"] = u, m / np.linalg.norm(m)
        p["harm"] = rng.normal(0.0, 0.12, 2)
        q = rng.choice([-1, 1]) * rng.uniform(0.1, 0.3) * L
        p["q"], p["q_lo"], p["q_hi"] = q, -0.6 * L, 0.6 * L
        p["length"] = L
    elif kind in ("straight", "dipole"):
        if len(system.directions):
            cand = system.directions
            # prefer directions that cross the foil
            w = 0.2 + np.abs(cand @ nf)
            u = cand[int(rng.choice(len(cand), p=w / w.sum()))].copy()
        else:
            u = dip.copy()
        uh = abs(float(np.dot(u, nf)))
        uxy = float(np.linalg.norm(u[:2]))
        p["half_length"] = 0.5 * min(1.2 * t / max(uh, 1e-6), 2.0 * float(max(E)) / max(uxy, 1e-6))
        m = np.cross(n, u)
        p["u"], p["m"] = u, m / np.linalg.norm(m)
        span = 0.35 * Emin / max(float(np.linalg.norm(p["m"][:2])), 0.3)
        p["q"], p["q_lo"], p["q_hi"] = 0.0, -span, span
    elif kind == "spline":
        beta = rng.uniform(-0.7, 0.7)
        u = np.cos(beta) * dip + np.sin(beta) * strike
        uh = abs(float(np.dot(u, nf)))
        uxy = float(np.linalg.norm(u[:2]))
        L = min(1.3 * t / max(uh, 1e-6), 1.5 * float(max(E)) / max(uxy, 1e-6))
        nc = int(rng.integers(5, 9))
        su = np.linspace(-0.5, 0.5, nc) * L + rng.normal(0, 0.03 * L, nc)
        sm = rng.normal(0.0, 0.12, nc) * min(L, 1.5 * Emin)
        m = np.cross(n, u)
        p["u"], p["m"] = u, m / np.linalg.norm(m)
        p["ctrl"] = np.stack([np.sort(su), sm], axis=1)
        span = 0.3 * Emin / max(float(np.linalg.norm(p["m"][:2])), 0.3)
        p["q"], p["q_lo"], p["q_hi"] = 0.0, -span, span
        p["length"] = L
    elif kind == "loop":
        u, m = dip, strike
        p["u"], p["m"] = u, m
        rmax_slab = 0.45 * t / max(abs(float(np.dot(dip, nf))), 1e-6)
        r0 = min(rng.uniform(0.08, 0.2) * Emin, rmax_slab)
        r0 = max(r0, 2.0)
        p["origin"] = at(rng.uniform(-0.2, 0.2) * t)
        p["harm"] = np.array([rng.uniform(0, 0.12), rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.06), rng.uniform(0, 2 * np.pi)])
        p["q"], p["q_lo"], p["q_hi"] = r0, 2.0, max(0.45 * Emin, r0 + 1.0)
    else:
        raise ValueError(kind)
    return p


def _make_background(cfg: SimConfig, extent: np.ndarray, rng: np.random.Generator) -> Background:
    Emax = float(max(extent))
    M = 4

    def modes(lam_lo: float, lam_hi: float):
        lam = rng.uniform(lam_lo, lam_hi, M) * Emax
        ang = rng.uniform(0, 2 * np.pi, M)
        k = (2 * np.pi / lam)[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
        return k, rng.uniform(0, 2 * np.pi, M), lam

    bk, bp, _ = modes(1.2, 3.0)
    fk, fp, flam = modes(2.0, 5.0)
    # fringe phase field: about 1.5 to 3 fringes across the field
    famp = 2 * np.pi * rng.uniform(1.5, 3.0) * flam / (2 * np.pi * Emax * np.sqrt(M / 2.0))
    return Background(
        bend_k=bk, bend_amp=np.full(M, np.sqrt(2.0 / M)), bend_phase=bp,
        bend_level=float(rng.uniform(-0.6, 0.6)), bend_width=float(rng.uniform(0.12, 0.25)),
        bend_shift=float(rng.uniform(0.2, 0.4) * rng.choice([-1, 1])),
        fringe_k=fk, fringe_amp=famp, fringe_phase=fp,
        fringe_shift=float(rng.uniform(0.5, 1.5) * rng.choice([-1, 1])),
        alpha_ref_mrad=float(cfg.convergence_semiangle_mrad),
    )


def make_scene(cfg: SimConfig, rng: np.random.Generator) -> Scene:
    """A random foil with ``cfg.n_dislocations`` lines on glide planes of ``cfg.material``.

    Deterministic given the state of ``rng``. Lines are accepted only when at least a few nm
    of them lie inside the foil over the field of view.
    """
    mat: Material = get_material(cfg.material)
    R0 = orientation_matrix(mat, cfg.zone_axis)
    Rt = tilt_matrix(cfg.foil_tilt_mrad)
    R = Rt @ R0
    nf = Rt @ np.array([0.0, 0.0, 1.0])
    ny, nx = cfg.scan_shape
    p = cfg.scan_step_nm
    extent = np.array([nx * p, ny * p], dtype=float)
    center = np.array([(nx - 1) * p / 2.0, (ny - 1) * p / 2.0, 0.0])
    g_hkl = default_g(mat, cfg.zone_axis)
    gvec = R @ (reciprocal_matrix(mat) @ np.asarray(g_hkl, dtype=float))
    gdir = gvec[:2] / max(np.linalg.norm(gvec[:2]), 1e-12)
    scene = Scene(
        thickness_nm=float(cfg.thickness_nm), focus_nm=float(cfg.focus_nm),
        extent_nm=(float(extent[0]), float(extent[1])), dislocations=[],
        material=cfg.material, zone_axis=tuple(int(v) for v in cfg.zone_axis),
        foil_normal=nf, center_nm=center, orientation=R, g_hkl=g_hkl, g_direction=gdir,
        line_width_nm=float(cfg.line_width_nm), contrast=float(cfg.contrast),
        contrast_variation=float(cfg.contrast_variation),
        contrast_period_mrad=float(rng.uniform(1.2, 2.5) * cfg.convergence_semiangle_mrad),
        bend_contours=float(cfg.bend_contours), thickness_fringes=float(cfg.thickness_fringes),
        background=_make_background(cfg, extent, rng), margin_nm=float(0.25 * max(extent)),
    )
    geom = _geom(scene)
    systems = glide_systems(mat, R)
    min_len = min(0.25 * float(min(extent)), 0.5 * cfg.thickness_nm, 20.0)
    next_id = 0
    remaining = cfg.n_dislocations
    while remaining > 0:
        kind = str(rng.choice(KINDS, p=_KIND_P))
        if kind == "dipole" and remaining < 2:
            kind = "bowed"
        speed = cfg.glide_velocity_nm_per_scan * rng.uniform(0.6, 1.4) * rng.choice([-1.0, 1.0])
        for _attempt in range(60):
            system = _pick_system(systems, nf, rng)
            params = _propose(kind, system, geom, extent, cfg.thickness_nm, rng)
            pts, closed = _build(params, geom, np.zeros(2))
            if len(pts) >= 2 and _visible_length(pts, extent, p) >= min_len:
                break
        else:  # pragma: no cover - extremely thin foils / tiny fields
            pts, closed = _build(params, geom, np.zeros(2))
        members = [params]
        if kind == "dipole":
            twin = copy.deepcopy(params)
            sep = rng.uniform(3.0, 8.0)
            twin["origin"] = params["origin"] + sep * params["n"] + rng.uniform(-3, 3) * params["m"]
            members.append(twin)
        group = next_id
        for prm in members:
            prm["v"] = float(speed)
            prm["group"] = group
            pts, closed = _build(prm, geom, np.zeros(2))
            chord = pts[-1] - pts[0] if len(pts) >= 2 and not closed else prm["u"]
            scene.dislocations.append(Dislocation(
                id=next_id, points_nm=pts, glide_plane_normal=system.normal.copy(), kind=kind,
                glide_plane_hkl=system.plane_hkl,
                line_direction_uvw=_nearest_uvw(system, chord / max(np.linalg.norm(chord), 1e-12)),
                closed=closed, velocity_nm_per_scan=float(speed),
                contrast_strength=float(rng.uniform(0.6, 1.0)), contrast_phase=float(rng.uniform(0, 2 * np.pi)),
                params=prm,
            ))
            next_id += 1
        remaining -= len(members)
    return scene


def _visible_length(pts: np.ndarray, extent: np.ndarray, p: float) -> float:
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= extent[0] - p) & (pts[:, 1] >= 0) & (pts[:, 1] <= extent[1] - p)
    if inside.sum() < 2:
        return 0.0
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    return float(np.sum(seg[inside[1:] & inside[:-1]]))


# ------------------------------------------------------------------------------------ motion

def advance(scene: Scene, scans: int, cfg: SimConfig | None = None,
            rng: np.random.Generator | None = None) -> Scene:
    """The scene ``scans`` scans later: every line glides in its plane (ids kept).

    Each line's moving coordinate (bulge of a pinned bowed segment, offset of a straight line /
    spline / dipole, radius of a loop) changes by its velocity (nm per scan) each scan,
    reflected between bounds so the lines stay in the field. With ``rng`` each step is scaled
    by a random factor (mean 1, gamma distributed, jerky motion; the two lines of a dipole
    move together); without it the motion is uniform. ``cfg`` is accepted for API symmetry
    (the speeds were drawn from it by :func:`make_scene`). Drift offsets are kept.
    """
    if scans < 0:
        raise ValueError("scans must be >= 0")
    out = dataclasses.replace(scene, dislocations=[], scan_index=scene.scan_index + scans,
                              offset_nm=np.array(scene.offset_nm, dtype=float))
    geom = _geom(scene)
    new_params = [copy.deepcopy(d.params) for d in scene.dislocations]
    for _step in range(scans):
        factors: dict[int, float] = {}
        for prm in new_params:
            g = prm.get("group", id(prm))
            if g not in factors:
                factors[g] = float(rng.gamma(4.0, 0.25)) if rng is not None else 1.0
            q = prm["q"] + prm["v"] * factors[g]
            lo, hi = prm["q_lo"], prm["q_hi"]
            if q > hi:
                q, prm["v"] = 2 * hi - q, -prm["v"]
            elif q < lo:
                q, prm["v"] = 2 * lo - q, -prm["v"]
            prm["q"] = float(np.clip(q, lo, hi))
    for d, prm in zip(scene.dislocations, new_params):
        pts, closed = _build(prm, geom, out.offset_nm)
        out.dislocations.append(dataclasses.replace(
            d, points_nm=pts, closed=closed, velocity_nm_per_scan=float(prm["v"]), params=prm))
    return out


def translate(scene: Scene, offset_nm: tuple[float, float] | np.ndarray) -> Scene:
    """The scene shifted by (dx, dy) nm in the scan plane (sample drift); kept by :func:`advance`."""
    off = np.asarray(offset_nm, dtype=float).reshape(2)
    shift = np.array([off[0], off[1], 0.0])
    return dataclasses.replace(
        scene, offset_nm=np.asarray(scene.offset_nm, dtype=float) + off,
        dislocations=[dataclasses.replace(d, points_nm=d.points_nm + shift if len(d.points_nm) else d.points_nm)
                      for d in scene.dislocations],
    )


def single_line_scene(points_nm: np.ndarray, *, thickness_nm: float = 100.0, focus_nm: float = 0.0,
                      extent_nm: tuple[float, float] = (64.0, 64.0), line_width_nm: float = 1.5,
                      contrast: float = 0.3, kind: str = "straight") -> Scene:
    """A scene holding just the given lines (tests, training data): no background, no contrast
    variation. ``points_nm`` is one (n, 3) array or a list of them (nm, microscope frame)."""
    curves = [points_nm] if isinstance(points_nm, np.ndarray) else list(points_nm)
    M = 1
    bg = Background(np.zeros((M, 2)), np.zeros(M), np.zeros(M), 0.0, 1.0, 0.0,
                    np.zeros((M, 2)), np.zeros(M), np.zeros(M), 0.0, 30.0)
    ds = [Dislocation(id=i, points_nm=np.asarray(c, dtype=float).reshape(-1, 3),
                      glide_plane_normal=np.array([0.0, 0.0, 1.0]), kind=kind) for i, c in enumerate(curves)]
    return Scene(
        thickness_nm=thickness_nm, focus_nm=focus_nm, extent_nm=extent_nm, dislocations=ds,
        material="none", zone_axis=(0, 0, 1), foil_normal=np.array([0.0, 0.0, 1.0]),
        center_nm=np.array([extent_nm[0] / 2, extent_nm[1] / 2, 0.0]), orientation=np.eye(3),
        g_hkl=(1, 0, 0), g_direction=np.array([1.0, 0.0]), line_width_nm=line_width_nm,
        contrast=contrast, contrast_variation=0.0, contrast_period_mrad=60.0,
        bend_contours=0.0, thickness_fringes=0.0, background=bg, margin_nm=0.0,
    )
