"""Bad input through the dxtbx format (``FormatCXIPeakNet``): DIALS says what is wrong, in one
line naming the file (a ``Sorry``), and reads what peaknet2cxi and the Python API read.

A file carrying the project's geometry attribute is the project's: ``understand`` claims it, so a
broken one is reported rather than declined with DIALS' bare "Unable to handle the following
arguments" (and exit status 0).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.dials

DATA = "/entry_1/data_1/data"
MASK = "/entry_1/data_1/mask"
#: Two 32x64 panels of one 64x64 slab, the second turned by half a turn (as peaknet-sim writes).
GEOMETRY = """\
photon_energy = 12000
clen = 0.08 m
res = 10000
adu_per_photon = 1
data = {data}
{mask}
{extra}
upper/min_fs = 0
upper/max_fs = 63
upper/min_ss = 0
upper/max_ss = 31
upper/fs = +1.0x +0.0y
upper/ss = +0.0x +1.0y
upper/corner_x = -32.0
upper/corner_y = 2.0
lower/min_fs = 0
lower/max_fs = 63
lower/min_ss = 32
lower/max_ss = 63
lower/fs = -1.0x +0.0y
lower/ss = +0.0x -1.0y
lower/corner_x = 32.0
lower/corner_y = -2.0
"""


def make(folder: Path, data: np.ndarray | None, *, data_path: str = DATA,
         mask_line: str = "", extra: str = "", attribute: str | None = "data.geom",
         geometry: bool = True, mask: np.ndarray | None = None) -> Path:
    """``folder/data.cxi`` (frames at ``/entry_1/data_1/data``, the project's geometry attribute
    naming ``attribute``) and ``folder/data.geom`` beside it."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    cxi = folder / "data.cxi"
    with h5py.File(cxi, "w") as h5:
        if data is not None:
            h5[DATA] = data
        if mask is not None:
            h5[MASK] = mask
        if attribute is not None:
            h5.attrs["peaknet_geometry"] = attribute
    if geometry:
        (folder / "data.geom").write_text(GEOMETRY.format(data=data_path, mask=mask_line,
                                                          extra=extra))
    return cxi


