"""Crystals for the simulator: unit cells of every lattice system, centring absences, orientations.

Conventions (kept identical to DIALS so A matrices can be compared directly):

- ``A`` is the 3x3 reciprocal-basis matrix in the lab frame, in 1/Angstrom, whose **columns** are
  a*, b*, c*; the scattering vector of a reflection is ``q = A @ (h, k, l)``.
- The lab frame is CrystFEL's: +z along the beam, +y up, right-handed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Centrings accepted per lattice system.  ``H`` is the rhombohedral lattice in hexagonal axes
#: (obverse setting), as CrystFEL spells it.
CENTRINGS: dict[str, tuple[str, ...]] = {
    "triclinic": ("P",),
    "monoclinic": ("P", "C"),
    "orthorhombic": ("P", "C", "I", "F"),
    "tetragonal": ("P", "I"),
    "hexagonal": ("P", "H"),
    "rhombohedral": ("R",),
    "cubic": ("P", "I", "F"),
}

#: CrystFEL unique axis per lattice system (written into streams).
UNIQUE_AXIS = {"monoclinic": "b", "tetragonal": "c", "hexagonal": "c"}


@dataclass(frozen=True)
class Cell:
    """A unit cell: lengths in Angstrom, angles in degrees, with its lattice system and centring."""

    a: float
    b: float
    c: float
    alpha: float
    beta: float
    gamma: float
    lattice: str = "triclinic"
    centring: str = "P"

    def __post_init__(self) -> None:
        if self.lattice not in CENTRINGS:
            raise ValueError(f"unknown lattice system {self.lattice!r}; known: {sorted(CENTRINGS)}")
        if self.centring not in CENTRINGS[self.lattice]:
            raise ValueError(f"centring {self.centring!r} is not valid for a {self.lattice} lattice"
                             f" (allowed: {', '.join(CENTRINGS[self.lattice])})")
        if min(self.a, self.b, self.c) <= 0:
            raise ValueError(f"cell lengths must be positive, got {self.parameters}")

    @property
    def parameters(self) -> tuple[float, float, float, float, float, float]:
        return (self.a, self.b, self.c, self.alpha, self.beta, self.gamma)

    @property
    def unique_axis(self) -> str:
        return UNIQUE_AXIS.get(self.lattice, "*")

    def real_basis(self) -> np.ndarray:
        """Columns a, b, c in the crystal's standard frame (a along x, b in the xy plane)."""
        al, be, ga = np.radians([self.alpha, self.beta, self.gamma])
        cx = np.cos(be)
        cy = (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
        cz2 = 1.0 - cx * cx - cy * cy
        if cz2 <= 0:
            raise ValueError(f"cell angles {self.alpha}, {self.beta}, {self.gamma} do not close")
        return np.array([
            [self.a, self.b * np.cos(ga), self.c * cx],
            [0.0, self.b * np.sin(ga), self.c * cy],
            [0.0, 0.0, self.c * np.sqrt(cz2)],
        ])

    def reciprocal_basis(self) -> np.ndarray:
        """Columns a*, b*, c* (1/Angstrom) in the standard frame: the B matrix."""
        return np.linalg.inv(self.real_basis()).T

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.real_basis())))

    def to_dict(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b, "c": self.c, "alpha": self.alpha, "beta": self.beta,
                "gamma": self.gamma, "lattice": self.lattice, "centring": self.centring}


#: A small set of real protein cells covering every lattice system and centring, so random
#: training frames see the spot patterns real experiments make.
PRESET_CELLS: dict[str, Cell] = {
    "lysozyme": Cell(79.1, 79.1, 38.0, 90, 90, 90, "tetragonal", "P"),
    "thermolysin": Cell(92.9, 92.9, 130.4, 90, 90, 120, "hexagonal", "P"),
    "insulin_cubic": Cell(78.9, 78.9, 78.9, 90, 90, 90, "cubic", "I"),
    "insulin_r3": Cell(81.3, 81.3, 33.7, 90, 90, 120, "hexagonal", "H"),
    "myoglobin": Cell(64.1, 30.8, 34.8, 90, 105.8, 90, "monoclinic", "P"),
    "trypsin": Cell(54.8, 58.5, 67.5, 90, 90, 90, "orthorhombic", "P"),
    "glucose_isomerase": Cell(93.9, 99.7, 102.9, 90, 90, 90, "orthorhombic", "I"),
    "gpcr_c2": Cell(61.5, 91.5, 151.1, 90, 98.5, 90, "monoclinic", "C"),
    "lysozyme_triclinic": Cell(27.2, 31.9, 34.2, 88.5, 108.5, 111.9, "triclinic", "P"),
    "ferritin_like": Cell(130.0, 130.0, 130.0, 90, 90, 90, "cubic", "F"),
    "proteinase_k": Cell(68.3, 68.3, 108.0, 90, 90, 90, "tetragonal", "P"),
    "rhombo_small": Cell(40.0, 40.0, 40.0, 80.0, 80.0, 80.0, "rhombohedral", "R"),
}


