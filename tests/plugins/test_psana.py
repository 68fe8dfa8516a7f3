"""The psana source plugin: registered through the entry point, clear where psana is missing;
its event reading runs only where LCLS psana is installed (skipped here otherwise)."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_psana.source import (
    PsanaSource,
    PsanaSourceType,
    calib_to_panels,
    parse_datasource,
    psana_available,
)
from peaknet_xtal.registry import source_types


def test_registered_through_the_entry_point():
    assert isinstance(source_types()["psana"], PsanaSourceType)


def test_parse_datasource():
    assert parse_datasource("exp=mfxp1:run=7:dir=/d") == {"exp": "mfxp1", "run": "7", "dir": "/d"}
    with pytest.raises(ValueError, match="lacks"):
        parse_datasource("exp=mfxp1")
    with pytest.raises(ValueError, match="not a psana data source"):
        parse_datasource("/data/run7.h5")


def test_calib_to_panels_splits_modules():
    panels = calib_to_panels(np.zeros((4, 2, 3, 5)))
    assert len(panels) == 8 and panels[0].shape == (3, 5) and panels[0].dtype == np.float32


@pytest.mark.skipif(psana_available(), reason="psana is installed here")
def test_without_psana_never_sniffs_and_says_why():
    kind = PsanaSourceType()
    assert not kind.sniff("exp=mfxp1:run=7")
    with pytest.raises(RuntimeError, match="psana is not importable|needs LCLS psana"):
        kind.open("exp=mfxp1:run=7", detector="epix10k2M")


@pytest.mark.skipif(not psana_available(), reason="LCLS psana is not installed")
def test_reads_events_with_stable_keys():  # pragma: no cover - LCLS environments only
    source = PsanaSource("exp=tmoc00118:run=222:dir=/sdf/data/lcls/ds/prj/public01/xtc",
                         detector="tmo_atmopal", max_events=3)
    frames = list(source)
    assert frames and len({f.key for f in frames}) == len(frames)
