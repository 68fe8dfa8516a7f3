"""One simulated still: crystals -> excited reflections -> spots + background -> noisy ADU frame.

Everything random comes from one ``numpy.random.Generator`` seeded with the frame's seed, so the
same seed always gives the identical frame and truth.  Detector defects (dead and hot pixels) come
from ``config.defect_seed`` instead, because they belong to the detector, not to the shot: every
frame of a run shares them, and the CXI stack can store one static mask.

Speed (issue 3 item 6, ``benchmarks/bench_sim.py``): a frame is dominated by per-pixel work, so
everything that does not change between frames is built once per detector and beam setting and
cached on the :class:`DetectorModel` (pixel maps, the air + water background, the solid-angle x
polarisation weight, masks, defects, panel frames for ray casting); per frame only the spots, the
kapton streak (random direction), Poisson photons and read noise are new.  The noise samplers in
:mod:`.noise` are exact but cheaper than numpy's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peaknet_xtal.sim.config import REFERENCE_FLUENCE, SimConfig
from peaknet_xtal.sim.crystal import Cell, excited_reflections, random_rotation, sigma_excitation
from peaknet_xtal.sim.detector import DetectorModel
from peaknet_xtal.sim.noise import gaussian_frame, poisson_sparse
from peaknet_xtal.types import Frame

#: One row per reflection that reaches a panel.  Coordinates follow the package convention.
REFLECTION_DTYPE = np.dtype([
    ("panel", np.int32), ("fs", np.float64), ("ss", np.float64),
    ("h", np.int32), ("k", np.int32), ("l", np.int32),
    ("photons", np.float64),  # expected integrated photons (before Poisson noise)
    ("snr", np.float64),  # expected integrated signal-to-noise ratio
    ("strong", np.bool_), ("crystal", np.int32),
    ("one_over_d", np.float64),  # |q| of the hkl, 1/Angstrom
    ("partiality", np.float64), ("excitation_error", np.float64),  # 1/Angstrom
    ("sigma_excitation", np.float64),  # allowed spread of the excitation error (1 sigma)
    ("max_photons", np.float64),  # expected photons in the brightest pixel
])

LN2 = float(np.log(2.0))


@dataclass
class CrystalTruth:
    """One crystal in the beam: ``A`` has columns a*, b*, c* (1/Angstrom, CrystFEL lab frame)."""

    A: np.ndarray
    cell: Cell

    def to_dict(self) -> dict[str, Any]:
        return {"A": self.A.tolist(), "cell": self.cell.to_dict()}


@dataclass
class SimTruth:
    """Exact ground truth of a simulated frame."""

    reflections: np.ndarray  # REFLECTION_DTYPE
    peak_masks: list[np.ndarray]  # bool per panel: pixels of strong spots
    hit: bool
    crystals: list[CrystalTruth]
    wavelength_A: float
    seed: int
    clen_m: float
    adu_per_photon: float
    bandwidth: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def strong(self) -> np.ndarray:
        return self.reflections[self.reflections["strong"]]


_MODELS: dict[tuple[int, float], tuple[Any, DetectorModel]] = {}


def detector_model(geometry: Any, default_clen_m: float) -> DetectorModel:
    """The (cached) detector model of ``geometry``; pixel maps are costly, so they are reused."""
    key = (id(geometry), float(default_clen_m))
    hit = _MODELS.get(key)
    if hit is not None and hit[0] is geometry:
        return hit[1]
    if len(_MODELS) > 8:
        _MODELS.clear()
    model = DetectorModel.from_geometry(geometry, default_clen_m)
    _MODELS[key] = (geometry, model)
    return model


def resolve_beam(geometry: Any, config: SimConfig) -> tuple[float, float]:
    """(wavelength in Angstrom, ADU per photon): the config's, else the geometry's, else defaults.

    The gain is the one every reader of the written files resolves (finding.settings.resolve_gain:
    ``adu_per_photon``, else ``adu_per_eV`` at this photon energy), else 1 (photon counting).
    """
    from peaknet_xtal.finding.settings import resolve_gain

    wavelength = float(config.wavelength_A or getattr(geometry, "wavelength_A", None)
                       or config.default_wavelength_A)
    gain = resolve_gain(config.adu_per_photon or None, geometry=geometry, wavelength_A=wavelength)
    return wavelength, float(gain or 1.0)


def simulate_frame(geometry: Any, seed: int, config: SimConfig | None = None
                   ) -> tuple[Frame, SimTruth]:
    """Simulate one still on ``geometry`` with exact truth; the same seed gives the same frame."""
    config = config or SimConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    det = detector_model(geometry, config.default_clen_m)
    wavelength, gain = resolve_beam(geometry, config)
    hit = bool(rng.random() < config.hit_probability)
    crystals = _draw_crystals(rng, config) if hit else []
    refl, windows = _reflections(det, crystals, wavelength, config, rng)
    background = _background(det, wavelength, config, rng)
    expected = background.copy()
    if len(refl):
        expected[windows.flat_unique] += windows.unique_sum.astype(np.float32)
    photons = poisson_sparse(rng, expected) if config.poisson else expected
    good = _good_mask(det, geometry, config)
    data = _to_adu(det, photons, gain, good, config, rng)
    _finish_truth(refl, windows, background, good, config)
    peak_flat = _peak_mask(det, refl, windows, background, good, config)
    frame = Frame(panels=det.split(data), masks=det.split(good), event=f"//{int(seed)}",
                  geometry=geometry,
                  meta={"simulated": True, "seed": int(seed), "wavelength_A": wavelength,
                        "clen_m": det.clen_m, "adu_per_photon": gain, "hit": hit})
    truth = SimTruth(reflections=refl, peak_masks=det.split(peak_flat), hit=hit, crystals=crystals,
                     wavelength_A=wavelength, seed=int(seed), clen_m=det.clen_m,
                     adu_per_photon=gain, bandwidth=config.bandwidth,
                     meta={"profile_radius": config.profile_radius})
    return frame, truth


# ---- crystals and reflections ----------------------------------------------------------------

def _draw_crystals(rng: np.random.Generator, config: SimConfig) -> list[CrystalTruth]:
    n = max(int(config.n_crystals), 1)
    if rng.random() < config.multi_crystal_prob:
        n += int(rng.integers(1, 3))
    base = config.resolve_cell(rng)
    out = []
    for _ in range(n):
        scale = 1.0 + config.cell_jitter * rng.uniform(-1, 1, 3)
        cell = Cell(base.a * scale[0], base.b * scale[1], base.c * scale[2], base.alpha,
                    base.beta, base.gamma, base.lattice, base.centring)
        out.append(CrystalTruth(A=random_rotation(rng) @ cell.reciprocal_basis(), cell=cell))
    return out


@dataclass
class _Windows:
    """Rendered spot windows: flat pixel index and expected photons per window pixel."""

    index: np.ndarray  # (n, w*w) flat detector index, -1 off panel
    photons: np.ndarray  # (n, w*w)
    flat_unique: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unique_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _reflections(det: DetectorModel, crystals: list[CrystalTruth], wavelength: float,
                 config: SimConfig, rng: np.random.Generator
                 ) -> tuple[np.ndarray, _Windows]:
    k0 = 1.0 / wavelength
    q_det = 2.0 * det.max_sin_theta() / wavelength
    q_max = min(1.0 / config.d_min_A, q_det)
    eta = np.radians(config.mosaicity_deg)
    tol = config.ewald_sigmas * float(sigma_excitation(np.asarray(q_max), wavelength,
                                                       config.bandwidth, eta,
                                                       config.profile_radius))
    rows = []
    for index, crystal in enumerate(crystals):
        hkl = excited_reflections(crystal.A, crystal.cell.centring, wavelength, q_max, tol)
        q = hkl @ crystal.A.T
        qn = np.linalg.norm(q, axis=1)
        s1 = q.copy()
        s1[:, 2] += k0
        eps = np.linalg.norm(s1, axis=1) - k0
        sig = sigma_excitation(qn, wavelength, config.bandwidth, eta, config.profile_radius)
        ok = np.abs(eps) <= config.ewald_sigmas * sig
        hkl, q, qn, s1, eps, sig = hkl[ok], q[ok], qn[ok], s1[ok], eps[ok], sig[ok]
        panel, fs, ss = det.cast(s1)
        on = panel >= 0
        table = np.zeros(int(on.sum()), dtype=REFLECTION_DTYPE)
        table["panel"], table["fs"], table["ss"] = panel[on], fs[on], ss[on]
        table["h"], table["k"], table["l"] = hkl[on].T
        table["crystal"] = index
        table["one_over_d"] = qn[on]
        table["excitation_error"] = eps[on]
        table["sigma_excitation"] = sig[on]
        table["partiality"] = np.exp(-0.5 * (eps[on] / sig[on]) ** 2)
        rows.append(table)
    refl = np.concatenate(rows) if rows else np.zeros(0, dtype=REFLECTION_DTYPE)
    if len(refl) == 0:
        return refl, _Windows(np.zeros((0, 1), np.int64), np.zeros((0, 1)))
    refl["photons"] = _photons(det, refl, crystals, wavelength, config)
    return refl, _render(det, refl, wavelength, q_det, config)


def _laue_indices(hkl: np.ndarray, lattice: str) -> np.ndarray:
    """Non-negative indices equal for every reflection of a Laue class of the lattice (N x 3).

    The structure must have at least the symmetry of its lattice: with less, an indexer that
    picks any of the lattice's equivalent settings (DIALS, indexamajig) would scramble
    intensities that a merger then averages, an ambiguity real crystals of these forms do not
    have.  Triclinic, monoclinic and orthorhombic: (|h|, |k|, |l|), invariant under mmm, which
    contains their holohedries.  Tetragonal (4/mmm, c unique): |h| and |k| also swap.  Cubic
    (m-3m) and rhombohedral axes (-3m): |h|, |k|, |l| in any order.  Hexagonal axes (6/mmm):
    (|h|, |k|, |h + k|) in any order with |l| -- the 6/mmm operators permute h, k and
    i = -(h + k) and change all their signs together.
    """
    a = np.abs(np.asarray(hkl, dtype=np.int64))
    if lattice == "tetragonal":
        return np.stack([a[:, :2].max(axis=1), a[:, :2].min(axis=1), a[:, 2]], axis=1)
    if lattice in ("cubic", "rhombohedral"):
        return -np.sort(-a, axis=1)
    if lattice == "hexagonal":
        triple = np.abs(np.stack([hkl[:, 0], hkl[:, 1], hkl[:, 0] + hkl[:, 1]], axis=1))
        return np.stack([triple.max(axis=1), triple.min(axis=1), a[:, 2]], axis=1)
    return a


def _structure_intensity(hkl: np.ndarray, cell_key: int, lattice: str = "triclinic") -> np.ndarray:
    """Wilson-distributed relative intensities, fixed per (cell, Laue class of hkl) so frames agree.

    An exponential draw per reflection (acentric Wilson statistics) made from a hash of the Miller
    index rather than the frame's generator: the same crystal form gives the same "structure" on
    every frame.  Hashing :func:`_laue_indices` gives every reflection equivalent under the
    lattice's Laue symmetry (Friedel mates included) the same intensity.
    """
    h = _laue_indices(hkl, lattice).astype(np.uint64)
    x = (h[:, 0] * np.uint64(73856093)) ^ (h[:, 1] * np.uint64(19349663)) \
        ^ (h[:, 2] * np.uint64(83492791)) ^ np.uint64(cell_key & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return -np.log1p(-u)


def _photons(det: DetectorModel, refl: np.ndarray, crystals: list[CrystalTruth],
             wavelength: float, config: SimConfig) -> np.ndarray:
    """Expected integrated photons: fluence x efficiency x Wilson x B fall-off x partiality x P."""
    hkl = np.stack([refl["h"], refl["k"], refl["l"]], axis=1)
    wilson = np.empty(len(refl))
    for index, crystal in enumerate(crystals):
        sel = refl["crystal"] == index
        key = hash(tuple(round(v, 1) for v in crystal.cell.parameters))
        wilson[sel] = _structure_intensity(hkl[sel], key, crystal.cell.lattice)
    q = refl["one_over_d"]
    pos = det.pixel_centre_lab(refl["panel"], refl["fs"], refl["ss"])
    dist = np.linalg.norm(pos, axis=1)
    sin2t_sq = 1.0 - (pos[:, 2] / dist) ** 2
    cos2phi = np.where(sin2t_sq > 0, pos[:, 0] ** 2 / np.maximum(pos[:, 0] ** 2 + pos[:, 1] ** 2,
                                                                  1e-30), 0.0)
    pol = config.polarisation
    polar = 1.0 - sin2t_sq * (pol * cos2phi + (1 - pol) * (1 - cos2phi))
    mean = config.incident_photons * config.scattering_efficiency * np.exp(
        -config.b_factor * q * q / 2.0)
    return mean * wilson * refl["partiality"] * polar


def _render(det: DetectorModel, refl: np.ndarray, wavelength: float, q_det: float,
            config: SimConfig) -> _Windows:
    """Anisotropic pseudo-Voigt spots, each only inside its own small window (vectorised)."""
    pos = det.pixel_centre_lab(refl["panel"], refl["fs"], refl["ss"])
    dist = np.linalg.norm(pos, axis=1)
    pixel_m = np.linalg.norm(det.fs_vecs[refl["panel"]], axis=1)
    dist_px = dist / pixel_m
    two_theta = np.arccos(np.clip(pos[:, 2] / dist, -1, 1))
    eta = np.radians(config.mosaicity_deg)
    core = config.spot_sigma_px * (1.0 + config.spot_growth * (refl["one_over_d"] / q_det) ** 2)
    sig_r = np.sqrt(core ** 2 + (dist_px * 2 * np.tan(two_theta / 2) * config.bandwidth) ** 2)
    sig_t = np.sqrt(core ** 2 + (dist_px * np.sin(two_theta) * eta) ** 2)
    # Radial direction (away from the beam) in panel pixel axes.
    radial = pos.copy()
    radial[:, 2] = 0.0
    fs_u = det.fs_vecs[refl["panel"]] / pixel_m[:, None]
    ss_u = det.ss_vecs[refl["panel"]] / pixel_m[:, None]
    # Explicit three-term sums, not einsum: einsum's SIMD path rounds differently with memory
    # alignment, which made the same seed give truth differing in the last bit.
    rf = radial[:, 0] * fs_u[:, 0] + radial[:, 1] * fs_u[:, 1] + radial[:, 2] * fs_u[:, 2]
    rs = radial[:, 0] * ss_u[:, 0] + radial[:, 1] * ss_u[:, 1] + radial[:, 2] * ss_u[:, 2]
    norm = np.hypot(rf, rs)
    rf = np.where(norm > 0, rf / np.where(norm > 0, norm, 1), 1.0)
    rs = np.where(norm > 0, rs / np.where(norm > 0, norm, 1), 0.0)
    radius = config.window_radius or int(np.clip(np.ceil(3.5 * sig_r.max()), 3, 10))
    n, side = len(refl), 2 * radius + 1
    offsets = np.arange(-radius, radius + 1)
    cfs = np.rint(refl["fs"]).astype(np.int64)
    css = np.rint(refl["ss"]).astype(np.int64)
    # Window pixel (i_ss, i_fs) of spot s sits at (css + o[i_ss], cfs + o[i_fs]): every per-pixel
    # quantity is a broadcast of per-spot and per-offset terms, laid out (spot, ss offset, fs
    # offset) and flattened to (spot, side * side) with the window centre in the middle column.
    dfs = ((cfs - refl["fs"])[:, None] + offsets[None, :])[:, None, :]  # (n, 1, side)
    dss = ((css - refl["ss"])[:, None] + offsets[None, :])[:, :, None]  # (n, side, 1)
    dr = dfs * (rf / sig_r)[:, None, None] + dss * (rs / sig_r)[:, None, None]
    dt = dss * (rf / sig_t)[:, None, None] - dfs * (rs / sig_t)[:, None, None]
    rho2 = np.multiply(dr, dr, out=dr)
    rho2 += np.square(dt, out=dt)
    rho2 = rho2.reshape(n, side * side)
    # Pseudo-Voigt with the Gaussian and Lorentzian sharing one half width (in place: the window
    # arrays are the largest of the frame after the pixel maps).
    profile = np.multiply(rho2, -0.5)
    np.exp(profile, out=profile)
    profile *= 1 - config.spot_eta
    rho2 *= 1.0 / (2 * LN2)
    rho2 += 1.0
    profile += np.divide(config.spot_eta, rho2, out=rho2)
    photons = profile
    photons *= (refl["photons"] / profile.sum(axis=1))[:, None]
    shapes = np.array(det.shapes)
    height = shapes[refl["panel"], 0]
    width = shapes[refl["panel"], 1]
    pfs = cfs[:, None] + offsets[None, :]
    pss = css[:, None] + offsets[None, :]
    inside = (((pss >= 0) & (pss < height[:, None]))[:, :, None]
              & ((pfs >= 0) & (pfs < width[:, None]))[:, None, :]).reshape(n, side * side)
    flat = ((det.offsets[refl["panel"]][:, None] + pss * width[:, None])[:, :, None]
            + pfs[:, None, :]).reshape(n, side * side)
    index = np.where(inside, flat, -1)
    refl["max_photons"] = photons.max(axis=1)
    windows = _Windows(index=index, photons=photons)
    windows.flat_unique, windows.unique_sum = _sum_by_pixel(index, photons)
    windows.sig_r, windows.sig_t = sig_r, sig_t  # type: ignore[attr-defined]
    return windows


def _sum_by_pixel(index: np.ndarray, photons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct on-panel pixels of all windows and the photons summed on each (spots overlap).

    A stable sort instead of ``np.unique(return_inverse=True)``: window rows are runs of
    consecutive pixels, which the stable (merge/radix) sort takes in linear time.
    """
    valid = index >= 0
    pixels = index[valid]
    if pixels.size == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    order = np.argsort(pixels, kind="stable")
    pixels = pixels[order]
    starts = np.flatnonzero(np.concatenate([[True], pixels[1:] != pixels[:-1]]))
    return pixels[starts], np.add.reduceat(photons[valid][order], starts)


