"""DIALS reflection tables and experiment lists, through DIALS itself (real dials.* commands)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.errors import FormatError
from peaknet_xtal.types import peaks_from_columns

pytestmark = pytest.mark.dials

STILLS = "dials_stills_results_cxi78513"
CSPAD = "cspad_thermolysin_stills/idx-20130301060858401.cbf"
INDEX_ARGS = ["stills.indexer=sequences", "indexing.method=fft1d",
              "indexing.known_symmetry.space_group=P6122",
              "indexing.known_symmetry.unit_cell=92.9,92.9,130.4,90,90,120"]


def dials(command: str, *args: str, cwd: Path, env: dict[str, str]) -> str:
    exe = Path(sys.executable).parent / command
    run = subprocess.run([str(exe if exe.exists() else shutil.which(command)), *args], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run.stdout


def test_shared_stills_reflections_as_numpy(real_data, dials_env):
    from peaknet_xtal.formats.dials_tables import read_reflections, summarize_reflections

    cols = read_reflections(real_data / STILLS / "stills.refl")
    assert cols["xyzobs.px.value"].shape == (502, 3) and cols["xyzcal.px"].shape == (502, 3)
    assert cols["miller_index"].shape == (502, 3) and cols["miller_index"].dtype.kind == "i"
    assert sorted(np.unique(cols["id"])) == [0, 1, 2]
    assert cols["panel"].max() < 64
    # observed and predicted centroids of indexed spots agree to a few pixels
    dist = np.linalg.norm(cols["xyzobs.px.value"][:, :2] - cols["xyzcal.px"][:, :2], axis=1)
    assert np.median(dist) < 2.0
    summary = summarize_reflections(real_data / STILLS / "stills.refl")
    assert summary["rows"] == 502 and summary["experiments"] == 3 and summary["indexed"] == 502
    assert sum(summary["per_experiment"].values()) == 502


def test_shared_stills_experiments(real_data, dials_env):
    from peaknet_xtal.formats.dials_tables import read_experiments, summarize_experiments

    experiments = read_experiments(real_data / STILLS / "stills.expt")
    assert len(experiments) == 3 and all(len(e.detector) == 64 for e in experiments)
    summary = summarize_experiments(real_data / STILLS / "stills.expt")
    assert summary["panels"] == [64, 64, 64]
    assert {c["space_group"] for c in summary["crystals"]} == {"P 61 2 2"}
    assert all(92 < c["unit_cell"][0] < 94 for c in summary["crystals"])


def test_imported_experiments_are_summarised_as_not_indexed(tmp_path, real_data, dials_env):
    """dials.import writes no crystal models (``crystals()`` is ``[None]``): the summary crashed
    on it with an AttributeError; it gives the images, detector and beam, not indexed."""
    from peaknet_xtal.formats.dials_tables import summarize_experiments

    dials("dials.import", str(real_data / CSPAD), cwd=tmp_path, env=dials_env)
    summary = summarize_experiments(tmp_path / "imported.expt")
    assert summary["status"] == "not indexed" and summary["indexed_experiments"] == 0
    assert summary["crystals"] == [] and summary["experiments"] == 1
    assert summary["images"] == 1 and summary["image_files"] == 1
    assert summary["panels"] == [64] and summary["wavelength_A"][0] == pytest.approx(1.2726, 1e-3)
    indexed = summarize_experiments(real_data / STILLS / "stills.expt")
    assert indexed["status"] == "indexed" and indexed["indexed_experiments"] == 3
    assert indexed["images"] == 3


def test_bad_tables_raise_format_error(tmp_path, dials_env):
    from peaknet_xtal.formats.dials_tables import read_experiments, read_reflections

    junk = tmp_path / "junk.refl"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FormatError, match="not a readable DIALS reflection table") as err:
        read_reflections(junk)
    assert err.value.path == str(junk)
    bad = tmp_path / "bad.expt"
    bad.write_text("{ not json")
    with pytest.raises(FormatError, match="bad.expt"):
        read_experiments(bad)
    with pytest.raises(FormatError, match="file not found"):
        read_reflections(tmp_path / "none.refl")


def test_tables_without_dials_are_refused_naming_the_file(tmp_path, monkeypatch):
    """A Python without DIALS: reading an .expt or a .refl, or building a strong-spot table,
    says what needs DIALS (the file, where there is one) and what to do, an ImportError."""
    from peaknet_test_support import hide_dials

    from peaknet_xtal.formats.dials_tables import (
        load_reflection_table,
        read_experiments,
        strong_reflection_table,
    )

    expt, refl = tmp_path / "a.expt", tmp_path / "a.refl"
    expt.write_text("{}")
    refl.write_bytes(b"")
    hide_dials(monkeypatch)
    with pytest.raises(ImportError, match=rf"^reading {expt} \(a DIALS experiment list\) "
                       r"needs DIALS, which this Python cannot import \(No module named "
                       r"'dxtbx'\)"):
        read_experiments(expt)
    with pytest.raises(ImportError, match=rf"^reading {refl} \(a DIALS reflection table\) "
                       r"needs DIALS, .*\(No module named 'dials'\)"):
        load_reflection_table(refl)
    with pytest.raises(ImportError, match=r"^a DIALS strong-spot table needs DIALS"):
        strong_reflection_table([peaks_from_columns()])

@pytest.mark.slow
def test_written_strong_spots_index_with_dials(tmp_path, real_data, dials_env):
    """dials.find_spots -> our peak table -> our .refl -> dials.index indexes the CSPAD still."""
    from peaknet_xtal.formats.dials_tables import (
        read_reflections,
        reflections_to_peaks,
        write_strong_refl,
    )

    dials("dials.import", str(real_data / CSPAD), cwd=tmp_path, env=dials_env)
    dials("dials.find_spots", "imported.expt", "spotfinder.threshold.dispersion.gain=25",
          "spotfinder.threshold.dispersion.global_threshold=100",
          "spotfinder.filter.min_spot_size=2", cwd=tmp_path, env=dials_env)
    peaks = reflections_to_peaks(tmp_path / "strong.refl")[0]
    assert len(peaks) > 100 and peaks["fs"].min() >= -0.5  # 0-based centre convention
    n = write_strong_refl(tmp_path / "ours.refl", [peaks], experiments=tmp_path / "imported.expt")
    assert n == len(peaks)
    ours, theirs = (read_reflections(tmp_path / name) for name in ("ours.refl", "strong.refl"))
    np.testing.assert_allclose(ours["xyzobs.px.value"], theirs["xyzobs.px.value"])
    assert (ours["bbox"][:, 1] > ours["bbox"][:, 0]).all()
    out = dials("dials.index", "imported.expt", "ours.refl", *INDEX_ARGS,
                cwd=tmp_path, env=dials_env)
    indexed = read_reflections(tmp_path / "indexed.refl")
    assert np.count_nonzero(np.any(indexed["miller_index"] != 0, axis=1)) > 0.8 * n, out[-1500:]


def test_sequence_layout_puts_images_along_z(tmp_path, dials_env):
    from peaknet_xtal.formats.dials_tables import read_reflections, write_strong_refl

    tables = [peaks_from_columns(panel=[0], fs=[3.0], ss=[4.0], npix=[9]),
              peaks_from_columns(panel=[1, 2], fs=[0.0, 5.0], ss=[1.0, 2.0])]
    write_strong_refl(tmp_path / "seq.refl", tables, sequence=True)
    cols = read_reflections(tmp_path / "seq.refl")
    np.testing.assert_allclose(cols["xyzobs.px.value"],
                               [[3.5, 4.5, 0.5], [0.5, 1.5, 1.5], [5.5, 2.5, 1.5]])
    assert list(cols["id"]) == [0, 0, 0] and list(cols["panel"]) == [0, 1, 2]
    assert list(cols["bbox"][0]) == [1, 6, 2, 7, 0, 1]


def test_one_builder_uses_component_boxes_when_known(dials_env):
    """``strong_reflection_table`` is the one builder (PeakFinder, FrameResult, .refl files):
    the components' own boxes when the finder gives them, an npix-sized square otherwise, and
    the same variance either way."""
    from peaknet_xtal.formats.dials_tables import strong_reflection_table
    from peaknet_xtal.types import Frame, FrameResult

    peaks = peaks_from_columns(panel=[0, 3], fs=[3.0, 10.2], ss=[4.0, 7.9], npix=[9, 4],
                               intensity=[100.0, -2.0], background_sigma=[2.0, 1.0],
                               background=[5.0, 5.0])
    boxed = strong_reflection_table([peaks], boxes=[np.array([[2, 5, 3, 6], [9, 12, 7, 9]])],
                                    z0=4, experiment_ids=[2])
    assert [tuple(b) for b in boxed["bbox"]] == [(2, 5, 3, 6, 4, 5), (9, 12, 7, 9, 4, 5)]
    assert list(boxed["id"]) == [2, 2] and list(boxed["panel"]) == [0, 3]
    np.testing.assert_allclose(list(boxed["intensity.sum.variance"]), [100 + 9 * 4, 0 + 4 * 1])
    np.testing.assert_allclose(list(boxed["background.mean"]), [5.0, 5.0])
    result = FrameResult(Frame(panels=[]), peaks)
    square = result.reflection_table(z=4, experiment_id=2)
    assert list(square["bbox"][0]) == [1, 6, 2, 7, 4, 5]  # from npix, as .refl files get
    assert list(square["intensity.sum.variance"]) == list(boxed["intensity.sum.variance"])


def test_a_measured_snr_gives_the_variance_of_the_summed_footprint():
    """The finder's SNR divides the footprint's sum by its full noise (every summed pixel's
    background, correlated, the background's error, the shot noise): the table's variance is
    (I / SNR)^2 there; the pixel-count formula is for tables without an SNR."""
    from peaknet_xtal.formats.dials_tables import strong_reflection_table
    from peaknet_xtal.types import peaks_from_columns

    peaks = peaks_from_columns(panel=[0, 0], fs=[5.0, 9.0], ss=[5.0, 9.0],
                               intensity=[400.0, 100.0], npix=[1, 4], snr=[8.0, np.nan],
                               background_sigma=[2.0, 2.0])
    table = strong_reflection_table([peaks])
    np.testing.assert_allclose(list(table["intensity.sum.variance"]),
                               [(400.0 / 8.0) ** 2, 100.0 + 4 * 4.0])
