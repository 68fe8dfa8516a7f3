"""peaknet-sim on a stacked layout (EuXFEL-style modules along a fixed dimension, ``p/dim1 = m``).

CrystFEL's ``indexamajig --peaks=cxi`` places a CXI peak by its (fs, ss) position in one 2-D slab
alone (crystfel_geometry(5), PEAK LISTS), so the modules of a stack, which share one fs/ss range,
cannot be told apart there.  A run on such a geometry is therefore stored as one slab (the modules
one below another, ``Geometry.as_slab``, as peaknet2cxi stores it), with a ``.geom``, truth peak
table, peak masks and stream in that slab's coordinates.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from peaknet_xtal.formats.cxi import iter_cxi_frames
from peaknet_xtal.formats.geometry import parse_geometry, read_geometry
from peaknet_xtal.formats.geometry_rules import crystfel_problems, errors_only
from peaknet_xtal.formats.stream import read_stream
from peaknet_xtal.sim import SimConfig, simulate_frame
from peaknet_xtal.sim.output import read_truth

WIDTH, ASIC_HEIGHT = 64, 24  # two ASICs of 64 x 24 per module: a module is 48 rows high

#: module m holds ASICs "m{m}a0" (module rows 0-23) and "m{m}a1" (rows 24-47); modules sit left
#: and right of the beam, a bad region on module 1's second ASIC
STACKED = "\n".join(
    ["photon_energy = 9000 eV", "clen = 0.05 m", "res = 10000", "adu_per_photon = 10",
     "data = /entry_1/data_1/data", "dim0 = %", "dim2 = ss", "dim3 = fs"]
    + [line for m, x in ((0, -70.0), (1, 6.0)) for a in (0, 1) for line in (
        f"m{m}a{a}/dim1 = {m}", f"m{m}a{a}/min_fs = 0", f"m{m}a{a}/max_fs = {WIDTH - 1}",
        f"m{m}a{a}/min_ss = {a * ASIC_HEIGHT}", f"m{m}a{a}/max_ss = {(a + 1) * ASIC_HEIGHT - 1}",
        f"m{m}a{a}/fs = +1.0x +0.0y", f"m{m}a{a}/ss = +0.0x +1.0y",
        f"m{m}a{a}/corner_x = {x}", f"m{m}a{a}/corner_y = {-48.0 + a * ASIC_HEIGHT}")]
    + ["bad_corner/min_fs = 10", "bad_corner/max_fs = 19", "bad_corner/min_ss = 30",
       "bad_corner/max_ss = 33", "bad_corner/panel = m1a1"]) + "\n"

CONFIG = SimConfig(cell="lysozyme", hit_probability=1.0)


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory):
    from peaknet_xtal.sim.run import simulate_run

    geometry = parse_geometry(STACKED)
    assert geometry.stacked and geometry.slab_shape == (2, 48, WIDTH)
    paths = simulate_run(geometry, 3, 21, tmp_path_factory.mktemp("stacked"), CONFIG,
                         progress=False)
    return geometry, paths


def test_stacked_run_is_stored_as_one_slab(stacked_run):
    source, paths = stacked_run
    geometry = read_geometry(paths.geom)
    assert not geometry.stacked and geometry.slab_shape == (96, WIDTH)
    assert [p.name for p in geometry.panels] == [p.name for p in source.panels]
    assert [(p.min_ss, p.max_ss) for p in geometry.panels] == [(0, 23), (24, 47), (48, 71),
                                                               (72, 95)]
    with h5py.File(paths.cxi) as h5:
        assert h5["/entry_1/data_1/data"].shape == (3, 96, WIDTH)
        assert h5["/entry_1/data_1/mask"].shape == (96, WIDTH)
    with h5py.File(paths.truth) as h5:
        assert h5["peak_masks"].shape == (3, 96, WIDTH)
    # The lab placement of every panel is the source geometry's.
    for p, q in zip(source.panels, geometry.panels, strict=True):
        assert (p.corner_x, p.corner_y) == (q.corner_x, q.corner_y)
        np.testing.assert_array_equal(np.stack([p.fs, p.ss]), np.stack([q.fs, q.ss]))
    # The bad region moved with its panel (module 1 starts at slab row 48).
    assert [(r.min_ss, r.max_ss) for r in geometry.bad_regions if r.panel == "m1a1"] == [(78, 81)]


def test_stacked_run_geometry_is_one_crystfel_accepts(stacked_run):
    _, paths = stacked_run
    text = paths.geom.read_text()
    assert "dim1 = 0" not in text and "dim1 = 1" not in text
    assert errors_only(crystfel_problems(text, [paths.cxi])) == []
    assert errors_only(crystfel_problems(read_stream(paths.stream).header.geometry_text)) == []


def test_truth_peak_table_places_peaks_by_slab_position_alone(stacked_run):
    """As indexamajig --peaks=cxi does: (peakXPosRaw, peakYPosRaw) through sim.geom, nothing
    else, gives each true strong spot's panel and pixel."""
    _, paths = stacked_run
    geometry = read_geometry(paths.geom)
    refl = read_truth(paths.truth)["reflections"]
    with h5py.File(paths.cxi) as h5:
        n_peaks = h5["/entry_1/result_1/nPeaks"][()]
        xs = h5["/entry_1/result_1/peakXPosRaw"][()]
        ys = h5["/entry_1/result_1/peakYPosRaw"][()]
    on_module_1 = 0
    for i, n in enumerate(n_peaks):
        strong = refl[(refl["frame"] == i) & refl["strong"]]
        assert n == len(strong)
        panel, pfs, pss = geometry.raw_to_panel(xs[i, :n], ys[i, :n])
        np.testing.assert_array_equal(panel, strong["panel"])
        np.testing.assert_allclose(pfs, strong["fs"], atol=1e-3)
        np.testing.assert_allclose(pss, strong["ss"], atol=1e-3)
        on_module_1 += int((strong["panel"] >= 2).sum())
    assert on_module_1 > 0  # the test means something only with peaks off module 0


