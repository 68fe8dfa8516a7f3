"""Simulated shoeboxes with exact truth: training data for the default and the held-out checks.

The simulator (:mod:`peaknet_xtal.sim`) knows each reflection's expected photons exactly.  Here
every reflection it predicts becomes a shoebox at its true position (as a predicted reflection of
an indexed crystal would), whatever its strength, so weak and absent spots are in the set as they
are in real integration.  Conditions vary per frame (cell, fluence, spot size and shape, background,
read noise, gain) so one trained model serves a range of data.

The simulator renders each spot only inside a window of half side ``SPOT_RADIUS`` (5) around its
pixel, and its truth is the photons in that window; the shoebox (half side 7) contains the whole
window, so the truth is exactly the photons a perfect integrator would find in the box.  Frames
have no residual pedestal (the integrator assumes pedestal-corrected data).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from peaknet_xtal.integration.shoebox import DEFAULT_RADIUS, Shoeboxes, extract_shoeboxes

#: Half side of the simulator's spot window: truth = photons inside it.
SPOT_RADIUS = 5

GEOMETRY_TEXT = """; one 768x768 panel of 100 um pixels, beam in the centre
photon_energy = 9500 eV
clen = 0.09 m
res = 10000
adu_per_photon = 1
p0/min_fs = 0
p0/max_fs = 767
p0/min_ss = 0
p0/max_ss = 767
p0/fs = +1.0x +0.0y
p0/ss = +0.0x +1.0y
p0/corner_x = -384
p0/corner_y = -384
"""


def default_geometry() -> Any:
    from peaknet_xtal.formats.geometry import parse_geometry

    return parse_geometry(GEOMETRY_TEXT)


def frame_config(rng: np.random.Generator, **fixed: Any) -> Any:
    """Varied, plausible conditions for one frame (``fixed`` settings win)."""
    from peaknet_xtal.sim import PRESET_CELLS, SimConfig

    def loguniform(lo: float, hi: float) -> float:
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    values: dict[str, Any] = dict(
        cell=sorted(PRESET_CELLS)[int(rng.integers(len(PRESET_CELLS)))],
        d_min_A=float(rng.uniform(1.5, 2.5)),
        b_factor=float(rng.uniform(10, 40)),
        incident_photons=loguniform(3e11, 1e13),
        bandwidth=loguniform(3e-4, 2e-3),
        mosaicity_deg=loguniform(0.01, 0.1),
        spot_sigma_px=float(rng.uniform(0.5, 1.2)),
        spot_growth=float(rng.uniform(0.0, 0.8)),
        spot_eta=float(rng.uniform(0.0, 0.5)),
        air_photons=loguniform(0.05, 1.5),
        water_photons=loguniform(0.05, 1.0),
        read_noise=float(rng.uniform(0.05, 0.3)),
        adu_per_photon=float(rng.choice([1.0, 8.5, 30.0])),
        pedestal_sigma=0.0,
        window_radius=SPOT_RADIUS,
    )
    values.update(fixed)
    return SimConfig.from_dict(values)


def simulate_shoeboxes(n_frames: int, seed: int, *, geometry: Any = None,
                       radius: int = DEFAULT_RADIUS, neighbours: bool = True,
                       **fixed: Any) -> Shoeboxes:
    """Shoeboxes of every reflection on ``n_frames`` simulated frames, truth in ``extra``.

    ``neighbours``: split pixels between nearby spots as the API does
    (:func:`~peaknet_xtal.integration.shoebox.owned_pixels`); False cuts plain boxes.

    ``extra`` holds ``photons`` (expected photons, the truth), ``snr`` (the simulator's expected
    integrated SNR), ``frame``, ``h``, ``k``, ``l`` and ``strong``.
    """
    from peaknet_xtal.sim import simulate_frame

    geometry = geometry if geometry is not None else default_geometry()
    parts = []
    for i in range(n_frames):
        frame_seed = int(seed) * 100_003 + i
        rng = np.random.default_rng(np.random.SeedSequence([frame_seed, 0xB0C5]))
        config = frame_config(rng, **fixed)
        frame, truth = simulate_frame(geometry, frame_seed, config)
        refl = truth.reflections
        if len(refl) == 0:
            continue
        boxes = extract_shoeboxes(frame.panels, frame.masks, refl["panel"], refl["fs"],
                                  refl["ss"], gain=truth.adu_per_photon,
                                  read_noise=config.read_noise, one_over_d=refl["one_over_d"],
                                  geometry=geometry, clen_m=truth.clen_m, radius=radius,
                                  neighbours=neighbours)
        boxes.extra = {"photons": refl["photons"].astype(float), "snr": refl["snr"].astype(float),
                       "frame": np.full(len(refl), i), "h": refl["h"], "k": refl["k"],
                       "l": refl["l"], "strong": refl["strong"]}
        parts.append(boxes)
    return Shoeboxes.concatenate(parts)
