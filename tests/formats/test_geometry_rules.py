"""CrystFEL 0.10-0.12 acceptance rules (``geometry_rules``), and every ``.geom`` the project
writes held to them, together with the HDF5 files it will be read with.

Each rule has a geometry that breaks it (the checker must say so) beside one that keeps it;
then the outputs of ``peaknet-sim``, ``peaknet2cxi`` (simulated CXI stacks and the real CSPAD
CBFs), the streams' embedded geometries and all real geometries written back must pass.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal.cli.peaknet2cxi import run
from peaknet_xtal.formats.geometry import read_geometry
from peaknet_xtal.formats.geometry_rules import crystfel_problems, errors_only
from peaknet_xtal.formats.stream import read_stream
from peaknet_xtal.sim import SimConfig
from peaknet_xtal.sim.run import simulate_run

GOOD = """\
photon_energy = 9500 eV
clen = 0.1 m
adu_per_photon = 1
res = 10000
data = /entry_1/data_1/data
dim0 = %
dim1 = ss
dim2 = fs
mask = /entry_1/data_1/mask
mask_good = 0x1
mask_bad = 0x0
peak_list = /entry_1/result_1
peak_list_type = cxi

a/min_fs = 0
a/max_fs = 9
a/min_ss = 0
a/max_ss = 4
a/fs = x
a/ss = y
a/corner_x = -5
a/corner_y = -5

b/min_fs = 0
b/max_fs = 9
b/min_ss = 5
b/max_ss = 9
b/fs = x
b/ss = y
b/corner_x = -5
b/corner_y = 1