def absent(h: np.ndarray, k: np.ndarray, l: np.ndarray,  # noqa: E741 (Miller index l)
           centring: str) -> np.ndarray:
    """True for reflections that the lattice centring extinguishes (systematic absences)."""
    if centring in ("P", "R"):
        return np.zeros(np.shape(h), dtype=bool)
    if centring == "C":
        return (h + k) % 2 != 0
    if centring == "A":
        return (k + l) % 2 != 0
    if centring == "B":
        return (h + l) % 2 != 0
    if centring == "I":
        return (h + k + l) % 2 != 0
    if centring == "F":
        return ~(((h % 2) == (k % 2)) & ((k % 2) == (l % 2)))
    if centring == "H":
        return (-h + k + l) % 3 != 0
    raise ValueError(f"unknown centring {centring!r}")


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (a normalised Gaussian quaternion)."""
    w, x, y, z = rng.standard_normal(4)
    n = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def cell_from_A(A: np.ndarray) -> tuple[float, float, float, float, float, float]:
    """Cell parameters (Angstrom, degrees) of the real lattice whose reciprocal basis is ``A``."""
    real = np.linalg.inv(np.asarray(A, dtype=float)).T  # columns a, b, c
    a, b, c = (real[:, i] for i in range(3))

    def angle(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v))))

    return (float(np.linalg.norm(a)), float(np.linalg.norm(b)), float(np.linalg.norm(c)),
            angle(b, c), angle(a, c), angle(a, b))


def sigma_excitation(q: np.ndarray, wavelength_A: float, bandwidth: float, mosaicity_rad: float,
                     profile_radius: float) -> np.ndarray:
    """Spread (1 sigma, 1/Angstrom) of the excitation error a reflection at ``|q|`` may have.

    Three independent contributions: the crystal's own reciprocal-lattice point size
    (``profile_radius``), the mosaic spread (a rotation by eta moves q by ``q * eta``), and the
    spectral bandwidth (a fractional wavelength change b moves the Ewald sphere by
    ``b * q**2 * lambda / 2`` at ``q``).
    """
    q = np.asarray(q, dtype=float)
    return np.sqrt(profile_radius ** 2 + (q * mosaicity_rad) ** 2
                   + (bandwidth * q * q * wavelength_A / 2.0) ** 2)


def excited_reflections(A: np.ndarray, centring: str, wavelength_A: float, q_max: float,
                        tolerance: float) -> np.ndarray:
    """Integer (h, k, l) rows whose q lies within ``tolerance`` of the Ewald sphere, |q| <= q_max.

    Instead of enumerating the full reciprocal-lattice ball (millions of points for large cells),
    each (h, k) line ``q(l) = q_hk + l c*`` is intersected with the shell between the spheres of
    radii ``1/lambda -/+ tolerance``; only the few l values inside the shell are generated.
    """
    A = np.asarray(A, dtype=float)
    k0 = 1.0 / wavelength_A
    real = np.linalg.inv(A).T
    h_max = int(np.ceil(q_max * np.linalg.norm(real[:, 0]))) + 1
    k_max = int(np.ceil(q_max * np.linalg.norm(real[:, 1]))) + 1
    hh, kk = np.meshgrid(np.arange(-h_max, h_max + 1), np.arange(-k_max, k_max + 1), indexing="ij")
    hh, kk = hh.ravel(), kk.ravel()
    p = hh[:, None] * A[:, 0] + kk[:, None] * A[:, 1]
    p[:, 2] += k0  # vector from the sphere centre (-k0 z) to q_hk
    cvec = A[:, 2]
    cc = float(cvec @ cvec)
    pc = p @ cvec
    pp = np.einsum("ij,ij->i", p, p)

    def roots(radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        disc = pc * pc - cc * (pp - radius * radius)
        ok = disc >= 0
        s = np.sqrt(np.where(ok, disc, 0.0))
        return ok, (-pc - s) / cc, (-pc + s) / cc

    ok_out, lo_out, hi_out = roots(k0 + tolerance)
    ok_in, lo_in, hi_in = roots(max(k0 - tolerance, 0.0))
    # Outer interval minus the open inner interval: [lo_out, lo_in] and [hi_in, hi_out].
    segments = [(ok_out, lo_out, np.where(ok_in, lo_in, hi_out)), (ok_out & ok_in, hi_in, hi_out)]
    chunks = []
    for valid, lo, hi in segments:
        start = np.ceil(np.where(valid, lo, 0.0)).astype(np.int64)
        stop = np.floor(np.where(valid, hi, -1.0)).astype(np.int64)
        stop = np.where(valid, stop, start - 1)
        count = np.clip(stop - start + 1, 0, None)
        total = int(count.sum())
        if total == 0:
            continue
        pair = np.repeat(np.arange(len(count)), count)
        offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
        chunks.append(np.stack([hh[pair], kk[pair], start[pair] + offset], axis=1))
    if not chunks:
        return np.zeros((0, 3), dtype=np.int64)
    hkl = np.unique(np.concatenate(chunks), axis=0)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    q = hkl @ A.T
    keep = (np.einsum("ij,ij->i", q, q) <= q_max * q_max) & ~absent(
        hkl[:, 0], hkl[:, 1], hkl[:, 2], centring)
    return hkl[keep]
