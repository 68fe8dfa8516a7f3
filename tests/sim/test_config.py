"""Simulation settings: every number of SimConfig has a range, and a cell setting is checked when
the settings are read (peaknet-sim refuses a bad one before anything is written)."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from peaknet_xtal import config
from peaknet_xtal.sim import PRESET_CELLS, Cell, SimConfig
from peaknet_xtal.sim.config import LIMITS, cell_setting, settings_types


def test_every_number_of_simconfig_has_a_range_that_holds_its_default():
    """A field added without a range would reach users unchecked: this fails first."""
    hints = typing.get_type_hints(SimConfig)
    numbers = {name for name, hint in hints.items()
               if {int, float} & (set(typing.get_args(hint)) or {hint})}
    assert numbers == set(LIMITS)
    types = settings_types("sim.")
    assert {f"sim.{name}" for name in numbers} | {"sim.cell"} == set(types)
    defaults = {"sim": SimConfig().to_dict()}
    assert config.resolve(defaults, {}, types=types) == defaults  # the defaults pass
    for field in dataclasses.fields(SimConfig):
        if field.name in LIMITS and "gt" in LIMITS[field.name]:
            with pytest.raises(config.ConfigError, match=rf"sim\.{field.name}: must be"):
                config.resolve(defaults, {"sim": {field.name: LIMITS[field.name]["gt"]}},
                               types=types)


def test_cell_settings_are_checked_when_read():
    assert cell_setting("lysozyme") == "lysozyme" and cell_setting(None) is None
    cell = cell_setting({"a": 79.1, "b": 79.1, "c": 38.0, "alpha": 90, "beta": 90,
                         "gamma": 90, "lattice": "tetragonal"})
    assert isinstance(cell, Cell) and cell.lattice == "tetragonal"
    assert cell_setting([50, 60, 70, 90, 90, 90]) == Cell(50, 60, 70, 90, 90, 90)
    with pytest.raises(ValueError, match="unknown preset cell 'lyso'"):
        cell_setting("lyso")
    with pytest.raises(ValueError, match="not a unit cell"):
        cell_setting({"a": 1, "bee": 2})
    with pytest.raises(ValueError, match="do not close"):
        cell_setting([10, 10, 10, 150, 150, 150])
    with pytest.raises(ValueError, match="unknown preset cell"):
        SimConfig.from_dict({"cell": "lyso"})
    assert SimConfig.from_dict({"cell": sorted(PRESET_CELLS)[0]}).cell == sorted(PRESET_CELLS)[0]
