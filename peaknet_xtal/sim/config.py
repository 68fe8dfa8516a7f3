"""Simulation settings: one dataclass, sensible defaults, and a randomiser for training variety.

Intensity units: ``incident_photons`` is the pulse fluence scale; every expected photon count
(reflections and background) is proportional to it, so doubling it doubles every expectation.
Detector-side values (``read_noise``, ``pedestal_sigma``, ``hot_value``) are in photons and are
converted to ADU with ``adu_per_photon``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peaknet_xtal.sim.crystal import PRESET_CELLS, Cell

#: Photons scale of ``incident_photons`` that the per-frame photon settings below refer to.
REFERENCE_FLUENCE = 1e12


#: ``SimConfig`` settings of a photon-counting detector (a Pilatus, an Eiger): no read noise, no
#: pedestal, so that its frames are exact counts (:func:`whole_counts` after any artefacts)
PHOTON_COUNTING: dict[str, float] = {"read_noise": 0.0, "pedestal_sigma": 0.0}


def whole_counts(panel: np.ndarray) -> np.ndarray:
    """What a photon-counting detector writes: whole, non-negative counts (artefacts added in
    photons, such as streaks or hot pixels, are counted too)."""
    return np.clip(np.rint(panel), 0.0, None)



def loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One draw, uniform in log between ``lo`` and ``hi``."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def sharp_spot_settings(rng: np.random.Generator) -> dict[str, float]:
    """``SimConfig`` settings of a well-ordered crystal on a coarse pixel: spots about one pixel
    across, or a short radial line of 2-3 pixels where the bandwidth spreads them (the bandwidth
    is left to :meth:`SimConfig.randomised`).

    Why: :meth:`SimConfig.randomised` draws a core of 0.3-1.6 px but also a Lorentzian fraction
    up to 0.6, mosaicity up to 0.3 degrees and growth with resolution, so that few of its strong
    spots are narrower than a pixel: on eight randomised CSPAD hits 2 % of the strong spots have
    side neighbours below a tenth of their brightest pixel across the spot, where 83 % of the
    bright compact spots of the real LCLS CSPAD stills do, and 70 % with these settings
    (benchmarks/spot_shapes.py).  Drawn from the caller's own generator, so that a frame's other
    conditions do not depend on whether it is sharp."""
    return {"spot_sigma_px": loguniform(rng, 0.2, 0.45),
            "spot_eta": float(rng.uniform(0.0, 0.15)),
            "mosaicity_deg": loguniform(rng, 0.002, 0.03),
            "spot_growth": float(rng.uniform(0.0, 0.5))}

@dataclass
class SimConfig:
    """Every knob of :func:`peaknet_xtal.sim.simulate_frame`; defaults give a typical XFEL hit."""

    # crystal
    cell: Cell | str | None = None  # a Cell, a PRESET_CELLS name, or None: random preset per frame
    cell_jitter: float = 0.0  # relative random change of each cell length per crystal
    n_crystals: int = 1  # crystals in every hit ...
    multi_crystal_prob: float = 0.0  # ... plus, with this probability, 1-2 more
    hit_probability: float = 1.0  # frames without a crystal are blanks (background only)
    d_min_A: float = 1.6  # the crystal diffracts to no better than this
    b_factor: float = 20.0  # Wilson B (A^2): mean intensity falls as exp(-B q^2 / 2)
    scattering_efficiency: float = 3e-10  # mean photons of a full low-angle reflection per photon
    # beam
    wavelength_A: float | None = None  # None: the geometry's, else default_wavelength_A
    default_wavelength_A: float = 1.30
    bandwidth: float = 1e-3  # fractional sigma of the spectrum
    incident_photons: float = 1e12
    polarisation: float = 0.99  # fraction of horizontal (x) polarisation
    # crystal quality
    mosaicity_deg: float = 0.05  # sigma of the mosaic spread
    profile_radius: float = 4e-4  # 1/A: reciprocal-lattice point size (domain size ~ 2500 A)
    ewald_sigmas: float = 3.0  # reflections farther than this many sigmas are not excited
    # spots
    spot_sigma_px: float = 0.8  # core Gaussian sigma near the beam
    spot_growth: float = 0.6  # relative growth of spot sigma at the detector's edge resolution
    spot_eta: float = 0.3  # Lorentzian fraction of the pseudo-Voigt
    window_radius: int = 0  # half-size of the rendering window; 0 = from the spot size
    # background (photons per pixel at REFERENCE_FLUENCE, before solid angle/polarisation)
    air_photons: float = 0.15
    air_falloff: float = 0.35  # 2theta (rad) e-folding of air scatter
    water_photons: float = 0.4
    water_ring_one_over_d: float = 1 / 3.2
    water_ring_width: float = 0.04  # sigma in 1/A
    kapton: bool = False
    kapton_photons: float = 0.6
    kapton_width_px: float = 4.0
    # detector response
    default_clen_m: float = 0.1  # where the geometry has no number for clen
    adu_per_photon: float | None = None  # None: the geometry's, else 1.0
    pedestal_sigma: float = 0.2  # photons: per-panel residual pedestal offset (can go negative)
    read_noise: float = 0.15  # photons: Gaussian read noise per pixel
    defect_seed: int = 0  # dead/hot pixels belong to the detector: fixed for a whole run
    dead_fraction: float = 2e-4  # pixels reading 0, masked
    hot_fraction: float = 2e-5  # pixels reading hot_value, masked
    hot_value: float = 500.0
    poisson: bool = True
    # truth
    strong_snr: float = 5.0  # expected integrated SNR that makes a reflection "strong"
    mask_sigmas: float = 3.0  # peak-mask pixels: signal above this many background sigmas ...
    mask_fraction: float = 0.5  # ... or above this fraction of the spot's maximum
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.cell, Cell):
            out["cell"] = self.cell.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        """Build from a plain mapping (config file); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown simulation settings: {', '.join(unknown)}")
        values = dict(data)
        values["cell"] = cell_setting(values.get("cell"))
        return cls(**values)

    def resolve_cell(self, rng: np.random.Generator) -> Cell:
        if isinstance(self.cell, Cell):
            return self.cell
        if isinstance(self.cell, str):
            if self.cell not in PRESET_CELLS:
                raise ValueError(f"unknown preset cell {self.cell!r}; "
                                 f"known: {sorted(PRESET_CELLS)}")
            return PRESET_CELLS[self.cell]
        names = sorted(PRESET_CELLS)
        return PRESET_CELLS[names[int(rng.integers(len(names)))]]

    @classmethod
    def randomised(cls, rng: np.random.Generator, *, max_read_noise: float = 0.5,
                   **fixed: Any) -> SimConfig:
        """Varied but plausible conditions, for training data; ``fixed`` settings are kept as given.

        ``max_read_noise`` (photons) bounds the read-noise draw; training may ask for noisier
        detectors than evaluation does.  The same random numbers are drawn whatever the bound, so
        a seed gives the same frame apart from its noise level.
        """
        values: dict[str, Any] = dict(
            cell=sorted(PRESET_CELLS)[int(rng.integers(len(PRESET_CELLS)))],
            cell_jitter=float(rng.uniform(0, 0.01)),
            multi_crystal_prob=float(rng.uniform(0, 0.3)),
            hit_probability=float(rng.uniform(0.5, 1.0)),
            d_min_A=float(rng.uniform(1.5, 3.5)),
            b_factor=float(rng.uniform(8, 60)),
            scattering_efficiency=loguniform(rng, 5e-11, 2e-9),
            wavelength_A=float(rng.uniform(0.9, 1.9)),
            bandwidth=loguniform(rng, 2e-4, 3e-3),
            incident_photons=loguniform(rng, 2e11, 4e12),
            mosaicity_deg=loguniform(rng, 0.005, 0.3),
            profile_radius=loguniform(rng, 1e-4, 2e-3),
            spot_sigma_px=loguniform(rng, 0.3, 1.6),  # XFEL spots on 100-um pixels are often 1-2 px
            spot_growth=float(rng.uniform(0.0, 1.5)),
            spot_eta=float(rng.uniform(0.0, 0.6)),
            # up to several photons a pixel: integrating XFEL detectors (CSPAD, ePix) often sit on
            # a dense background in which a sharp spot is only tens of sigmas, not a lone photon
            air_photons=loguniform(rng, 0.01, 3.0),
            air_falloff=float(rng.uniform(0.15, 0.8)),
            water_photons=float(rng.choice([0.0, loguniform(rng, 0.05, 2.0)])),
            water_ring_width=float(rng.uniform(0.025, 0.06)),
            kapton=bool(rng.random() < 0.25),
            kapton_photons=loguniform(rng, 0.1, 3.0),
            kapton_width_px=float(rng.uniform(2, 10)),
            pedestal_sigma=float(rng.uniform(0, 1.0)),
            read_noise=float(rng.uniform(0.05, max_read_noise)),
            dead_fraction=loguniform(rng, 1e-5, 2e-3),
            hot_fraction=loguniform(rng, 1e-6, 1e-4),
        )
        values.update(fixed)
        return cls.from_dict(values)


