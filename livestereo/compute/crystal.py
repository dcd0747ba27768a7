"""Crystallography for 3D dislocation lines (design.md section 1, "Crystallography").

Frames and conventions
----------------------
- **Microscope frame**: x, y along the scan axes (x = scan column, y = scan row), z along
  the beam (+z downstream); lengths in nm.  Right-handed.
- **Crystal-Cartesian frame**: the orthonormal frame in which the lattice vectors are
  written: a along x_c, b in the (x_c, y_c) plane, c completing a right-handed set.
- **Direct lattice matrix** ``A = [a b c]``: the Cartesian lattice vectors as columns (nm).
  Metric ``G = A^T A`` (nm^2); reciprocal matrix ``B = A^-T`` (columns a*, b*, c*, in 1/nm,
  no 2 pi), so a plane (hkl) has the Cartesian normal ``B @ (h, k, l)``.
- **Orientation** ``U = [e_x e_y e_z]``: the microscope axes written in crystal-Cartesian
  coordinates, as columns.  It maps microscope components to crystal-Cartesian components
  (``x_c = U @ x_m``).  Its transpose ``R = U^T`` maps crystal to microscope.  In the
  notation of design.md (``f = A^-1 R^T x``, Miller ``~ A^T R^T n``), ``R`` is this
  crystal-to-microscope rotation, i.e. ``R^T = U``.
- Built from a zone axis [uvw] parallel to the beam and an indexed reflection g = (hkl)
  that appears in the image at ``g_angle_deg`` (degrees, measured in scan axes from +x
  towards +y):  ``e_z = A[uvw]/|.|``; ``g_hat`` = normalised projection of ``B(hkl)``
  perpendicular to e_z; ``e_x = cos(phi) g_hat - sin(phi) (e_z x g_hat)`` so that
  ``g_hat = cos(phi) e_x + sin(phi) e_y``; ``e_y = e_z x e_x``.  With ``phi = 0`` this is
  exactly "e_x = projection of g".
- **Fractional coordinates** of a microscope position x (nm): ``f = A^-1 U x``.
- **Line direction** v (microscope) -> ``[uvw] ~ A^-1 U v``; **plane normal** n
  (microscope) -> ``(hkl) ~ A^T U n``.  Directions and normals are sign-less here (a line
  or a plane has no sign); the indices returned are oriented to point the same way as the
  vector given.

Materials are read from TOML presets (``livestereo/presets/materials/*.toml``, also visible
as ``configs/materials``): :func:`load_material` takes a preset name (case-insensitive,
aliases allowed, e.g. ``"gamma-TiAl"``, ``"TiAl"``, ``"al"``) or a path to such a file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "Lattice",
    "Material",
    "MaterialError",
    "Orientation",
    "OrientationSpec",
    "PRESET_DIR",
    "angle_between_directions_deg",
    "angle_between_planes_deg",
    "index_direction",
    "index_plane",
    "known_materials",
    "load_material",
    "low_index_triplets",
]

#: Directory of the material presets shipped with the package (TOML, one file per material).
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "materials"


class MaterialError(ValueError):
    """A material name or file that cannot be used; the message says what is known."""


# --------------------------------------------------------------------------------------
# Lattice


class Lattice(BaseModel):
    """Unit cell: edge lengths in nm, angles in degrees (alpha = angle(b, c), beta =
    angle(a, c), gamma = angle(a, b)).  ``b_nm``/``c_nm`` default to ``a_nm``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    a_nm: float = Field(gt=0)
    """Length of a (nm)."""
    b_nm: float | None = Field(default=None, gt=0)
    """Length of b (nm); None: equal to a."""
    c_nm: float | None = Field(default=None, gt=0)
    """Length of c (nm); None: equal to a."""
    alpha_deg: float = Field(default=90.0, gt=0, lt=180)
    """Angle between b and c (deg)."""
    beta_deg: float = Field(default=90.0, gt=0, lt=180)
    """Angle between a and c (deg)."""
    gamma_deg: float = Field(default=90.0, gt=0, lt=180)
    """Angle between a and b (deg)."""

    @property
    def abc(self) -> tuple[float, float, float]:
        """(a, b, c) in nm."""
        return (self.a_nm, self.b_nm or self.a_nm, self.c_nm or self.a_nm)

    @property
    def A(self) -> np.ndarray:
        """Direct lattice matrix (3, 3), nm: columns are a, b, c in crystal-Cartesian axes."""
        return _direct_matrix(*self.abc, self.alpha_deg, self.beta_deg, self.gamma_deg).copy()

    @property
    def G(self) -> np.ndarray:
        """Metric tensor G = A^T A (nm^2)."""
        A = self.A
        return A.T @ A

    @property
    def B(self) -> np.ndarray:
        """Reciprocal lattice matrix B = A^-T (1/nm, no 2 pi): columns a*, b*, c*."""
        return np.linalg.inv(self.A).T

    def direction_cartesian(self, uvw) -> np.ndarray:
        """Unit crystal-Cartesian vector(s) of direction(s) [uvw]; uvw shape (..., 3)."""
        v = np.asarray(uvw, dtype=np.float64) @ self.A.T
        return _unit(v)

    def plane_normal_cartesian(self, hkl) -> np.ndarray:
        """Unit crystal-Cartesian normal(s) of plane(s) (hkl); hkl shape (..., 3)."""
        n = np.asarray(hkl, dtype=np.float64) @ self.B.T
        return _unit(n)

    def d_spacing_nm(self, hkl) -> float:
        """Interplanar spacing d_hkl = 1 / |B (hkl)| in nm."""
        return float(1.0 / np.linalg.norm(self.B @ np.asarray(hkl, dtype=np.float64)))


