"""``dials.find_spots algorithm=peaknet`` through real DIALS commands (the venv's ``dials.*``).

These are the acceptance tests of the DIALS adapter: the learned finder, switched on with one
word and nothing else tuned, must give DIALS spot lists good enough to index real XFEL stills and
to rank the frames of a real grid scan the way DIALS' own dispersion finder does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.evaluation.dials_commands import (
    dials_environment,
    run_dials,
    stills_process_status,
)

pytestmark = pytest.mark.dials

CSPAD_DIR = "cspad_thermolysin_stills"
GRID_DIR = "pilatus6m_thaumatin_grid"
THERMOLYSIN = ["indexing.known_symmetry.space_group=P6122",
               "indexing.known_symmetry.unit_cell=92.9,92.9,130.4,90,90,120",
               "stills.indexer=sequences", "indexing.method=fft1d"]
# The model runs single-threaded per DIALS process: the test machine's cores are shared.
ONE_THREAD = "spotfinder.threshold.peaknet.threads=1"


@pytest.fixture(scope="module")
def env(dials_env: dict[str, str]) -> dict[str, str]:
    return dials_environment(dials_env)


def spots_per_image(refl_path: Path, n_images: int) -> np.ndarray:
    """Spot counts per image of a single-imageset ``strong.refl`` (frame from the z centroid)."""
    from dials.array_family import flex

    table = flex.reflection_table.from_file(str(refl_path))
    z = table["xyzobs.px.value"].parts()[2].as_numpy_array()
    return np.bincount(np.floor(z).astype(int), minlength=n_images)[:n_images]


def read_table(refl_path: Path):
    from dials.array_family import flex

    return flex.reflection_table.from_file(str(refl_path))


@pytest.mark.parametrize("still", ["idx-20130301060858401.cbf", "idx-20130301060858601.cbf"])
def test_cspad_still_indexes_with_default_peaknet(still: str, real_data: Path, env, tmp_path):
    """Real CSPAD thermolysin stills: ``algorithm=peaknet`` alone, then dials.index succeeds.

    DIALS' dispersion finder needs hand-tuned gain, global threshold and spot size on these
    frames (see ../shared/data/README.md); the learned finder needs nothing but its name.
    """
    run_dials("import", str(real_data / CSPAD_DIR / still), cwd=tmp_path, env=env)
    run_dials("find_spots", "imported.expt", "algorithm=peaknet", ONE_THREAD, cwd=tmp_path,
              env=env)
    strong = read_table(tmp_path / "strong.refl")
    assert len(strong) >= 30, f"only {len(strong)} spots on {still}"
    run_dials("index", "imported.expt", "strong.refl", *THERMOLYSIN, cwd=tmp_path, env=env)

    from dxtbx.model.experiment_list import ExperimentList

    indexed = ExperimentList.from_file(str(tmp_path / "indexed.expt"), check_format=False)
    assert len(indexed.crystals()) >= 1
    cell = indexed.crystals()[0].get_unit_cell().parameters()
    assert np.allclose(cell, (92.9, 92.9, 130.4, 90, 90, 120), rtol=0.02), cell
    refl = read_table(tmp_path / "indexed.refl")
    n_indexed = refl.get_flags(refl.flags.indexed).count(True)
    assert n_indexed >= 20, f"{n_indexed} of {len(strong)} spots indexed on {still}"


def test_gain_in_use_is_in_the_dials_log_once_per_run(real_data: Path, env, tmp_path):
    """The gain the peak SNRs count shot noise with is in DIALS' own log (console and
    ``dials.find_spots.log``), once for a run of several images: on the CSPAD stills (whose CBFs
    declare the placeholder 1) it is measured from the background, about 30 ADU per photon
    (``finding/gain.py``); a gain that is set is reported as set."""
    import re

    stills = sorted((real_data / CSPAD_DIR).glob("*.cbf"))
    assert len(stills) >= 2
    run_dials("import", *map(str, stills), cwd=tmp_path, env=env)
    for extra, how in (((), "measured from the background"),
                       (("spotfinder.threshold.peaknet.gain=12",), "as set")):
        out, _ = run_dials("find_spots", "imported.expt", "algorithm=peaknet", ONE_THREAD,
                           *extra, cwd=tmp_path, env=env)
        log = (tmp_path / "dials.find_spots.log").read_text()
        for text in (out, log):
            said = [line for line in text.splitlines() if "detector gain" in line]
            assert len(said) == 1 and how in said[0], said
            gain = float(re.search(r"detector gain of ([0-9.e+]+)", said[0]).group(1))
            assert (20 <= gain <= 40) if not extra else gain == 12, said[0]


def test_long_form_region_of_interest_and_nproc2_agree(real_data: Path, env, tmp_path):
    """``spotfinder.threshold.algorithm=peaknet`` with 2 worker processes (the extension is
    pickled into them) gives exactly the spots of a single process; the ROI option works too."""
    frames = sorted((real_data / GRID_DIR).glob("*.cbf.bz2"))[:2]
    run_dials("import", *map(str, frames), cwd=tmp_path, env=env)
    roi = "spotfinder.region_of_interest=900,1500,900,1500"  # around the beam centre
    common = ["imported.expt", "spotfinder.threshold.algorithm=peaknet", ONE_THREAD, roi]
    run_dials("find_spots", *common, "spotfinder.mp.nproc=1", "output.reflections=one.refl",
              cwd=tmp_path, env=env)
    log, _ = run_dials("find_spots", *common, "spotfinder.mp.nproc=2",
                       "output.reflections=two.refl", cwd=tmp_path, env=env)
    assert "Using multiprocessing with 2 parallel job(s)" in log  # really ran two workers
    one, two = read_table(tmp_path / "one.refl"), read_table(tmp_path / "two.refl")
    assert len(one) > 0
    assert len(one) == len(two)
    key = lambda t: np.array(sorted(map(tuple, t["xyzobs.px.value"])))  # noqa: E731
    assert np.allclose(key(one), key(two))
    x, y, _ = (np.array(c) for c in one["xyzobs.px.value"].parts())
    assert x.min() >= 900 and x.max() <= 1500 and y.min() >= 900 and y.max() <= 1500


@pytest.mark.slow
def test_thaumatin_grid_counts_follow_dispersion(real_data: Path, env, tmp_path):
    """Every real grid frame is a hit, and spot counts rise and fall with DIALS' dispersion."""
    from scipy.stats import spearmanr

    frames = sorted((real_data / GRID_DIR).glob("*.cbf.bz2"))
    run_dials("import", *map(str, frames), cwd=tmp_path, env=env)
    run_dials("find_spots", "imported.expt", "nproc=2", "output.reflections=dispersion.refl",
          cwd=tmp_path, env=env)
    run_dials("find_spots", "imported.expt", "algorithm=peaknet", "nproc=2", ONE_THREAD,
          "output.reflections=peaknet.refl", cwd=tmp_path, env=env)
    reference = spots_per_image(tmp_path / "dispersion.refl", len(frames))
    learned = spots_per_image(tmp_path / "peaknet.refl", len(frames))
    assert (learned >= 20).all(), f"frames without spots: peaknet {learned}, dispersion {reference}"
    rho = spearmanr(learned, reference).statistic
    assert rho >= 0.6, f"rank correlation {rho:.2f}: peaknet {learned}, dispersion {reference}"


def test_stills_process_with_peaknet_indexes_real_stills(real_data: Path, env, tmp_path):
    """``dials.stills_process`` takes ``spotfinder.threshold.algorithm=peaknet`` unchanged."""
    (tmp_path / "process.phil").write_text("\n".join([
        "spotfinder.threshold.algorithm=peaknet", ONE_THREAD,
        *(f"indexing.{p}" if p.startswith("stills.") else p for p in THERMOLYSIN),
        "dispatch.integrate=False", "output.output_dir=.",
    ]) + "\n")
    stills = sorted((real_data / CSPAD_DIR).glob("*.cbf"))
    run_dials("stills_process", *map(str, stills), "process.phil", cwd=tmp_path, env=env)
    status = stills_process_status(tmp_path / "debug")
    assert sorted(status) == sorted(p.stem for p in stills)
    assert all(s.startswith("index_ok") for s in status.values()), status
