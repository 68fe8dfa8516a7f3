"""``peaknet2cxi --dials`` on images DIALS reads natively: what it writes is what ``dials.import``
+ ``dials.find_spots`` write for the same files.

A user trial found every rotation series read without ``-g`` refused ("DIALS sees 1 images for
3 frames"): DIALS imports a series as one sequence experiment of as many images as files, and
the export counted experiments against frames.  A series' spots now lie on the image DIALS
numbers them at (z from the series' first image number), checked here against a real
``dials.find_spots algorithm=peaknet`` run on the same tiny files.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from peaknet_xtal.cli.peaknet2cxi import main, run, write_dials_output
from peaknet_xtal.errors import PeakNetError

pytestmark = pytest.mark.dials

SIZE = 64
#: one bright 3 x 3 spot an image, (ss, fs) of its centre pixel, far apart from image to image
#: (DIALS joins spots that touch on adjacent images of a sequence)
SPOTS = [(12, 15), (30, 44), (50, 22)]


def write_cbf(path: Path, spot: tuple[int, int], image: int | None,
              width: float = 0.5) -> Path:
    """A one-panel miniCBF with one bright spot: image ``image`` of a rotation of ``width``
    degrees an image (start angle from its number; 0: a grid scan's images), or a still (no
    goniometer, no scan) for None."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory, GoniometerFactory, Scan
    from scitbx.array_family import flex

    detector = DetectorFactory.simple("PAD", 100.0, (SIZE * 0.086, SIZE * 0.086), "+x", "-y",
                                      (0.172, 0.172), (SIZE, SIZE), (0, 1e6))
    pixels = np.random.default_rng(zlib.crc32(path.name.encode())).poisson(5, (SIZE, SIZE))
    ss, fs = spot
    pixels[ss - 1:ss + 2, fs - 1:fs + 2] += 400
    pixels[ss, fs] += 400
    goniometer = scan = None
    if image is not None:
        goniometer = GoniometerFactory.known_axis((1.0, 0.0, 0.0))
        scan = Scan((image, image), (image * width, width), flex.double([1.0]),
                    flex.double([float(image)]), 0)
    FormatCBFMini.as_file(detector, BeamFactory.simple(1.0), goniometer, scan,
                          flex.int(pixels.astype(np.int32)), str(path))
    return path


def rotation_series(folder: Path, first: int) -> list[Path]:
    """Three images of one rotation series, numbered from ``first``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_cbf(folder / f"rot_{first + k:04d}.cbf", spot, first + k)
            for k, spot in enumerate(SPOTS)]


def spot_predictor(panels, masks):
    """Probability 1 on each image's bright 3 x 3 spot (found by its pixels), nothing else."""
    probs = []
    for panel in panels:
        prob = np.zeros(np.shape(panel), np.float32)
        ss, fs = np.unravel_index(int(np.argmax(panel)), np.shape(panel))
        prob[ss - 1:ss + 2, fs - 1:fs + 2] = 1.0
        probs.append(prob)
    return probs


def read_dials(expt: Path | str, refl: Path | str):
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    experiments = ExperimentList.from_file(str(expt), check_format=False)
    table = flex.reflection_table.from_file(str(refl))
    # DIALS' own check that the table belongs to these experiments (dials.index makes it)
    assert table.are_experiment_identifiers_consistent(experiments)
    return experiments, table


def spots_of(table) -> list[tuple[int, float, float, float]]:
    """(experiment id, x, y, z) of every spot, sorted by z."""
    ids = table["id"].as_numpy_array()
    xyz = np.array(list(table["xyzobs.px.value"])).reshape(-1, 3)
    return sorted(((int(i), *map(float, v)) for i, v in zip(ids, xyz, strict=True)),
                  key=lambda s: s[3])