# ---- background, detector response ------------------------------------------------------------

def _background(det: DetectorModel, wavelength: float, config: SimConfig,
                rng: np.random.Generator) -> np.ndarray:
    """Expected background photons per pixel: air scatter, water ring, optional kapton streak.

    Air and water depend only on the detector and the beam settings, so they are built once per
    setting and reused (read-only) across frames; only the kapton streak, whose direction is
    random per frame, is added per frame.
    """
    key = ("background", float(wavelength), config.air_photons, config.air_falloff,
           config.water_photons, config.water_ring_one_over_d, config.water_ring_width,
           config.polarisation, config.incident_photons)
    static = det.cached(key, lambda: _static_background(det, wavelength, config))
    if not config.kapton:
        return static
    angle = rng.uniform(-np.pi, np.pi)
    streak = _kapton_streak(det, angle, config)
    streak *= _pixel_weight(det, config.polarisation)
    streak *= np.float32(config.incident_photons / REFERENCE_FLUENCE)
    streak += static
    return streak


def _pixel_weight(det: DetectorModel, polarisation: float) -> np.ndarray:
    """Relative solid angle x polarisation factor per pixel (read-only, cached per detector)."""
    def build() -> np.ndarray:
        maps = det.maps()
        pol = np.float32(polarisation)
        polar = 1.0 - pol * maps["polar_x"] - (1 - pol) * (maps["sin2t_sq"] - maps["polar_x"])
        weight = (maps["solid"] * polar).astype(np.float32)
        weight.flags.writeable = False
        return weight

    return det.cached(("pixel_weight", float(polarisation)), build)