bad1/min_fs = 2
bad1/max_fs = 3
bad1/min_ss = 6
bad1/max_ss = 7
bad1/panel = b
"""

BROKEN = [  # (change to GOOD, words of the problem)
    (lambda t: t + "res = 5000\n", "no effect"),
    (lambda t: t.replace("clen = 0.1 m\n", "") + "clen = 0.1 m\n", "clen comes after"),
    (lambda t: t + "a/clen = 0.1\n", "top-level property"),
    (lambda t: t.replace("clen = 0.1 m\n", ""), "no camera length"),
    (lambda t: "wavelength = 1.3 A\n" + t, "more than one wavelength"),
    (lambda t: t.replace("photon_energy = 9500 eV", "wavelength = 1.3e-10"), "unit must be"),
    (lambda t: t.replace("photon_energy = 9500 eV\n", ""), "no wavelength"),
    (lambda t: t.replace("adu_per_photon = 1\n", ""), "needs adu_per_eV or adu_per_photon"),
    (lambda t: t.replace("bad1/panel = b\n", ""), "panel not specified"),
    (lambda t: t.replace("bad1/max_ss = 7", "bad1/max_ss = 12"), "outside the bounds"),
    (lambda t: t.replace("bad1/panel = b", "bad1/panel = c"), "no such panel"),
    (lambda t: t.replace("mask = /entry_1/data_1/mask", "mask_file = m.h5"),
     "file but no data location"),
    (lambda t: t.replace("mask = /entry_1/data_1/mask\n", ""), "bits without a mask"),
    (lambda t: t.replace("dim1 = ss\ndim2 = fs", "dim1 = fs\ndim2 = ss"), "fast scan dimension"),
    (lambda t: t.replace("a/fs = x", "a/fs = sideways"), "no valid fs direction"),
    (lambda t: t + "rigid_group_q = a,c\n", "rigid_group_q: panel 'c' not found"),
    (lambda t: t + "rigid_group_q = a\nrigid_group_collection_r = q,z\n",
     "rigid group 'z' not found"),
    (lambda t: t.replace("peak_list_type = cxi", "peak_list_type = csv"), "peak_list_type"),
    (lambda t: t.replace("a/fs = x", "a/fs = +1.0x +1.2e-05y"), "no valid fs direction"),
    (lambda t: t.replace("a/min_fs = 0", "group_ab = a,b\na/min_fs = 0"), "unknown panel group"),
    (lambda t: t + "group_ab = a,b\ngroup_all = ab,c\n", "unknown panel group 'c'"),
    (lambda t: t + "group_ab = a,b\ngroup_ab = a\n", "duplicate panel group"),
    (lambda t: t + "group_ab = a,a\n", "duplicate member"),
]


def test_a_geometry_keeping_every_rule_is_clean() -> None:
    assert crystfel_problems(GOOD) == []
    assert crystfel_problems(GOOD + "group_ab = a,b\ngroup_all = ab\n") == []  # 0.11+ hierarchy
    assert crystfel_problems(GOOD.replace("a/fs = x", "a/fs = +0.999999x -0.000012y")) == []


@pytest.mark.parametrize(("change", "words"), BROKEN)
def test_each_rule_is_enforced(change, words) -> None:
    problems = errors_only(crystfel_problems(change(GOOD)))
    assert any(words in p for p in problems), problems


def test_unknown_keys_are_warnings_as_crystfel_says_unrecognised_field_and_goes_on() -> None:
    for extra in ("a/pixel_size = 3\n", "bad1/colour = red\n"):
        problems = crystfel_problems(GOOD + extra)
        assert problems and not errors_only(problems), problems
        assert "unrecognised" in problems[0]
    # at top level it still counts as a panel default: after the last panel it has no effect
    problems = errors_only(crystfel_problems(GOOD + "pixel_size = 3\n"))
    assert any("have no effect" in p for p in problems), problems
    assert not errors_only(crystfel_problems(GOOD + "rigid_group_q = a,b\n"))


def test_max_adu_is_a_warning_only() -> None:
    problems = crystfel_problems(GOOD.replace("res = 10000", "res = 10000\nmax_adu = 9000"))
    assert problems and not errors_only(problems) and "max_adu" in problems[0]


def _stack(path: Path, *, mask: bool = True, energy: bool = True, peaks: bool = True) -> Path:
    with h5py.File(path, "w") as h5:
        h5["/entry_1/data_1/data"] = np.zeros((3, 10, 10), np.float32)
        if mask:
            h5["/entry_1/data_1/mask"] = np.ones((3, 10, 10), np.uint8)
        if energy:
            h5["/entry_1/peaknet/photon_energy_eV"] = np.full(3, 9500.0)
        if peaks:
            for name in ("nPeaks", "peakXPosRaw", "peakYPosRaw", "peakTotalIntensity"):
                h5[f"/entry_1/result_1/{name}"] = np.zeros((3, 4) if name != "nPeaks" else 3)
    return path


def test_every_named_dataset_must_be_in_the_file(tmp_path) -> None:
    text = GOOD.replace("photon_energy = 9500 eV", "photon_energy = /entry_1/peaknet/"
                        "photon_energy_eV")
    assert crystfel_problems(text, [_stack(tmp_path / "ok.cxi")]) == []
    for kwargs, words in (({"mask": False}, "no mask dataset /entry_1/data_1/mask"),
                          ({"energy": False}, "no dataset /entry_1/peaknet/photon_energy_eV"),
                          ({"peaks": False}, "no /entry_1/result_1/nPeaks")):
        path = _stack(tmp_path / f"{words.split()[-1].strip('/').replace('/', '_')}.cxi",
                      **kwargs)
        assert any(words in p for p in crystfel_problems(text, [path]))
    small = tmp_path / "small.cxi"
    with h5py.File(small, "w") as h5:
        h5["/entry_1/data_1/data"] = np.zeros((3, 8, 10), np.float32)
    assert any("too small" in p for p in crystfel_problems(text, [small]))


def test_real_geometries_written_back_lose_no_rule(geometry_files) -> None:
    """Written back, a real geometry has no problem it did not have (only information it lacks,
    such as a wavelength), and every ordering problem of the original is gone."""
    fixed = 0
    for path in geometry_files:
        before = set(errors_only(crystfel_problems(path.read_text())))
        after = set(errors_only(crystfel_problems(read_geometry(path).to_text())))
        assert after <= before, (path.name, after - before)
        missing_info = ("no wavelength", "no camera length", "needs adu_per",
                        "bits without a mask")  # the input lacks these; nothing to fix
        assert all(any(w in p for w in missing_info) for p in after), (path.name, after)
        fixed += len(before - after)
    assert fixed > 0  # some real files break the 0.10+ rules (globals after panels, ...)


# --------------------------------------------------------------------------------------------
# every .geom the project writes


def _no_peaks(panels, masks):
    return [np.zeros(p.shape, np.float32) for p in panels]


@pytest.fixture(scope="module")
def sim_runs(real_data, tmp_path_factory):
    out = {}
    for name in ("om_lcls_mfx_epix10k2M.geom", "crystfel_doc_cspad-cxiformat.geom"):
        geometry = read_geometry(real_data / "crystfel_geometry" / name)
        root = tmp_path_factory.mktemp(name.split(".")[0])
        out[name] = simulate_run(geometry, 2, 3, root, SimConfig(), progress=False)
    return out


def test_peaknet_sim_writes_geometries_crystfel_accepts(sim_runs) -> None:
    for paths in sim_runs.values():
        assert crystfel_problems(paths.geom.read_text(), [paths.cxi]) == []
        embedded = read_stream(paths.stream).header.geometry_text
        assert crystfel_problems(embedded) == []


def test_peaknet2cxi_on_simulated_runs_writes_one_accepted_geometry(sim_runs, tmp_path) -> None:
    for k, paths in enumerate(sim_runs.values()):
        outdir = tmp_path / f"out{k}"
        summary = run({"inputs": [str(paths.cxi)], "geometry": str(paths.geom),
                       "output": str(outdir), "predictor": _no_peaks, "progress": False,
                       "stream": str(tmp_path / f"p{k}.stream"), "frames_per_file": 1})
        assert [p.name for p in outdir.glob("*.geom")] == ["peaknet.geom"]
        files = summary["cxi_files"]
        assert len(files) == 2
        assert crystfel_problems((outdir / "peaknet.geom").read_text(), files) == []
        embedded = read_stream(tmp_path / f"p{k}.stream").header.geometry_text
        assert errors_only(crystfel_problems(embedded)) == []
        with h5py.File(files[1], "r") as h5:  # per-frame energy, as the geometry says
            energy = h5["/entry_1/peaknet/photon_energy_eV"][()]
        assert energy == pytest.approx(read_geometry(paths.geom).photon_energy_eV)


@pytest.mark.dials
def test_peaknet2cxi_on_the_real_cspad_cbfs_writes_an_accepted_geometry(real_data, dials_env,
                                                                       tmp_path) -> None:
    cbfs = sorted((real_data / "cspad_thermolysin_stills").glob("*.cbf"))
    summary = run({"inputs": [str(p) for p in cbfs], "output": str(tmp_path / "out"),
                   "predictor": _no_peaks, "progress": False, "min_peaks": 0})
    text = (tmp_path / "out" / "peaknet.geom").read_text()
    assert crystfel_problems(text, summary["cxi_files"]) == []  # no max_adu placeholder either
    assert "max_adu" not in text
