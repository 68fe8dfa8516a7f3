"""Simulated CXI stacks through dxtbx and real DIALS commands (``FormatCXIPeakNet``).

The strongest check of the simulator's geometry and of the format's CrystFEL -> DIALS frame
conversion together: DIALS, knowing nothing but the pixels and the .geom, must find the true
lattice (cell within 1 %, orientation up to the lattice symmetry) and must not index a blank.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.sim import SimConfig
from peaknet_xtal.sim.output import read_truth
from peaknet_xtal.sim.run import simulate_run

pytestmark = pytest.mark.dials

LYSOZYME = ["indexing.known_symmetry.space_group=P43212",
            "indexing.known_symmetry.unit_cell=79.1,79.1,38.0,90,90,90",
            "stills.indexer=sequences", "indexing.method=fft1d"]
#: CrystFEL lab frame -> DIALS lab frame (half turn about y).
TO_DIALS = np.diag([-1.0, 1.0, -1.0])


def dials(command: str, args: list[str], cwd: Path, env: dict[str, str]
          ) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / command
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_data):
    geometry = read_geometry(real_data / "crystfel_geometry" / "crystfel_doc_cspad-cxiformat.geom")
    root = tmp_path_factory.mktemp("simdials")
    hit = simulate_run(geometry, 1, 5, root / "hit", SimConfig(cell="lysozyme"), stream=False,
                       progress=False)
    blank = simulate_run(geometry, 1, 6, root / "blank", SimConfig(hit_probability=0.0),
                         stream=False, progress=False)
    return hit, blank


def test_format_understands_and_places_spots_exactly(runs, dials_env):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_dxtbx.format_cxi import FormatCXIPeakNet

    hit, _ = runs
    assert FormatCXIPeakNet.understand(str(hit.cxi))
    experiments = ExperimentListFactory.from_filenames([str(hit.cxi)])
    assert len(experiments) == 1
    assert experiments[0].imageset.get_format_class().__name__ == "FormatCXIPeakNet"
    truth = read_truth(hit.truth)
    refl = truth["reflections"][truth["reflections"]["strong"]][:50]
    A = TO_DIALS @ truth["crystals"][0]["A"]
    detector, beam = experiments[0].detector, experiments[0].beam
    assert beam.get_wavelength() == pytest.approx(1.3, rel=1e-6)
    for row in refl:
        s1 = np.array(beam.get_s0()) + A @ np.array([row["h"], row["k"], row["l"]])
        panel, mm = detector.get_ray_intersection(tuple(s1))
        px = detector[panel].millimeter_to_pixel(mm)
        assert panel == row["panel"]
        # Strong spots are partial reflections: off the sphere by eps, so allow ~0.05 px.
        assert px[0] == pytest.approx(row["fs"] + 0.5, abs=0.05)
        assert px[1] == pytest.approx(row["ss"] + 0.5, abs=0.05)
    data = experiments[0].imageset.get_raw_data(0)
    assert len(data) == 64 and data[0].all() == (185, 194)
    mask = experiments[0].imageset.get_mask(0)
    assert sum(m.count(False) for m in mask) > 0  # dead/hot pixels reach DIALS


def test_dials_indexes_hit_to_true_cell_and_orientation(runs, dials_env):
    hit, _ = runs
    work = hit.cxi.parent
    assert dials("dials.import", [hit.cxi.name], work, dials_env).returncode == 0
    assert dials("dials.find_spots", ["imported.expt"], work, dials_env).returncode == 0
    result = dials("dials.index", ["imported.expt", "strong.refl", *LYSOZYME], work, dials_env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    from dxtbx.model.experiment_list import ExperimentListFactory

    crystal = ExperimentListFactory.from_json_file(str(work / "indexed.expt"),
                                                   check_format=False)[0].crystal
    truth = read_truth(hit.truth)["crystals"][0]
    cell = np.array(crystal.get_unit_cell().parameters())
    np.testing.assert_allclose(cell, truth["cell"], rtol=0.01)
    # Same lattice in the same orientation: the change of basis is integral and unimodular.
    change = np.linalg.inv(TO_DIALS @ truth["A"]) @ np.array(crystal.get_A()).reshape(3, 3)
    assert np.abs(change - np.round(change)).max() < 0.02
    assert abs(abs(np.linalg.det(np.round(change))) - 1) < 1e-9


def test_dials_does_not_index_a_blank(runs, dials_env):
    _, blank = runs
    work = blank.cxi.parent
    assert dials("dials.import", [blank.cxi.name], work, dials_env).returncode == 0
    assert dials("dials.find_spots", ["imported.expt"], work, dials_env).returncode == 0
    result = dials("dials.index", ["imported.expt", "strong.refl", *LYSOZYME], work, dials_env)
    assert result.returncode != 0 or not (work / "indexed.expt").exists()


def test_bitshuffle_compressed_frames_find_the_same_spots(runs, dials_env):
    """The frames as Eiger and Jungfraujoch write them (bitshuffle/LZ4, formats.hdf5_filters),
    read by DIALS through this format, give the spots of the uncompressed file."""
    import shutil

    import h5py
    import hdf5plugin
    from dials.array_family import flex

    hit, _ = runs
    work = hit.cxi.parent
    packed = work / "packed.cxi"
    shutil.copy(hit.cxi, packed)
    with h5py.File(packed, "r+") as h5:
        data = h5["/entry_1/data_1/data"]
        frames, attrs = data[...], dict(data.attrs)
        del h5["/entry_1/data_1/data"]
        data = h5.create_dataset("/entry_1/data_1/data", data=frames,
                                 chunks=(1, *frames.shape[1:]),
                                 **hdf5plugin.Bitshuffle(cname="lz4"))
        data.attrs.update(attrs)
        assert data.id.get_create_plist().get_filter(0)[0] == 32008
    spots = []
    for name in (hit.cxi.name, packed.name):
        stem = Path(name).stem
        result = dials("dials.import", [name, f"output.experiments={stem}.expt"], work,
                       dials_env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        result = dials("dials.find_spots", [f"{stem}.expt", "algorithm=peaknet",
                                            f"output.reflections={stem}.refl"], work, dials_env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        table = flex.reflection_table.from_file(str(work / f"{stem}.refl"))
        spots.append(sorted(table["xyzobs.px.value"]))
    assert len(spots[0]) > 20
    assert spots[0] == spots[1]


def test_nearly_perpendicular_real_metrology_becomes_an_orthonormal_frame():
    import numpy as np

    from peaknet_dxtbx.format_cxi import orthonormal_axes

    fast, slow = np.array([0.9999, 0.0012, 0.0]), np.array([-0.0007, 1.0001, 0.0])
    f_hat, s_hat = orthonormal_axes(fast, slow)
    assert abs(np.dot(f_hat, s_hat)) < 1e-15
    assert np.allclose([np.linalg.norm(f_hat), np.linalg.norm(s_hat)], 1.0)
    assert np.degrees(np.arccos(np.dot(s_hat, slow / np.linalg.norm(slow)))) < 0.1


def test_data_path_and_per_frame_energy_come_from_the_geometry(runs, dials_env, tmp_path):
    """A stack at the geometry's own ``data`` path is imported (not only /entry_1/data_1/data),
    and ``photon_energy = /path`` gives each frame its own beam."""
    import h5py
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_dxtbx.format_cxi import FormatCXIPeakNet
    from peaknet_xtal.formats.geometry import HC_EV_A

    hit, _ = runs
    geometry = read_geometry(hit.geom)
    moved = tmp_path / "moved.cxi"
    energies = np.array([9000.0, 9500.0])
    with h5py.File(hit.cxi, "r") as src, h5py.File(moved, "w") as out:
        frame = src["/entry_1/data_1/data"][0]
        out["/data/frames"] = np.stack([frame, frame])
        out["/beam/energy_eV"] = energies
    text = geometry.to_text(data="/data/frames", photon_energy="/beam/energy_eV", mask=None,
                            mask_good=None, mask_bad=None)
    (tmp_path / "moved.geom").write_text(text)
    assert FormatCXIPeakNet.understand(str(moved))
    experiments = ExperimentListFactory.from_filenames([str(moved)])
    assert experiments[0].imageset.get_format_class().__name__ == "FormatCXIPeakNet"
    assert len(experiments) == 2
    wavelengths = [e.beam.get_wavelength() for e in experiments]
    np.testing.assert_allclose(wavelengths, HC_EV_A / energies, rtol=1e-9)
    raw = experiments[0].imageset.get_raw_data(0)
    assert sum(float(flex_sum(p)) for p in raw) == pytest.approx(float(frame.sum()), rel=1e-6)


def flex_sum(values):
    from scitbx.array_family import flex

    return flex.sum(values)


def test_panel_gain_is_the_one_every_reader_resolves(runs, dials_env, tmp_path):
    """A geometry declaring ``adu_per_eV`` (no ``adu_per_photon``) gives each dxtbx panel that
    gain at the beam's energy (finding.settings.resolve_gain), as peaknet2cxi and the Python API
    read it: DIALS' dispersion and our plugin see the same shot noise as every other entry point."""
    import re
    import shutil

    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal.finding.settings import resolve_gain
    from peaknet_xtal.formats.geometry import HC_EV_A

    hit, _ = runs
    text = re.sub(r"(?m)^adu_per_photon\s*=.*$", "adu_per_eV = 0.004", hit.geom.read_text())
    assert "adu_per_photon" not in text
    shutil.copy(hit.cxi, tmp_path / "evgain.cxi")
    (tmp_path / "evgain.geom").write_text(text)
    experiments = ExperimentListFactory.from_filenames([str(tmp_path / "evgain.cxi")])
    wavelength = experiments[0].beam.get_wavelength()
    expected = 0.004 * HC_EV_A / wavelength
    gains = {round(panel.get_gain(), 9) for panel in experiments[0].detector}
    assert gains == {round(expected, 9)}
    geometry = read_geometry(tmp_path / "evgain.geom")
    assert resolve_gain(geometry=geometry, wavelength_A=wavelength) == pytest.approx(expected)