def test_stacked_run_frames_masks_and_stream_agree_with_the_truth(stacked_run):
    source, paths = stacked_run
    geometry = read_geometry(paths.geom)
    frames = list(iter_cxi_frames(paths.cxi, geometry))
    assert len(frames) == 3
    fresh, fresh_truth = simulate_frame(source, 22, CONFIG)  # frame 1 regenerated from its seed
    for stored, panel in zip(frames[1].panels, fresh.panels, strict=True):
        np.testing.assert_array_equal(stored, panel)
    with h5py.File(paths.cxi) as h5:
        mask = geometry.split_slab(h5["/entry_1/data_1/mask"][()])
    for stored, panel in zip(mask, fresh.masks_or_ones(), strict=True):
        np.testing.assert_array_equal(stored.astype(bool), panel)
    assert not mask[3][30:34, 10:20].any()
    with h5py.File(paths.truth) as h5:
        spots = geometry.split_slab(h5["peak_masks"][1])
    for stored, panel in zip(spots, fresh_truth.peak_masks, strict=True):
        np.testing.assert_array_equal(stored.astype(bool), panel)
    refl = read_truth(paths.truth)["reflections"]
    stream = read_stream(paths.stream)
    for i, chunk in enumerate(stream.chunks):
        strong = refl[(refl["frame"] == i) & refl["strong"]]
        # slab coordinates in the stream too: by position alone, the panel the stream names
        peaks = chunk.peaks
        panel, _, _ = geometry.raw_to_panel(peaks["fs"] - 0.5, peaks["ss"] - 0.5)
        np.testing.assert_array_equal(panel, strong["panel"])
        table = chunk.peak_table(geometry)
        np.testing.assert_allclose(table["ss"], strong["ss"], atol=0.006)
        for crystal in chunk.crystals:
            rows = crystal.reflections
            where, _, _ = geometry.raw_to_panel(rows["fs"] - 0.5, rows["ss"] - 0.5)
            names = np.array([geometry.panels[k].name for k in where])
            np.testing.assert_array_equal(names, rows["panel"])


def test_a_slab_geometry_is_written_as_before(tmp_path, make_geometry_text):
    """Only stacked layouts change: a slab geometry's run geometry is the same object's text."""
    from peaknet_xtal.sim.output import run_geometry

    geometry = parse_geometry(make_geometry_text(["p0", "p1"], 32, 16, [(-32.0, -16.0),
                                                                        (0.0, -16.0)]))
    written = run_geometry(geometry, 1.3, 0.1, 10.0)
    assert [(p.min_ss, p.max_ss, p.dims) for p in written.panels] == [
        (0, 15, ["%", "ss", "fs"]), (16, 31, ["%", "ss", "fs"])]
