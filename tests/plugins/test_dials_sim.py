"""``algorithm=peaknet`` on simulated stills, scored against the simulator's exact truth.

Frames come from ``peaknet_xtal.sim.simulate_frame`` on a real detector geometry (Jungfrau 1M,
16 panels) and are written as a CXI stack with its ``.geom`` beside it, the layout the project's
dxtbx format (``peaknet_dxtbx``) lets ``dials.import`` read.  The DIALS spot list then goes
through DIALS' own extraction, filters and centroids, so this scores the whole host path.
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

GEOMETRY = "crystfel_geometry/psgeom_jungfrau-1M-pan.geom"
SEEDS = (11, 12, 13)
CELL = "lysozyme"
LYSOZYME = ["indexing.known_symmetry.space_group=P43212",
            "indexing.known_symmetry.unit_cell=79.1,79.1,38.0,90,90,90"]
ONE_THREAD = "spotfinder.threshold.peaknet.threads=1"
MATCH_PX = 2.0  # a spot within this distance of a true reflection on the same panel is right


@pytest.fixture(scope="module")
def env(dials_env: dict[str, str]) -> dict[str, str]:
    return dials_environment(dials_env)


def write_cxi_stack(path: Path, geometry, frames) -> None:
    """Frames as ``/entry_1/data_1/data`` (n, ss, fs), a static mask and ``.geom`` beside."""
    import h5py

    from peaknet_xtal.formats.geometry import write_geometry

    data = np.stack([geometry.assemble_slab(f.panels) for f in frames]).astype(np.float32)
    # Dead and hot pixels belong to the detector: one static 2-D mask (1 = good) for the stack.
    good = np.logical_and.reduce([geometry.assemble_slab(f.masks_or_ones()).astype(bool)
                                  for f in frames]).astype(np.uint16)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", data=data, compression="gzip")
        h5.create_dataset("/entry_1/data_1/mask", data=good, compression="gzip")
    write_geometry(geometry, path.with_suffix(".geom"), data="/entry_1/data_1/data",
                   mask="/entry_1/data_1/mask", mask_good="0x1", mask_bad="0x0")


@pytest.fixture(scope="module")
def simulated(real_data: Path, tmp_path_factory, env) -> tuple[Path, list]:
    """Three simulated lysozyme hits on the Jungfrau 1M, as ``sim.cxi`` + ``sim.geom``."""
    from peaknet_xtal.formats.geometry import read_geometry
    from peaknet_xtal.sim import SimConfig, simulate_frame

    geometry = read_geometry(real_data / GEOMETRY)
    config = SimConfig(cell=CELL, hit_probability=1.0)
    results = [simulate_frame(geometry, seed, config) for seed in SEEDS]
    folder = tmp_path_factory.mktemp("sim")
    write_cxi_stack(folder / "sim.cxi", geometry, [frame for frame, _ in results])
    run_dials("import", "sim.cxi", cwd=folder, env=env)
    assert (folder / "imported.expt").exists(), (
        "dials.import did not understand sim.cxi: is the peaknet_dxtbx format installed?")
    return folder, [truth for _, truth in results]


def score(found_panel, found_fs, found_ss, truth) -> tuple[float, float, float]:
    """(precision, recall, F1): recall over strong reflections; a spot is right when it lies on
    any true reflection (finding a weak one is no false positive)."""
    from peaknet_xtal.evaluation.metrics import match_peaks

    refl = truth.reflections
    strong = refl[refl["strong"]]
    ia, _, _ = match_peaks(strong["panel"], strong["fs"], strong["ss"],
                           found_panel, found_fs, found_ss, MATCH_PX)
    _, ib, _ = match_peaks(refl["panel"], refl["fs"], refl["ss"],
                           found_panel, found_fs, found_ss, MATCH_PX)
    recall = len(ia) / max(len(strong), 1)
    precision = len(ib) / max(len(found_panel), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return precision, recall, f1


def test_spot_list_matches_truth(simulated, env) -> None:
    """DIALS' spot list with ``algorithm=peaknet`` scores F1 >= 0.9 on strong reflections."""
    folder, truths = simulated
    run_dials("find_spots", "imported.expt", "algorithm=peaknet", ONE_THREAD, cwd=folder, env=env)
    from dials.array_family import flex

    table = flex.reflection_table.from_file(str(folder / "strong.refl"))
    x, y, z = (np.array(c) for c in table["xyzobs.px.value"].parts())
    panel = np.array(table["panel"], dtype=int)
    image = np.floor(z).astype(int)  # the stack's frame index
    for i, truth in enumerate(truths):
        on = image == i
        # DIALS puts the origin at the pixel corner; the truth uses 0-based pixel centres.
        p, r, f1 = score(panel[on], x[on] - 0.5, y[on] - 0.5, truth)
        assert truth.strong.size >= 20, f"frame {i}: too few strong reflections to score"
        assert f1 >= 0.9, f"frame {i}: precision {p:.2f} recall {r:.2f} F1 {f1:.2f}"


def test_stills_process_indexes_simulated_hits(simulated, env) -> None:
    folder, truths = simulated
    (folder / "process.phil").write_text("\n".join([
        "spotfinder.threshold.algorithm=peaknet", ONE_THREAD, *LYSOZYME,
        "dispatch.integrate=False", "output.output_dir=process",
    ]) + "\n")
    (folder / "process").mkdir(exist_ok=True)
    run_dials("stills_process", "sim.cxi", "process.phil", cwd=folder, env=env)
    status = stills_process_status(folder / "process" / "debug")
    assert len(status) == len(truths)
    assert all(s.startswith("index_ok") for s in status.values()), status
