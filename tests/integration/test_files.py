"""Integrating a stream: every crystal of a frame in one call, so they are each other's
neighbours."""
from __future__ import annotations

import numpy as np


def test_all_crystals_of_a_frame_are_integrated_together(tmp_path):
    from peaknet_xtal.formats.cxi import read_cxi_frame
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.formats.stream import read_stream
    from peaknet_xtal.integration import Integrator
    from peaknet_xtal.integration.files import integrate_stream
    from peaknet_xtal.integration.simdata import SPOT_RADIUS, default_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    config = SimConfig(cell="lysozyme", window_radius=SPOT_RADIUS, pedestal_sigma=0.0,
                       read_noise=0.1, adu_per_photon=1.0, incident_photons=3e12, n_crystals=2)
    run = simulate_run(default_geometry(), 1, 11, tmp_path / "sim", config, progress=False)
    geometry = read_geometry(run.geom)
    integrator = Integrator()
    out = integrate_stream(run.stream, geometry, tmp_path / "out.stream", integrator,
                           read_noise=0.1)
    crystals = read_stream(out).chunks[0].crystals
    assert len(crystals) == 2 and all(len(c.reflections) for c in crystals)
    frame = read_cxi_frame(run.cxi, 0, geometry)
    lookup = geometry.panel_index()

    def positions(refl):
        panel = np.array([lookup[name] for name in refl["panel"]], np.int32)
        return panel, refl["fs"] - 0.5, refl["ss"] - 0.5  # one panel at the origin

    first, second = (positions(c.reflections) for c in crystals)
    together = integrator.integrate(frame, *(np.concatenate(pair) for pair in zip(
        first, second, strict=True)), gain=1.0, read_noise=0.1)
    n0 = len(crystals[0].reflections)
    # the stream keeps two decimals; mergers read it, so it carries the likelihood-only estimate
    np.testing.assert_allclose(crystals[0].reflections["I"], together["lik_photons"][:n0],
                               rtol=1e-4, atol=0.006)
    np.testing.assert_allclose(crystals[1].reflections["I"], together["lik_photons"][n0:],
                               rtol=1e-4, atol=0.006)
    np.testing.assert_allclose(crystals[0].reflections["sigma"], together["lik_sigma"][:n0],
                               rtol=1e-4, atol=0.006)
    # crystal 0 alone would read pixels that crystal 1's reflections own
    alone = integrator.integrate(frame, *first, gain=1.0, read_noise=0.1)
    assert np.abs(alone["photons"] - together["photons"][:n0]).max() > 0.1


def test_reflections_with_no_usable_pixel_are_left_out_of_the_stream(tmp_path):
    """A reflection deep in a bad region measures nothing: it was written with a made-up
    intensity and sigma 0 (2054 +- 0 in a user trial), which a merger takes as exact; it is now
    left out of the crystal's list, as CrystFEL writes no reflection whose integration failed,
    and every other reflection is written as before."""
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.formats.stream import read_stream
    from peaknet_xtal.integration import Integrator
    from peaknet_xtal.integration.simdata import SPOT_RADIUS, default_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    config = SimConfig(cell="lysozyme", window_radius=SPOT_RADIUS, pedestal_sigma=0.0,
                       read_noise=0.1, adu_per_photon=1.0, incident_photons=3e12)
    run = simulate_run(default_geometry(), 1, 12, tmp_path / "sim", config, progress=False)
    plain = read_geometry(run.geom)
    (panel,) = plain.panels
    half_fs, half_ss = (panel.max_fs + 1) // 2, (panel.max_ss + 1) // 2
    masked = tmp_path / "masked.geom"
    masked.write_text(run.geom.read_text() + f"\nbad_quarter/min_fs = 0\nbad_quarter/max_fs = "
                      f"{half_fs}\nbad_quarter/min_ss = 0\nbad_quarter/max_ss = {half_ss}\n"
                      f"bad_quarter/panel = {panel.name}\n")
    integrator = Integrator()
    from peaknet_xtal.integration.files import integrate_stream

    full = read_stream(integrate_stream(run.stream, plain, tmp_path / "full.stream",
                                        integrator, read_noise=0.1)).chunks[0].crystals[0]
    cut = read_stream(integrate_stream(run.stream, read_geometry(masked), tmp_path /
                                       "cut.stream", integrator, read_noise=0.1)
                      ).chunks[0].crystals[0]
    refl = full.reflections
    deep = (refl["fs"] < half_fs - 10) & (refl["ss"] < half_ss - 10)  # whole box in the region
    clear = (refl["fs"] > half_fs + 10) | (refl["ss"] > half_ss + 10)  # no pixel of it
    assert deep.sum() >= 5 and clear.sum() >= 5
    assert np.isfinite(cut.reflections["I"]).all() and (cut.reflections["sigma"] > 0).all()
    kept = {tuple(r) for r in np.stack([cut.reflections[k] for k in "hkl"], 1).tolist()}
    hkl = np.stack([refl[k] for k in "hkl"], 1).tolist()
    assert not any(tuple(h) in kept for h, d in zip(hkl, deep, strict=True) if d)
    assert all(tuple(h) in kept for h, c in zip(hkl, clear, strict=True) if c)
    assert cut.num_reflections in (None, len(cut.reflections))
