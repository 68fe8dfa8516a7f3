"""``dials.find_spots algorithm=peaknet`` through real DIALS commands (the venv's ``dials.*``).

These are the acceptance tests of the DIALS adapter: the learned finder, switched on with one
word and nothing else tuned, must give DIALS spot lists good enough to index real XFEL stills and
to rank the frames of a real grid scan the way DIALS' own dispersion finder does.
"""
from __future__ import annotations

import re
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


GAIN_LINE = re.compile(r"peaknet: (\S+): peak SNRs count shot noise at a detector gain of "
                       r"([0-9.e+]+) counts per photon, (.*)")


def gain_lines(text: str) -> list[tuple[str, float, str]]:
    """(image, gain, how) of each of the plugin's gain lines in a DIALS log."""
    return [(m.group(1), float(m.group(2)), m.group(3))
            for m in map(GAIN_LINE.search, text.splitlines()) if m]


def test_each_image_says_the_gain_it_used(real_data: Path, env, tmp_path):
    """The gain the peak SNRs count shot noise with is in DIALS' own log (console and
    ``dials.find_spots.log``) for every image: at info level where it changes, every image
    at debug level (``-vv``).  On the CSPAD stills (whose CBFs declare the placeholder 1) it is
    measured from the background, about 30 ADU per photon (``finding/gain.py``), and pooled
    over the images one process finds, so the second still uses another value than the first;
    alone, it measures its own.  A gain that is set is reported as set."""
    stills = sorted((real_data / CSPAD_DIR).glob("*.cbf"))
    assert len(stills) >= 2
    run_dials("import", *map(str, stills), cwd=tmp_path, env=env)
    out, _ = run_dials("find_spots", "imported.expt", "algorithm=peaknet", ONE_THREAD, "-vv",
                       "output.reflections=pair.refl", cwd=tmp_path, env=env)
    for text in (out, (tmp_path / "dials.find_spots.log").read_text()):
        said = gain_lines(text)
        assert [Path(image).name for image, _, _ in said] == [s.name for s in stills], said
        assert all("measured from the background" in how and 20 <= gain <= 40
                   for _, gain, how in said), said
    info, _ = run_dials("find_spots", "imported.expt", "algorithm=peaknet", ONE_THREAD,
                        "output.reflections=pair.refl", cwd=tmp_path, env=env)
    assert gain_lines(info) == said  # the gain moves (pooled): info level says both
    (first, g1, _), (second, g2, _) = said
    assert g1 != g2

    # the second still alone measures its own gain; beside the first it used the pool of both
    # (the median of the first images' measurements one process finds: README, DIALS section)
    run_dials("import", second, "output.experiments=second.expt", cwd=tmp_path, env=env)
    out, _ = run_dials("find_spots", "second.expt", "algorithm=peaknet", ONE_THREAD,
                       "output.reflections=second.refl", cwd=tmp_path, env=env)
    ((image, alone, _),) = gain_lines(out)
    assert Path(image).name == Path(second).name and alone != g2
    assert g2 == pytest.approx(np.median([g1, alone]), abs=0.01)
    out, _ = run_dials("find_spots", "second.expt", "algorithm=peaknet", ONE_THREAD,
                       "spotfinder.threshold.peaknet.adu_per_photon=12",
                       "output.reflections=set.refl",
                       cwd=tmp_path, env=env)
    ((image, gain, how),) = gain_lines(out)
    assert gain == 12 and how.startswith("as set"), how


def spot_boxes(table) -> dict[tuple[int, ...], tuple[float, float]]:
    """Per spot, (panel, x0, x1, y0, y1) of its box -> its centroid (x, y)."""
    boxes = [(p, *b[:4]) for p, b in zip(table["panel"], table["bbox"], strict=True)]
    return {box: xyz[:2] for box, xyz in zip(boxes, table["xyzobs.px.value"], strict=True)}


def test_a_mask_or_region_of_interest_changes_only_the_spots_it_covers(real_data: Path, env,
                                                                       tmp_path):
    """A user mask (``lookup.mask``) over one spot and a corner of panel 0 removes that spot
    and leaves the other panels' spots as they were: the whole image is still found at once
    under DIALS' mask, so the rules that judge the whole image (spikes against its spot
    widths, faint_support) and the gain measured from its background still hold.  A region of
    interest keeps the spots found on the whole image within it."""
    run_dials("import", str(real_data / CSPAD_DIR / "idx-20130301060858401.cbf"),
              cwd=tmp_path, env=env)
    find = ("find_spots", "imported.expt", "algorithm=peaknet", ONE_THREAD)
    out, _ = run_dials(*find, "output.reflections=all.refl", cwd=tmp_path, env=env)
    assert "measured from the background" in out
    every = spot_boxes(read_table(tmp_path / "all.refl"))
    assert len(every) > 100
    covered = max(every, key=lambda b: (b[0] != 0, -b[0]))  # a spot off panel 0 if any
    regions = [(0, 0, 5, 0, 5), covered]
    (tmp_path / "mask.phil").write_text("".join(
        f"untrusted {{\n  panel = {p}\n  rectangle = {x0} {x1} {y0} {y1}\n}}\n"
        for p, x0, x1, y0, y1 in regions))
    run_dials("generate_mask", "imported.expt", "mask.phil", "output.mask=user.mask",
              cwd=tmp_path, env=env)
    out, _ = run_dials(*find, "lookup.mask=user.mask", "output.reflections=masked.refl",
                       cwd=tmp_path, env=env)
    assert "measured from the background" in out, [ln for ln in out.splitlines()
                                                   if "gain" in ln]
    masked = spot_boxes(read_table(tmp_path / "masked.refl"))
    assert covered not in masked
    # every other panel keeps exactly its spots (centroids included); on the panels masked,
    # what the finder measures per panel (its noise correlation) moves a little
    touched = {r[0] for r in regions}
    assert ({b: c for b, c in every.items() if b[0] not in touched}
            == {b: c for b, c in masked.items() if b[0] not in touched})

    x0, x1, y0, y1 = roi = (0, 120, 0, 100)  # on every panel
    run_dials(*find, f"spotfinder.region_of_interest={x0},{x1},{y0},{y1}",
              "output.reflections=roi.refl", cwd=tmp_path, env=env)
    inside = spot_boxes(read_table(tmp_path / "roi.refl"))
    assert len(inside) > 10

    rim = 2  # dilation and DIALS' labelling reach one pixel beyond a peak

    def within(box: tuple[int, ...]) -> bool:
        return x0 + rim <= box[1] and box[2] + rim <= x1 and y0 + rim <= box[3] and \
            box[4] + rim <= y1

    assert roi and {b: c for b, c in every.items() if within(b)} == {
        b: c for b, c in inside.items() if within(b)}


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
