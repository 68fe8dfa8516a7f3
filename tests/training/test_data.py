"""Training data sources: every setting and file problem is a clear error when the source is
made, before any training; a damaged frame names its file, dataset and frame."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal.config import ConfigError
from peaknet_xtal.errors import FormatError
from peaknet_xtal.training.data import LabelFileSource, SimulatedSource, make_source

GEOMETRY = Path(__file__).resolve().parents[1] / "fixtures" / "geometry" / "two_panels.geom"


def test_simulated_source_checks_its_options_when_made() -> None:
    """Python callers skip the config check: the source itself refuses what it cannot use
    (a misspelt ``gain`` was ignored, a bad simulator setting failed in the first batch)."""
    with pytest.raises(ConfigError, match=r"data\.sim\.geometries: give at least one"):
        SimulatedSource({})
    with pytest.raises(ConfigError, match=r"data\.sim: unknown settings \['gian'\]"):
        SimulatedSource({"geometries": [str(GEOMETRY)], "gian": [1, 40]})
    with pytest.raises(ConfigError, match=r"data\.sim\.config: unknown simulation settings: "
                                          r"read_nosie"):
        SimulatedSource({"geometries": [str(GEOMETRY)], "config": {"read_nosie": 1.0}})
    with pytest.raises(FormatError, match=r"absent\.geom"):
        SimulatedSource({"geometries": [str(GEOMETRY.parent / "absent.geom")]})
    source = SimulatedSource({"geometries": [str(GEOMETRY)], "config": {"read_noise": 0.1}})
    assert source.options["randomise"] is True and source.options["gain"] == [1.0, 1.0]


def test_make_source_and_label_files_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.source: must be one of sim, labels "
                                          r"\(got 'lables'\)"):
        make_source({"source": "lables"})
    with pytest.raises(ConfigError, match=r"data\.paths: give at least one"):
        make_source({"source": "labels", "paths": []})


def test_a_damaged_chunk_names_file_dataset_and_frame(tmp_path: Path) -> None:
    path = tmp_path / "labels.h5"
    with h5py.File(path, "w") as handle:
        for name, dtype in (("images", np.float32), ("masks", np.uint8), ("labels", np.uint8)):
            handle.create_dataset(name, data=np.ones((3, 16, 16), dtype), chunks=(1, 16, 16),
                                  compression="gzip")
        info = handle["masks"].id.get_chunk_info(2)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset:info.byte_offset + info.size] = b"\x55" * info.size
    path.write_bytes(bytes(raw))
    source = LabelFileSource([path])
    rng = np.random.default_rng(0)
    assert source.frame(1, rng)[0].shape == (16, 16)
    with pytest.raises(FormatError, match=rf"^{path}, dataset masks: frame 2 cannot be read"):
        source.frame(2, rng)
