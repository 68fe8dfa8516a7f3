"""The serial-synchrotron route of DIALS' own tools: ``dials.ssx_index`` and
``dials.ssx_integrate`` take the spots of ``dials.find_spots algorithm=peaknet`` as they take
dispersion's (README, "Serial crystallography with DIALS' ssx tools").  Real CSPAD thermolysin
stills, their known symmetry from the data's README."""
from __future__ import annotations

import numpy as np
import pytest

from peaknet_xtal.evaluation.dials_commands import dials_environment, run_dials
from peaknet_xtal.formats.dials_tables import read_experiments, read_reflections

pytestmark = [pytest.mark.dials, pytest.mark.slow]

#: thermolysin, as ../shared/data/real/cspad_thermolysin_stills/README.md gives it
SPACE_GROUP, CELL = "P6122", (92.9, 92.9, 130.4, 90.0, 90.0, 120.0)


def test_ssx_index_and_integrate_take_peaknet_spots(real_data, dials_env, tmp_path):
    stills = sorted((real_data / "cspad_thermolysin_stills").glob("*.cbf"))
    assert len(stills) == 2
    env = dials_environment(dials_env)
    run_dials("import", *map(str, stills), cwd=tmp_path, env=env)
    run_dials("find_spots", "imported.expt", "spotfinder.threshold.algorithm=peaknet",
              "spotfinder.threshold.peaknet.device=cpu", cwd=tmp_path, env=env)
    run_dials("ssx_index", "imported.expt", "strong.refl", f"space_group={SPACE_GROUP}",
              "unit_cell=" + ",".join(map(str, CELL)), "nproc=1", cwd=tmp_path, env=env)
    crystals = read_experiments(tmp_path / "indexed.expt")
    # both stills index, each to the known cell
    assert len(crystals) == 2
    assert len({e.imageset.get_path(0) for e in crystals}) == 2
    for experiment in crystals:
        cell = np.array(experiment.crystal.get_unit_cell().parameters())
        assert np.allclose(cell, CELL, rtol=0.02)
    indexed = read_reflections(tmp_path / "indexed.refl", ["id"])["id"]
    assert set(np.unique(indexed[indexed >= 0])) == {0, 1}
    # DIALS' ellipsoid integration fails on this multi-panel detector whichever finder gave the
    # spots (an assertion in its coordinate system); the stills algorithm integrates both
    run_dials("ssx_integrate", "indexed.expt", "indexed.refl", "algorithm=stills", "nproc=1",
              cwd=tmp_path, env=env)
    tables = sorted(tmp_path.glob("integrated_*.refl"))
    assert tables
    ids = np.concatenate([read_reflections(t, ["id"])["id"] for t in tables])
    assert len(ids) > 100
