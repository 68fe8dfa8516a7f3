"""Integrator.integrate on frames as readers hand them over (float32 pixels, the stored type in
meta): marked pixels count in no shoebox, as the finder leaves them out."""
from __future__ import annotations

import numpy as np

from peaknet_xtal.integration import Integrator
from peaknet_xtal.types import Frame


def test_a_gap_marked_in_the_data_counts_in_no_shoebox():
    """65535 in uint16 frames marks a gap: integrated as if it were masked, not as 65535 counts
    beside the spot (the finder's sanitised mask used to reach only the CXI output)."""
    rng = np.random.default_rng(4)
    image = rng.poisson(3.0, (48, 48)).astype(np.float32)
    yy, xx = np.indices(image.shape)
    image += (200.0 * np.exp(-((yy - 24) ** 2 + (xx - 24) ** 2) / 2.0)).astype(np.float32)
    marked = image.copy()
    marked[24, 27] = 65535.0
    masked = np.ones(image.shape, bool)
    masked[24, 27] = False
    integrator = Integrator()
    args = ([0], [24.0], [24.0])
    got = integrator.integrate(Frame(panels=[marked], meta={"dtype": "uint16"}), *args)
    want = integrator.integrate(Frame(panels=[marked], masks=[masked]), *args)
    np.testing.assert_allclose(got["photons"], want["photons"], rtol=1e-6)
    np.testing.assert_allclose(got["sum_photons"], want["sum_photons"], rtol=1e-6)
    assert got["sum_photons"][0] < 2000  # the spot's ~1,260, not the marker's 65535 counts
