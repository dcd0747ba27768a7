"""A small table of crystal structures for the simulator: lattice parameters and glide systems.

Conventions (design.md section 1, "Crystallography"):

- direct lattice matrix ``A = [a b c]`` with the lattice vectors as Cartesian columns (nm);
  a direction ``[uvw]`` is the Cartesian vector ``A @ (u, v, w)``;
- reciprocal matrix ``B = A^-T``; a plane ``(hkl)`` has the Cartesian normal ``B @ (h, k, l)``;
- the orientation matrix ``R`` (3, 3) maps crystal Cartesian vectors into the microscope frame:
  ``v_mic = R @ v_cart``; its rows are ``e_x, e_y, e_z`` (crystal Cartesian components) with
  ``e_z`` along the zone axis (the beam, +z) and ``e_x`` along the projection of a chosen ``g``.

Only what the simulator needs is here: put dislocations on plausible glide planes and along
plausible line directions for a given zone axis.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Literal

import numpy as np

from livestereo.compute.crystal import load_material

Structure = Literal["fcc", "bcc", "L1_0"]


@dataclasses.dataclass(frozen=True)
class Material:
    """A crystal: lattice parameters (nm) and glide systems as Miller-index families."""

    name: str
    structure: Structure
    a_nm: float
    """Lattice parameter a (nm) (= b)."""
    c_nm: float
    """Lattice parameter c (nm); equal to a for cubic crystals."""
    glide_planes: tuple[tuple[int, int, int], ...]
    """Representatives of the glide-plane families {hkl} (all signed permutations are used)."""
    line_directions: tuple[tuple[int, int, int], ...]
    """Representatives of the preferred line / Burgers-vector families <uvw>."""
    description: str = ""


def _preset(name: str, glide_planes, line_directions, description: str) -> Material:
    """The simulator's glide systems for ``name``, with the lattice parameters of the shipped
    preset (livestereo/presets/materials, the same file the reconstruction indexes with)."""
    lattice = load_material(name).lattice
    return Material(name, load_material(name).structure, lattice.a_nm, lattice.c_nm or lattice.a_nm,
                    glide_planes, line_directions, description)


MATERIALS: dict[str, Material] = {
    "gamma-TiAl": _preset(
        "gamma-TiAl", ((1, 1, 1),), ((1, 1, 0), (1, 0, 1)),
        "gamma-TiAl, L1_0 (tetragonal, c/a ~ 1.02): glide on {111}, ordinary 1/2<110] and super <101] dislocations",
    ),
    "Al": _preset("Al", ((1, 1, 1),), ((1, 1, 0),), "aluminium, fcc: {111}<110>"),
    "Ni": _preset("Ni", ((1, 1, 1),), ((1, 1, 0),), "nickel, fcc: {111}<110>"),
    "Cu": _preset("Cu", ((1, 1, 1),), ((1, 1, 0),), "copper, fcc: {111}<110>"),
    "Fe": _preset("Fe", ((1, 1, 0), (1, 1, 2)), ((1, 1, 1),), "alpha-iron, bcc: {110}<111> and {112}<111>"),
}


def get_material(name: str) -> Material:
    """The preset called ``name`` (KeyError lists the known ones)."""
    try:
        return MATERIALS[name]
    except KeyError:
        raise KeyError(f"unknown material {name!r}; known: {', '.join(MATERIALS)}") from None


def lattice_matrix(material: Material) -> np.ndarray:
    """Direct lattice matrix A (3, 3) (nm): lattice vectors a, b, c as Cartesian columns."""
    return np.diag([material.a_nm, material.a_nm, material.c_nm]).astype(np.float64)


def reciprocal_matrix(material: Material) -> np.ndarray:
    """Reciprocal matrix B = A^-T (3, 3) (1/nm, no 2 pi): ``B @ (h, k, l)`` is the plane normal."""
    return np.linalg.inv(lattice_matrix(material)).T


def family(rep: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """All signed permutations of ``rep``, one of each +-pair (sorted, deterministic)."""
    out: set[tuple[int, int, int]] = set()
    for perm in set(itertools.permutations(rep)):
        for signs in itertools.product((1, -1), repeat=3):
            v = tuple(int(s * p) for s, p in zip(signs, perm))
            if v == (0, 0, 0):
                continue
            neg = tuple(-x for x in v)
            out.add(max(v, neg))  # canonical representative of +-v
    return sorted(out, reverse=True)


def is_allowed_reflection(hkl: tuple[int, int, int], structure: Structure) -> bool:
    """Structure-factor rule: fcc unmixed parity, bcc h+k+l even, L1_0 everything (superlattice)."""
    h, k, l = hkl
    if structure == "fcc":
        return len({h % 2, k % 2, l % 2}) == 1
    if structure == "bcc":
        return (h + k + l) % 2 == 0
    return True


def default_g(material: Material, zone_axis: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shortest allowed reflection g = (hkl) in the zone (h u + k v + l w = 0); deterministic."""
    B = reciprocal_matrix(material)
    best: tuple[float, tuple[int, int, int]] | None = None
    for hkl in itertools.product(range(-3, 4), repeat=3):
        if hkl == (0, 0, 0) or int(np.dot(hkl, zone_axis)) != 0:
            continue
        if not is_allowed_reflection(hkl, material.structure):
            continue
        length = float(np.linalg.norm(B @ np.asarray(hkl, dtype=float)))
        key = (round(length, 9), tuple(-x for x in hkl))  # prefer positive leading indices
        if best is None or key < (round(best[0], 9), tuple(-x for x in best[1])):
            best = (length, hkl)
    if best is None:
        raise ValueError(f"no reflection found in zone {zone_axis}")
    return best[1]