def test_a_mask_per_frame_masks_each_frame_its_own_pixels(runs, dials_env, tmp_path):
    """CrystFEL reads a mask stack (one mask per frame, as peaknet2cxi writes in its CXI copies);
    DIALS must see each frame's own bad pixels masked, and only those."""
    import h5py
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal.formats.cxi import DATA_PATH, MASK_PATH

    hit, _ = runs
    geometry = read_geometry(hit.geom)
    with h5py.File(hit.cxi, "r") as src:
        frame = src[DATA_PATH][0]
    stack = tmp_path / "perframe.cxi"
    masks = np.ones((2, *frame.shape), dtype=np.uint16)
    masks[0, 10:20, 30:40] = 0
    masks[1, 50:55, 5:25] = 0
    with h5py.File(stack, "w") as out:
        out[DATA_PATH] = np.stack([frame, frame])
        out[MASK_PATH] = masks
    (tmp_path / "perframe.geom").write_text(
        geometry.to_text(mask=MASK_PATH, mask_good="0x1", mask_bad=None))
    experiments = ExperimentListFactory.from_filenames([str(stack)])
    assert len(experiments) == 2  # stills: one experiment (and imageset) per frame
    for index, experiment in enumerate(experiments):
        good = [np.asarray(m.as_numpy_array(), dtype=bool)
                for m in experiment.imageset.get_mask(0)]
        expected = geometry.split_slab(masks[index].astype(bool))
        static = geometry.bad_pixel_masks()
        for g, e, st in zip(good, expected, static, strict=True):
            np.testing.assert_array_equal(g, e & st)