@lru_cache(maxsize=64)
def _direct_matrix(a, b, c, alpha, beta, gamma) -> np.ndarray:
    al, be, ga = (math.radians(x) for x in (alpha, beta, gamma))
    cx = c * math.cos(be)
    cy = c * (math.cos(al) - math.cos(be) * math.cos(ga)) / math.sin(ga)
    cz2 = c * c - cx * cx - cy * cy
    if cz2 <= 0:
        raise ValueError(f"lattice angles alpha={alpha}, beta={beta}, gamma={gamma} do not form a cell")
    A = np.array(
        [[a, b * math.cos(ga), cx], [0.0, b * math.sin(ga), cy], [0.0, 0.0, math.sqrt(cz2)]],
        dtype=np.float64,
    )
    A[np.abs(A) < 1e-15] = 0.0
    A.setflags(write=False)
    return A


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(n == 0):
        raise ValueError("zero vector has no direction")
    return v / n


# --------------------------------------------------------------------------------------
# Low-index indexing


@lru_cache(maxsize=16)
def low_index_triplets(max_index: int = 3) -> np.ndarray:
    """All integer triplets with components in [-max_index, max_index], gcd 1, one per +-pair,
    sorted from low to high index (by sum of squares, then by max |component|). (n, 3) int."""
    if max_index < 1:
        raise ValueError(f"max_index must be >= 1, got {max_index}")
    r = np.arange(-max_index, max_index + 1)
    t = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    t = t[np.any(t != 0, axis=1)]
    g = np.gcd.reduce(np.abs(t), axis=1)
    t = t[g == 1]
    # keep one of each +- pair: first non-zero component positive
    first = t[np.arange(len(t)), np.argmax(t != 0, axis=1)]
    t = t[first > 0]
    key = np.lexsort((np.abs(t).max(axis=1), (t * t).sum(axis=1)))
    out = t[key].astype(np.int64)
    out.setflags(write=False)
    return out


def _nearest(v_cart: np.ndarray, cand_cart: np.ndarray, cand: np.ndarray) -> tuple[tuple[int, int, int], float]:
    v = np.asarray(v_cart, dtype=np.float64)
    nv = np.linalg.norm(v)
    if not np.isfinite(nv) or nv == 0:
        raise ValueError(f"cannot index a zero or non-finite vector {v}")
    cos = cand_cart @ (v / nv)
    acos = np.abs(cos)
    best = float(acos.max())
    i = int(np.argmax(acos >= best - 1e-9))  # lowest index among (near-)ties
    sign = 1 if cos[i] >= 0 else -1
    idx = tuple(int(x) * sign for x in cand[i])
    return idx, _angle_deg(v, cand_cart[i], signless=True)  # type: ignore[return-value]


def _angle_deg(u: np.ndarray, v: np.ndarray, signless: bool = False) -> float:
    """Angle between two 3-vectors in degrees, accurate near 0 and 180 (atan2 form)."""
    d = float(u @ v)
    c = float(np.linalg.norm(np.cross(u, v)))
    if signless:
        d = abs(d)
    return math.degrees(math.atan2(c, d))


def index_direction(v_cart, lattice: Lattice, max_index: int = 3) -> tuple[tuple[int, int, int], float]:
    """Nearest low-index direction [uvw] to a crystal-Cartesian vector.

    Returns ([u, v, w] ints oriented along ``v_cart``, angle in degrees between them).
    Among directions equally close, the lowest index wins.
    """
    cand = low_index_triplets(max_index)
    return _nearest(v_cart, lattice.direction_cartesian(cand), cand)