def orientation_matrix(material: Material, zone_axis: tuple[int, int, int],
                       g_hkl: tuple[int, int, int] | None = None) -> np.ndarray:
    """Rotation R (3, 3), crystal Cartesian -> microscope frame, zone axis [uvw] along +z.

    ``e_z = A[uvw]/|.|``; ``e_x`` = normalised projection of ``B(hkl)`` perpendicular to e_z
    (``g_hkl`` default: :func:`default_g`); ``e_y = e_z x e_x``. Rows of R are e_x, e_y, e_z.
    """
    if tuple(zone_axis) == (0, 0, 0):
        raise ValueError("zone axis [000] has no direction")
    A, B = lattice_matrix(material), reciprocal_matrix(material)
    ez = A @ np.asarray(zone_axis, dtype=float)
    ez /= np.linalg.norm(ez)
    g = B @ np.asarray(g_hkl if g_hkl is not None else default_g(material, zone_axis), dtype=float)
    ex = g - np.dot(g, ez) * ez
    if np.linalg.norm(ex) < 1e-9:
        raise ValueError(f"g {g_hkl} is parallel to the zone axis {zone_axis}")
    ex /= np.linalg.norm(ex)
    ey = np.cross(ez, ex)
    return np.stack([ex, ey, ez])


def tilt_matrix(tilt_mrad: tuple[float, float]) -> np.ndarray:
    """Rotation (3, 3) that tilts +z towards (+x, +y) by (tx, ty) mrad (minimal rotation)."""
    tx, ty = (1e-3 * float(t) for t in tilt_mrad)
    n = np.array([np.sin(tx), np.sin(ty), 1.0])
    n[2] = np.sqrt(max(1.0 - n[0] ** 2 - n[1] ** 2, 1e-12))
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(z, n)
    s, c = np.linalg.norm(v), float(np.dot(z, n))
    if s < 1e-15:
        return np.eye(3)
    k = v / s
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + s * K + (1 - c) * (K @ K)


@dataclasses.dataclass(frozen=True)
class GlideSystem:
    """One glide plane and the preferred line directions lying in it, in both frames."""

    plane_hkl: tuple[int, int, int]
    normal: np.ndarray
    """Unit plane normal (3,) in the microscope frame (x, y, z)."""
    directions_uvw: tuple[tuple[int, int, int], ...]
    directions: np.ndarray
    """Unit line directions (m, 3) in the microscope frame lying in the plane."""


def glide_systems(material: Material, orientation: np.ndarray) -> list[GlideSystem]:
    """Every glide plane of ``material`` with its in-plane preferred directions (microscope frame)."""
    A, B = lattice_matrix(material), reciprocal_matrix(material)
    dirs = [d for rep in material.line_directions for d in family(rep)]
    out = []
    seen: set[tuple[int, int, int]] = set()
    for rep in material.glide_planes:
        for hkl in family(rep):
            if hkl in seen:
                continue
            seen.add(hkl)
            n = orientation @ (B @ np.asarray(hkl, dtype=float))
            n /= np.linalg.norm(n)
            in_plane = tuple(d for d in dirs if int(np.dot(d, hkl)) == 0)
            vecs = np.array([orientation @ (A @ np.asarray(d, dtype=float)) for d in in_plane]).reshape(-1, 3)
            if len(vecs):
                vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            out.append(GlideSystem(hkl, n, in_plane, vecs))
    return out
