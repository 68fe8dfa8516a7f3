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