#: The allowed range of every number of :class:`SimConfig` (:func:`peaknet_xtal.config.bounded`'s
#: keywords), so that a setting no simulation can use (a negative B factor, a probability of 2, a
#: zero spot size) is refused with its range before anything is written, rather than failing deep
#: inside a frame or simulating nonsense.  ``tests/sim/test_config.py`` checks that every number
#: of the dataclass has one.
LIMITS: dict[str, dict[str, float]] = {
    "cell_jitter": {"ge": 0, "lt": 1}, "n_crystals": {"ge": 1},
    "multi_crystal_prob": {"ge": 0, "le": 1}, "hit_probability": {"ge": 0, "le": 1},
    "d_min_A": {"gt": 0}, "b_factor": {"ge": 0}, "scattering_efficiency": {"ge": 0},
    "wavelength_A": {"gt": 0}, "default_wavelength_A": {"gt": 0}, "bandwidth": {"ge": 0, "lt": 1},
    "incident_photons": {"ge": 0}, "polarisation": {"ge": 0, "le": 1},
    "mosaicity_deg": {"ge": 0}, "profile_radius": {"gt": 0}, "ewald_sigmas": {"gt": 0},
    "spot_sigma_px": {"gt": 0}, "spot_growth": {"ge": 0}, "spot_eta": {"ge": 0, "le": 1},
    "window_radius": {"ge": 0},
    "air_photons": {"ge": 0}, "air_falloff": {"gt": 0}, "water_photons": {"ge": 0},
    "water_ring_one_over_d": {"gt": 0}, "water_ring_width": {"gt": 0},
    "kapton_photons": {"ge": 0}, "kapton_width_px": {"gt": 0},
    "default_clen_m": {"gt": 0}, "adu_per_photon": {"gt": 0}, "pedestal_sigma": {"ge": 0},
    "read_noise": {"ge": 0}, "defect_seed": {"ge": 0}, "dead_fraction": {"ge": 0, "le": 1},
    "hot_fraction": {"ge": 0, "le": 1}, "hot_value": {"ge": 0},
    "strong_snr": {"ge": 0}, "mask_sigmas": {"ge": 0}, "mask_fraction": {"gt": 0, "le": 1},
}