def _static_background(det: DetectorModel, wavelength: float, config: SimConfig) -> np.ndarray:
    """Air scatter plus water ring, photons per pixel (read-only; in place, float32 throughout)."""
    maps = det.maps()
    level = np.multiply(maps["two_theta"], np.float32(-1.0 / config.air_falloff))
    np.exp(level, out=level)
    level *= np.float32(config.air_photons)
    if config.water_photons > 0:
        z = np.multiply(maps["sin_theta"], np.float32(2.0 / wavelength))
        z -= np.float32(config.water_ring_one_over_d)
        z *= np.float32(1.0 / config.water_ring_width)
        np.square(z, out=z)
        z *= np.float32(-0.5)
        np.exp(z, out=z)
        z *= np.float32(config.water_photons)
        level += z
    level *= _pixel_weight(det, config.polarisation)
    level *= np.float32(config.incident_photons / REFERENCE_FLUENCE)
    level.flags.writeable = False
    return level


def _kapton_streak(det: DetectorModel, angle: float, config: SimConfig) -> np.ndarray:
    """Photons (before the pixel weight) of a kapton streak leaving the beam at azimuth ``angle``.

    Gaussian across the streak, exponential fall-off along it, one-sided.  ``across`` and
    ``along`` are the pixel's distances from and along the streak's ray (``r |sin(phi - angle)|``
    and ``r cos(phi - angle)``), from the cached x/y pixel maps without per-pixel trigonometry.
    """
    maps = det.maps()
    cos_a, sin_a = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    along = maps["x_px"] * cos_a + maps["y_px"] * sin_a
    across = maps["y_px"] * cos_a - maps["x_px"] * sin_a
    across *= np.float32(1.0 / config.kapton_width_px)
    np.square(across, out=across)
    across *= np.float32(-0.5)
    across -= np.abs(along) * np.float32(1.0 / 600.0)
    streak = np.exp(across, out=across)
    streak *= along > 0
    streak *= np.float32(config.kapton_photons)
    return streak


