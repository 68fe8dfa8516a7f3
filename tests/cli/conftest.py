"""Fixtures shared by the CLI tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def integrate_sim_run(tmp_path_factory):
    """Two simulated lysozyme stills on the integrator's test detector (a stream with crystals,
    a CXI file, truth): the input of the peaknet-integrate CLI tests, made once a module."""
    from peaknet_xtal.integration.simdata import SPOT_RADIUS, default_geometry
    from peaknet_xtal.sim import SimConfig
    from peaknet_xtal.sim.run import simulate_run

    config = SimConfig(cell="lysozyme", window_radius=SPOT_RADIUS, pedestal_sigma=0.0,
                       read_noise=0.15, adu_per_photon=8.5, incident_photons=3e12)
    return simulate_run(default_geometry(), 2, 7, tmp_path_factory.mktemp("sim"), config,
                        progress=False)