def cell_setting(value: Any) -> Cell | str | None:
    """A ``cell`` setting as :class:`SimConfig` holds it: a preset name (checked), a
    :class:`Cell` from a mapping of its fields or a list of them, or None (a random preset).

    Raises ValueError saying what is wrong, so that a bad cell is refused when the settings are
    read, not on the first frame that draws it.
    """
    if value is None or isinstance(value, Cell):
        cell = value
    elif isinstance(value, str):
        if value not in PRESET_CELLS:
            raise ValueError(f"unknown preset cell {value!r}; "
                             f"known: {', '.join(sorted(PRESET_CELLS))}")
        return value
    else:
        try:
            cell = Cell(**value) if isinstance(value, dict) else Cell(*value)
        except TypeError as exc:  # missing, extra or misnamed cell fields
            raise ValueError(f"not a unit cell ({exc}); give a, b, c, alpha, beta, gamma "
                             "[, lattice, centring] or a preset name") from None
    if cell is not None:
        cell.real_basis()  # angles that do not close raise here
    return cell


def settings_types(prefix: str = "") -> dict[str, Any]:
    """:func:`peaknet_xtal.config.resolve` types of every :class:`SimConfig` field whose default
    cannot say it: each number with its :data:`LIMITS` range (finite: an infinite fluence or noise
    is no setting either), and ``cell``.  Keys are ``prefix`` + the field name (``sim.b_factor``
    for a ``sim:`` section); the other fields are typed by their defaults.
    """
    import typing

    from pydantic import AfterValidator, FiniteFloat
    from pydantic_core import PydanticCustomError

    from peaknet_xtal.config import bounded

    def check_cell(value: Any) -> Any:
        try:
            cell_setting(value)
        except ValueError as exc:
            raise PydanticCustomError("cell", "{why}", {"why": str(exc)}) from None
        return value

    hints = typing.get_type_hints(SimConfig)
    types: dict[str, Any] = {
        f"{prefix}cell": typing.Annotated[str | list[Any] | dict[str, Any] | None,
                                          AfterValidator(check_cell)]}
    for name, hint in hints.items():
        kinds = set(typing.get_args(hint)) or {hint}
        number = next((k for k in (int, float) if k in kinds), None)
        if number is not None and name in LIMITS:
            kind = FiniteFloat if number is float else int
            types[prefix + name] = bounded(kind, optional=type(None) in kinds, **LIMITS[name])
    return types