def frames(n: int | None = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (64, 64) if n is None else (n, 64, 64)
    return rng.poisson(5.0, shape).astype(np.float32)


def dials_import(cxi: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "dials.import"
    return subprocess.run([str(exe), str(cxi)], cwd=cxi.parent, env=env, capture_output=True,
                          text=True, timeout=300)


def peaknet_frames(cxi: Path) -> list:
    """The frames as the Python API (and so peaknet2cxi) reads them."""
    from peaknet_xtal.formats.cxi import iter_cxi_frames
    from peaknet_xtal.formats.geometry import read_geometry

    return list(iter_cxi_frames(cxi, read_geometry(cxi.with_suffix(".geom"))))


@pytest.mark.parametrize("case, reason", [
    ("missing_dataset", "dataset /entry_1/data_1/nosuch: dataset not found"),
    ("data_1d", "image data has 1 dimensions (12288,)"),
    ("no_geometry", "its 'peaknet_geometry' attribute names gone.geom, which is not in its "
                    "folder, and there is no data.geom beside it"),
])
def test_dials_import_names_the_file_and_the_problem(case, reason, tmp_path, dials_env):
    """Each of these is an error in peaknet2cxi too (the same words: the library's own check)."""
    from peaknet_xtal.errors import PeakNetError

    if case == "missing_dataset":
        cxi = make(tmp_path, frames(), data_path="/entry_1/data_1/nosuch")
    elif case == "data_1d":
        cxi = make(tmp_path, frames(3).reshape(-1)[:12288])
    else:
        cxi = make(tmp_path, frames(), attribute="gone.geom", geometry=False)
    result = dials_import(cxi, dials_env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    sorry = [line for line in output.splitlines() if line.startswith("Sorry:")]
    assert len(sorry) == 1, output[-3000:]
    assert str(cxi) in sorry[0] and reason in sorry[0]
    assert "Unable to handle" not in output and "Traceback" not in output
    assert not (tmp_path / "imported.expt").exists()
    if case != "no_geometry":  # the Python API refuses it in the same words
        with pytest.raises(PeakNetError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            peaknet_frames(cxi)


def test_a_single_2d_frame_is_read_as_a_one_frame_stack(tmp_path, dials_env):
    """peaknet2cxi reads a file holding one 2-D frame; DIALS imports it as one still, with the
    same pixels."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    frame = frames(None)
    cxi = make(tmp_path, frame, mask=np.ones((64, 64), dtype=np.uint16),
               mask_line=f"mask = {MASK}\nmask_good = 0x1")
    result = dials_import(cxi, dials_env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "imported.expt").exists()
    assert "num images: 1" in result.stdout

    experiments = ExperimentListFactory.from_filenames([str(cxi)])
    assert len(experiments) == 1
    imageset = experiments[0].imageset
    assert imageset.get_format_class().__name__ == "FormatCXIPeakNet"
    (ours,) = peaknet_frames(cxi)
    raw = imageset.get_raw_data(0)
    assert len(raw) == len(ours.panels) == 2
    for dials_panel, panel in zip(raw, ours.panels, strict=True):
        np.testing.assert_array_equal(dials_panel.as_numpy_array(), panel)


def test_frames_larger_than_the_geometry_read_as_the_library_reads_them(tmp_path):
    """Frames larger than the geometry's slab: the library (peaknet2cxi, the Python API) reads
    the panels' pixels and ignores the rest, as CrystFEL does; so does DIALS."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    data = np.random.default_rng(1).poisson(5.0, (2, 70, 74)).astype(np.float32)
    cxi = make(tmp_path, data)
    experiments = ExperimentListFactory.from_filenames([str(cxi)])
    assert len(experiments) == 2
    for experiment, ours in zip(experiments, peaknet_frames(cxi), strict=True):
        raw = experiment.imageset.get_raw_data(0)
        for dials_panel, panel in zip(raw, ours.panels, strict=True):
            np.testing.assert_array_equal(dials_panel.as_numpy_array(), panel)


def test_a_missing_mask_dataset_warns_and_imports_as_peaknet2cxi_reads_it(tmp_path, dials_env):
    """A geometry naming a mask dataset the file lacks: peaknet2cxi (README) warns and reads the
    frames without it, CrystFEL would stop; DIALS does what peaknet2cxi does, and masks the
    pixels the Python API masks (here: the geometry's value flag only)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    data = frames()
    data[1, 5, 7] = -50.0  # below the geometry's flag_lessthan: masked by every entry point
    cxi = make(tmp_path, data, mask_line="mask = /nosuchmask\nmask_good = 0x1",
               extra="flag_lessthan = -10")
    result = dials_import(cxi, dials_env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Sorry" not in output
    warning = [line for line in output.splitlines() if "/nosuchmask" in line]
    assert warning and str(cxi) in warning[0] and "no mask dataset" in warning[0], output[-3000:]
    assert (tmp_path / "imported.expt").exists()

    experiments = ExperimentListFactory.from_filenames([str(cxi)])
    assert len(experiments) == 3
    for experiment, ours in zip(experiments, peaknet_frames(cxi), strict=True):
        dials_mask = [m.as_numpy_array() for m in experiment.imageset.get_mask(0)]
        expected = ours.masks or [np.ones(p.shape, dtype=bool) for p in ours.panels]
        for got, want in zip(dials_mask, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert sum(int((~m.as_numpy_array()).sum())
               for m in experiments[1].imageset.get_mask(0)) == 1


def test_a_bitless_mask_masks_nothing_in_dials_as_in_the_library(tmp_path, dials_env):
    """A geometry's mask with neither mask_good nor mask_bad marks no pixel bad (CrystFEL; the
    library warns): DIALS must not read it as 'nonzero is good' and mask the zeros."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    mask = np.ones((64, 64), dtype=np.uint16)
    mask[3:6, 3:6] = 0
    cxi = make(tmp_path, frames(2), mask=mask, mask_line=f"mask = {MASK}")
    experiments = ExperimentListFactory.from_filenames([str(cxi)])
    for experiment, ours in zip(experiments, peaknet_frames(cxi), strict=True):
        dials_mask = [m.as_numpy_array() for m in experiment.imageset.get_mask(0)]
        expected = ours.masks or [np.ones(p.shape, dtype=bool) for p in ours.panels]
        for got, want in zip(dials_mask, expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_an_hdf5_file_not_of_ours_is_still_declined(tmp_path):
    """Without the project's attribute and without image data, the file is some other format's:
    ``understand`` declines it (cheaply, without raising)."""
    from peaknet_dxtbx.format_cxi import FormatCXIPeakNet

    cxi = make(tmp_path, None, attribute=None)
    assert FormatCXIPeakNet.understand(str(cxi)) is False
    other = make(tmp_path / "other", frames(), attribute=None, geometry=False)
    assert FormatCXIPeakNet.understand(str(other)) is False
    ours = make(tmp_path / "ours", None, attribute="data.geom")
    assert FormatCXIPeakNet.understand(str(ours)) is True