def _defects(det: DetectorModel, config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Dead and hot pixel indices, fixed per detector by ``config.defect_seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(config.defect_seed), 0xDEAD]))
    n = det.n_pixels
    dead = rng.choice(n, size=rng.binomial(n, config.dead_fraction), replace=False)
    hot = rng.choice(n, size=rng.binomial(n, config.hot_fraction), replace=False)
    return dead, hot


def _good_mask(det: DetectorModel, geometry: Any, config: SimConfig) -> np.ndarray:
    """True = good: the geometry's bad regions and no_index panels, minus dead and hot pixels."""
    def build() -> np.ndarray:
        masks = geometry.bad_pixel_masks() if hasattr(geometry, "bad_pixel_masks") else [
            np.ones(s, bool) for s in det.shapes]
        good = np.concatenate([m.ravel() for m in masks])
        dead, hot = _defects_cached(det, config)
        good[dead] = False
        good[hot] = False
        return good

    key = ("good", config.defect_seed, config.dead_fraction, config.hot_fraction)
    return det.cached(key, build).copy()


def _to_adu(det: DetectorModel, photons: np.ndarray | tuple[np.ndarray, np.ndarray], gain: float,
            good: np.ndarray, config: SimConfig, rng: np.random.Generator) -> np.ndarray:
    """Photons -> ADU: gain, per-panel residual pedestal, read noise; then dead and hot pixels.

    ``photons`` is a dense flat frame, or the sparse ``(flat index, count)`` pairs of
    :func:`poisson_sparse` (most pixels read no photon, so only those that do are touched).
    """
    n = det.n_pixels
    if config.read_noise > 0:
        data = gaussian_frame(rng, n, config.read_noise * gain)
    else:
        data = np.zeros(n, dtype=np.float32)
    if isinstance(photons, tuple):
        index, counts = photons
        data[index] += counts * np.float32(gain)
    else:
        data += np.multiply(photons, np.float32(gain), dtype=np.float32)
    pedestals = rng.normal(0.0, config.pedestal_sigma * gain, det.n_panels)
    for view, offset in zip(det.split(data), pedestals, strict=False):
        view += np.float32(offset)
    dead, hot = _defects_cached(det, config)
    data[dead] = 0.0
    data[hot] = np.float32(config.hot_value * gain)
    return data