def dials_command(name: str, args: list[str], cwd: Path, env: dict[str, str]) -> None:
    exe = Path(sys.executable).with_name(name)
    done = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def export_with_dials(files: list[Path], outdir: Path, capsys):
    """``peaknet2cxi FILES --dials`` with the real default model: (its stdout, the experiments
    and the strong spots it wrote)."""
    code = main([*map(str, files), "-o", str(outdir), "--dials", "--device", "cpu",
                 "--no-progress", "--min-peaks", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return (out, *read_dials(outdir / "dials" / "imported.expt",
                             outdir / "dials" / "strong.refl"))


def dials_finds_the_same(files: list[Path], work: Path, env: dict[str, str],
                         ours: list[tuple[int, float, float, float]]):
    """``dials.import`` + ``dials.find_spots algorithm=peaknet`` on ``files`` give ``ours``:
    each spot on the same experiment and image, at the same pixel; DIALS' experiments."""
    work.mkdir()
    dials_command("dials.import", [*map(str, files)], work, env)
    dials_command("dials.find_spots", ["imported.expt", "spotfinder.threshold.algorithm=peaknet",
                                       "spotfinder.mp.nproc=1"], work, env)
    experiments, theirs = read_dials(work / "imported.expt", work / "strong.refl")
    found = spots_of(theirs)
    assert len(found) == len(ours)
    for (i, x, y, z), (j, u, v, w) in zip(ours, found, strict=True):
        assert (i, z) == (j, w) and (x, y) == pytest.approx((u, v), abs=0.5)  # the same pixel
    return experiments


def test_a_rotation_series_is_one_sequence_with_each_spot_on_its_image_as_dials_finds_it(
        tmp_path, capsys, dials_env):
    """Images 4-6 of a series: one sequence experiment (images 4 to 6) and each image's spot at
    DIALS' z for it (3.5, 4.5, 5.5), as dials.import + dials.find_spots algorithm=peaknet give
    them on the same files; the printed dials.index command is the one for a rotation series
    (the stills options would index each image alone)."""
    files = rotation_series(tmp_path / "images", first=4)
    outdir = tmp_path / "out"
    out, experiments, table = export_with_dials(files, outdir, capsys)
    (experiment,) = experiments
    assert experiment.scan.get_image_range() == (4, 6)
    assert [Path(experiment.imageset.get_path(i)) for i in range(3)] == files
    ours = spots_of(table)
    assert [(i, z) for i, _, _, z in ours] == [(0, 3.5), (0, 4.5), (0, 5.5)]
    for (_, x, y, _), (ss, fs) in zip(ours, SPOTS, strict=True):  # DIALS: pixel corner origin
        assert (x, y) == pytest.approx((fs + 0.5, ss + 0.5), abs=0.1)
    (line,) = [s for s in out.splitlines() if s.startswith("next (DIALS): ")]
    command = shlex.split(line.removeprefix("next (DIALS): "))
    assert command[:3] == ["dials.index", str(outdir / "dials" / "imported.expt"),
                           str(outdir / "dials" / "strong.refl")]
    assert not [w for w in command if w.startswith(("joint_indexing", "stills."))]
    theirs = dials_finds_the_same(files, tmp_path / "dials", dials_env, ours)
    assert theirs[0].scan.get_image_range() == (4, 6)


def test_a_series_across_cxi_files_and_a_still_are_imported_as_dials_imports_them(tmp_path,
                                                                                  dials_env):
    """A series written across two CXI files is still one sequence (each CXI file imported
    alone gave one sequence each, numbered apart from the other), and a still of the same
    detector given with it is its own experiment: every frame's spots on its own image of its
    own experiment, the identifiers DIALS pairs them by consistent; the printed command is the
    stills one (the list is not one of rotation series only)."""
    files = rotation_series(tmp_path / "images", first=1)
    still = write_cbf(tmp_path / "images" / "still_0001.cbf", (40, 40), None)
    summary = run({"inputs": [*map(str, files), str(still)], "output": str(tmp_path / "out"),
                   "predictor": spot_predictor, "progress": False, "min_peaks": 1,
                   "frames_per_file": 2, "dials": True})
    assert len(summary["cxi_files"]) == 2
    experiments, table = read_dials(summary["dials"]["experiments"],
                                    summary["dials"]["reflections"])
    assert len(experiments) == 2
    by_file = {Path(e.imageset.get_path(0)).name: i for i, e in enumerate(experiments)}
    series, alone = by_file["rot_0001.cbf"], by_file["still_0001.cbf"]
    assert len(experiments[series].imageset) == 3 and len(experiments[alone].imageset) == 1
    spots = spots_of(table)
    assert [(i, z) for i, _, _, z in spots if i == series] == [(series, 0.5), (series, 1.5),
                                                              (series, 2.5)]
    assert [(x, y, z) for i, x, y, z in spots if i == alone] == [pytest.approx((40.5, 40.5, 0.5),
                                                                               abs=0.1)]
    assert summary["dials"]["images"] == 4
    assert "joint_indexing=False" in shlex.split(summary["dials"]["command"])


def test_an_image_dials_no_longer_reads_is_one_error_naming_it(tmp_path, dials_env):
    """An image file damaged (DIALS skips it on import) or gone since its peaks were found
    cannot be paired with its spots: one error naming that file, and nothing written."""
    files = rotation_series(tmp_path / "images", first=1)
    summary = run({"inputs": [*map(str, files)], "output": str(tmp_path / "out"),
                   "predictor": spot_predictor, "progress": False, "min_peaks": 1})
    cxi = [Path(p) for p in summary["cxi_files"]]
    folder = tmp_path / "out" / "dials"
    files[1].write_bytes(b"not an image any more")
    with pytest.raises(PeakNetError, match=f"^{files[1]}: not among the images DIALS imports"):
        write_dials_output(cxi, folder)
    files[1].unlink()
    with pytest.raises(PeakNetError, match=f"^{files[1]}: cannot be read again"):
        write_dials_output(cxi, folder)
    assert not folder.exists()


def test_grid_scan_images_are_an_experiment_each_as_dials_imports_them(tmp_path, capsys,
                                                                       dials_env):
    """Images of no oscillation (a grid scan, as the real Pilatus 6M thaumatin frames): DIALS
    imports them as one imageset shared by an experiment an image, each with a scan of its own
    image.  --dials placed every image on the first experiment and named the others alike, and
    failed: 'Experiment with identifier ... already in ExperimentList' (exit 1, nothing of the
    DIALS output or the summary written).  Each spot is now on its image's experiment, as
    dials.import + dials.find_spots algorithm=peaknet give them on the same files."""
    folder = tmp_path / "images"
    folder.mkdir()
    files = [write_cbf(folder / f"grid_{k + 1:04d}.cbf", spot, k + 1, width=0.0)
             for k, spot in enumerate(SPOTS)]
    out, experiments, table = export_with_dials(files, tmp_path / "out", capsys)
    assert len(experiments) == 3
    ours = spots_of(table)
    assert [(i, z) for i, _, _, z in ours] == [(0, 0.5), (1, 1.5), (2, 2.5)]
    (line,) = [s for s in out.splitlines() if s.startswith("next (DIALS): ")]
    assert "stills.indexer=stills" in shlex.split(line)  # DIALS' sequences indexer fails here
    assert len(dials_finds_the_same(files, tmp_path / "dials", dials_env, ours)) == 3