def index_plane(n_cart, lattice: Lattice, max_index: int = 3) -> tuple[tuple[int, int, int], float]:
    """Nearest low-index plane (hkl) to a crystal-Cartesian plane normal.

    Returns ((h, k, l) ints oriented along ``n_cart``, angle in degrees between the normals).
    """
    cand = low_index_triplets(max_index)
    return _nearest(n_cart, lattice.plane_normal_cartesian(cand), cand)


def angle_between_directions_deg(lattice: Lattice, uvw1, uvw2) -> float:
    """Angle (deg, 0..180) between lattice directions [uvw1] and [uvw2] (uses the metric)."""
    return _angle_deg(lattice.direction_cartesian(uvw1), lattice.direction_cartesian(uvw2))


def angle_between_planes_deg(lattice: Lattice, hkl1, hkl2) -> float:
    """Angle (deg, 0..180) between the normals of planes (hkl1) and (hkl2)."""
    return _angle_deg(lattice.plane_normal_cartesian(hkl1), lattice.plane_normal_cartesian(hkl2))


# --------------------------------------------------------------------------------------
# Orientation


class OrientationSpec(BaseModel):
    """How the crystal sits in the microscope: zone axis along the beam and one reflection g
    at a known direction in the image (config / manifest form)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    zone_axis: tuple[int, int, int]
    """Zone axis [uvw] parallel to the beam (+z)."""
    g: tuple[int, int, int]
    """An indexed reflection (hkl), not parallel to the zone axis."""
    g_angle_deg: float = 0.0
    """Direction of g in the image: degrees in scan axes from +x towards +y."""


@dataclasses.dataclass(frozen=True)
class Orientation:
    """Crystal orientation in the microscope frame (see the module docstring).

    ``U`` (3, 3): columns e_x, e_y, e_z (microscope axes) in crystal-Cartesian coordinates.
    """

    lattice: Lattice
    U: np.ndarray
    zone_axis: tuple[int, int, int] | None = None
    g: tuple[int, int, int] | None = None
    g_angle_deg: float | None = None

    @classmethod
    def from_zone_axis(cls, lattice: Lattice, zone_axis: Sequence[int], g: Sequence[int],
                       g_angle_deg: float = 0.0) -> "Orientation":
        """Orientation with [uvw] = ``zone_axis`` along +z and (hkl) = ``g`` at ``g_angle_deg``
        (degrees, scan axes, from +x towards +y).  Raises ValueError if g is (nearly)
        parallel to the zone axis."""
        uvw = np.asarray(zone_axis, dtype=np.float64)
        hkl = np.asarray(g, dtype=np.float64)
        if uvw.shape != (3,) or not np.any(uvw):
            raise ValueError(f"zone axis must be three integers, not all zero: {zone_axis}")
        if hkl.shape != (3,) or not np.any(hkl):
            raise ValueError(f"g must be three integers, not all zero: {g}")
        e_z = lattice.direction_cartesian(uvw)
        gc = lattice.B @ hkl
        gp = gc - (gc @ e_z) * e_z
        if np.linalg.norm(gp) < 1e-6 * np.linalg.norm(gc):
            raise ValueError(f"g = {tuple(g)} is parallel to the zone axis {tuple(zone_axis)}: no in-plane direction")
        g_hat = gp / np.linalg.norm(gp)
        h_hat = np.cross(e_z, g_hat)
        phi = math.radians(g_angle_deg)
        e_x = math.cos(phi) * g_hat - math.sin(phi) * h_hat
        e_y = np.cross(e_z, e_x)
        U = np.column_stack([e_x, e_y, e_z])
        U.setflags(write=False)
        return cls(lattice, U, tuple(int(x) for x in zone_axis), tuple(int(x) for x in g), float(g_angle_deg))

    @classmethod
    def from_spec(cls, lattice: Lattice, spec: OrientationSpec) -> "Orientation":
        return cls.from_zone_axis(lattice, spec.zone_axis, spec.g, spec.g_angle_deg)

    @classmethod
    def identity(cls, lattice: Lattice) -> "Orientation":
        """Crystal-Cartesian axes = microscope axes."""
        U = np.eye(3)
        U.setflags(write=False)
        return cls(lattice, U)

    @property
    def R(self) -> np.ndarray:
        """Crystal-Cartesian -> microscope rotation (R = U^T; design.md's R)."""
        return self.U.T

    # positions and vectors, microscope -> crystal
    def to_crystal_cartesian(self, x) -> np.ndarray:
        """Microscope vectors/positions (..., 3) -> crystal-Cartesian components (..., 3)."""
        return np.asarray(x, dtype=np.float64) @ self.U.T

    def to_fractional(self, x_nm) -> np.ndarray:
        """Fractional coordinates f = A^-1 U x of microscope positions x (..., 3) in nm."""
        xc = self.to_crystal_cartesian(x_nm)
        return np.linalg.solve(self.lattice.A, xc.reshape(-1, 3).T).T.reshape(xc.shape)

    def direction_indices(self, v) -> np.ndarray:
        """Real-valued [uvw] ~ A^-1 U v of a microscope direction v (3,), scaled so that the
        largest |component| is 1."""
        f = self.to_fractional(v)
        return f / np.abs(f).max()

    def plane_indices(self, n) -> np.ndarray:
        """Real-valued (hkl) ~ A^T U n of a microscope plane normal n (3,), scaled so that the
        largest |component| is 1."""
        h = self.lattice.A.T @ self.to_crystal_cartesian(n)
        return h / np.abs(h).max()

    def index_line_direction(self, v, max_index: int = 3) -> tuple[tuple[int, int, int], float]:
        """Nearest low-index [uvw] to microscope direction v, with the angle (deg)."""
        return index_direction(self.to_crystal_cartesian(v), self.lattice, max_index)

    def index_plane_normal(self, n, max_index: int = 3) -> tuple[tuple[int, int, int], float]:
        """Nearest low-index (hkl) to microscope plane normal n, with the angle (deg)."""
        return index_plane(self.to_crystal_cartesian(n), self.lattice, max_index)

    # crystal -> microscope
    def uvw_to_microscope(self, uvw) -> np.ndarray:
        """Unit microscope vector(s) along lattice direction(s) [uvw] (..., 3)."""
        return self.lattice.direction_cartesian(uvw) @ self.U

    def hkl_to_microscope(self, hkl) -> np.ndarray:
        """Unit microscope normal(s) of plane(s) (hkl) (..., 3)."""
        return self.lattice.plane_normal_cartesian(hkl) @ self.U

    def to_json_dict(self) -> dict:
        return {
            "zone_axis": list(self.zone_axis) if self.zone_axis else None,
            "g": list(self.g) if self.g else None,
            "g_angle_deg": self.g_angle_deg,
            "U_microscope_to_crystal_cartesian": self.U.tolist(),
        }


# --------------------------------------------------------------------------------------
# Materials


class Material(BaseModel):
    """A material preset (TOML): lattice and the usual dislocation crystallography."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    name: str = Field(min_length=1)
    """Display name, e.g. "gamma-TiAl"."""
    aliases: tuple[str, ...] = ()
    """Other names accepted by load_material (case-insensitive)."""
    structure: str = ""
    """Structure type, e.g. "fcc", "bcc", "L1_0"."""
    description: str = ""
    """Free text."""
    lattice: Lattice
    """Unit cell (nm, deg)."""
    glide_planes: tuple[tuple[int, int, int], ...] = ()
    """Usual glide-plane families {hkl}, informational."""
    line_directions: tuple[tuple[int, int, int], ...] = ()
    """Usual dislocation line-direction families <uvw>, informational."""

    @field_validator("glide_planes", "line_directions")
    @classmethod
    def _nonzero(cls, v):
        for t in v:
            if not any(t):
                raise ValueError("index triplet (0, 0, 0) is not a direction or plane")
        return v


def _preset_files() -> list[Path]:
    return sorted(PRESET_DIR.glob("*.toml")) if PRESET_DIR.is_dir() else []


def _read_material(path: Path) -> Material:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MaterialError(f"{path}: material file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise MaterialError(f"{path}: not valid TOML ({exc})") from None
    try:
        return Material.model_validate(data)
    except ValidationError as exc:
        from livestereo.protocol.codec import format_validation_error

        raise MaterialError(format_validation_error(exc, str(path)).replace("; ", "\n")) from None


def known_materials() -> dict[str, Path]:
    """Preset name -> file, for every shipped preset."""
    out = {}
    for p in _preset_files():
        out[_read_material(p).name] = p
    return out


def load_material(name_or_path: str | Path) -> Material:
    """A material from a preset name (case-insensitive; file stem, name or alias) or a TOML
    file path.  Raises MaterialError listing the known presets when nothing matches."""
    s = str(name_or_path)
    p = Path(s)
    if p.suffix.lower() == ".toml" or p.is_file():
        if not p.is_file():
            raise MaterialError(f"{p}: material file not found (known presets: {', '.join(known_materials()) or 'none'})")
        return _read_material(p)
    key = s.strip().lower()
    names = []
    for f in _preset_files():
        m = _read_material(f)
        names.append(m.name)
        if key in {f.stem.lower(), m.name.lower(), *(a.lower() for a in m.aliases)}:
            return m
    raise MaterialError(
        f"unknown material {s!r}: known presets are {', '.join(names) or 'none'} "
        f"(or give a path to a material TOML file)"
    )