def _defects_cached(det: DetectorModel, config: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    key = ("defects", config.defect_seed, config.dead_fraction, config.hot_fraction)
    return det.cached(key, lambda: _defects(det, config))


# ---- truth -------------------------------------------------------------------------------------

def _finish_truth(refl: np.ndarray, windows: _Windows, background: np.ndarray, good: np.ndarray,
                  config: SimConfig) -> None:
    """Expected SNR and the strong flag (bright enough and centred on a good pixel)."""
    if len(refl) == 0:
        return
    centre = windows.index[:, windows.index.shape[1] // 2]
    bg = background[centre].astype(float)
    n_eff = 4 * np.pi * windows.sig_r * windows.sig_t  # type: ignore[attr-defined]
    noise = np.sqrt(refl["photons"] + n_eff * (bg + config.read_noise ** 2))
    refl["snr"] = refl["photons"] / np.maximum(noise, 1e-12)
    refl["strong"] = (refl["snr"] >= config.strong_snr) & good[centre]


def _peak_mask(det: DetectorModel, refl: np.ndarray, windows: _Windows, background: np.ndarray,
               good: np.ndarray, config: SimConfig) -> np.ndarray:
    """Pixels of strong spots: signal above a fraction of the spot maximum or a few bg sigmas."""
    out = np.zeros(det.n_pixels, dtype=bool)
    strong = refl["strong"] if len(refl) else np.zeros(0, bool)
    if not strong.any():
        return out
    index = windows.index[strong]
    photons = windows.photons[strong]
    centre = index[:, index.shape[1] // 2]
    sigma = np.sqrt(background[centre].astype(float) + config.read_noise ** 2)
    limit = np.minimum(config.mask_fraction * photons.max(axis=1), config.mask_sigmas * sigma)
    chosen = (photons >= limit[:, None]) & (index >= 0)
    chosen[np.arange(len(photons)), photons.argmax(axis=1)] &= index[
        np.arange(len(photons)), photons.argmax(axis=1)] >= 0
    out[index[chosen]] = True
    out &= good
    return out
