"""The built-in sources: how files are routed to them, and what each yields."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal import registry
from peaknet_xtal.errors import FormatError


@pytest.fixture()
def geom(tmp_path: Path, make_geometry_text) -> Path:
    """One 64x64 panel centred on the beam."""
    path = tmp_path / "one.geom"
    path.write_text(make_geometry_text(["p"], 64, 64, [(-32, -32)], data=None, dims=False))
    return path


def test_hdf5_without_cxi_data_goes_to_dxtbx_by_name(tmp_path):
    """An HDF5 file with no CXI image dataset is not claimed by the CXI source."""
    nexus = tmp_path / "master.nxs"
    with h5py.File(nexus, "w") as h5:
        h5["/entry/data/data_000001"] = np.zeros((1, 4, 4))
    types = registry.source_types()
    assert not types["cxi"].sniff(str(nexus)) and types["dxtbx"].sniff(str(nexus))
    cxi = tmp_path / "stack.h5"
    with h5py.File(cxi, "w") as h5:
        h5["/data/data"] = np.zeros((2, 4, 4))
    assert types["cxi"].sniff(str(cxi))
    assert registry.open_source(str(cxi)).name == "cxi"
    with pytest.raises(ValueError, match="no registered source"):
        registry.open_source(str(tmp_path / "x.unknown"))


def test_cxi_source_takes_a_geometry_path_and_checks_the_shape(tmp_path, geom):
    path = tmp_path / "small.cxi"
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = np.zeros((2, 32, 64), np.float32)
    with pytest.raises(FormatError, match="needs a slab of at least 64x64"):
        registry.open_source(str(path), "cxi", geometry=str(geom))


def test_sim_source_is_deterministic_and_carries_truth(geom):
    a = registry.open_source(f"sim:{geom}", count=2, seed=11)
    b = registry.open_source("sim:", "sim", geometry=str(geom), count=2, seed=11)
    frames_a, frames_b = list(a), list(b)
    assert len(a) == 2 and [f.serial for f in frames_a] == [0, 1]
    assert frames_a[0].source == f"sim:{geom}" and frames_a[0].panels[0].shape == (64, 64)
    np.testing.assert_array_equal(frames_a[1].panels[0], frames_b[1].panels[0])
    assert frames_a[0].meta["truth"].seed == 11
    assert not np.array_equal(frames_a[0].panels[0], frames_a[1].panels[0])
    with pytest.raises(FormatError, match="needs a geometry"):
        registry.open_source("sim:", "sim")


@pytest.mark.dials
def test_dxtbx_source_reads_a_multi_panel_still(real_data, dials_env):
    path = real_data / "cspad_thermolysin_stills" / "idx-20130301060858601.cbf"
    source = registry.open_source(str(path))
    assert source.name == "dxtbx" and len(source) == 1
    (frame,) = list(source)
    assert len(frame.panels) == 64 and frame.geometry.n_panels == 64
    assert frame.key == (str(path), "//")
