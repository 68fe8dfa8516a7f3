"""PeakFinder on numpy, flex and dxtbx input; DIALS reflection tables; the cctbx example script."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from peaknet_xtal.finding import PeakFinder
from peaknet_xtal.finding.api import to_panels

ROOT = Path(__file__).resolve().parents[2]
CSPAD = "cspad_thermolysin_stills/idx-20130301060858401.cbf"


def bright_pixels(panels, masks):
    """Stand-in segmenter (plumbing tests, independent of model quality): pixels above 150."""
    return [(np.asarray(p) > 150).astype(np.float32) for p in panels]


def same(a, b):
    """Peak tables equal column by column (NaN equals NaN)."""
    return len(a) == len(b) and all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f")
                                    for k in a.dtype.names)


def spots_image():
    image = np.full((60, 80), 10.0, np.float32)
    image[20, 30] = image[20, 31] = 400.0
    image[45, 70] = 900.0
    return image


def test_find_accepts_arrays_lists_and_stacks_alike():
    finder = PeakFinder(predictor=bright_pixels, min_peaks=2, max_peaks=10)
    image = spots_image()
    table = finder.find(image)
    assert table[["fs", "ss"]].tolist() == [(30.5, 20.0), (70.0, 45.0)]
    assert table["intensity"].tolist() == [780.0, 890.0] and finder.is_hit(table)
    stacked = finder.find(np.stack([np.zeros_like(image), image]))
    listed = finder.find([np.zeros_like(image), image])
    assert same(stacked, listed) and set(listed["panel"].tolist()) == {1}
    mask = np.ones(image.shape, bool)
    mask[45, 70] = False
    assert len(finder.find(image, mask=mask)) == 1


def test_find_reflections_without_dials_says_so_before_the_image_is_searched(monkeypatch):
    """In a Python without DIALS, find_reflections searched the image (the model's work, and
    the image counted towards the run) and then failed on 'No module named dials'.  It is now
    an ImportError saying what needs DIALS and what to use instead, before the search; find
    works on."""
    from peaknet_test_support import hide_dials

    searched = []

    def counting(panels, masks):
        searched.append(len(panels))
        return bright_pixels(panels, masks)

    finder = PeakFinder(predictor=counting)
    hide_dials(monkeypatch)
    with pytest.raises(ImportError, match=r"^PeakFinder\.find_reflections \(a DIALS reflection "
                       r"table\) needs DIALS, which this Python cannot import \(No module "
                       r"named 'dials'\).*; or use find, which gives a numpy peak table$"):
        finder.find_reflections(spots_image())
    assert searched == []
    assert len(finder.find(spots_image())) == 2 and searched == [1]


@pytest.mark.dials
def test_find_reflections_with_a_dials_that_fails_to_load_says_so_before_the_search(
        tmp_path, monkeypatch):
    """A DIALS that is there but fails to load (a compiled extension that does not) passed
    the check, which only looked for it, and find_reflections failed after the search.  Its
    modules are now imported in a child process first: the error names what failed, and the
    image is not searched."""
    from peaknet_test_support import break_dials

    from peaknet_xtal.errors import DialsUnavailable

    searched = []

    def counting(panels, masks):
        searched.append(len(panels))
        return bright_pixels(panels, masks)

    broken = break_dials(monkeypatch, tmp_path / "broken")
    with pytest.raises(DialsUnavailable, match=r"^PeakFinder\.find_reflections \(a DIALS "
                       r"reflection table\) needs DIALS, which is installed but fails to load "
                       r"in this Python \(importing dials\.array_family\.flex: ImportError: "
                       f"{re.escape(broken)}"):
        PeakFinder(predictor=counting).find_reflections(spots_image())
    assert searched == []


def run_with_a_hot_pixel(n: int = 8) -> list[np.ndarray]:
    """``n`` noisy images, each with a 3 x 3 spot that moves and a hot pixel that does not (too
    few strong spots in an image for the one-image spike rule to tell a spike from a spot)."""
    rng = np.random.default_rng(3)
    images = []
    for _ in range(n):
        image = rng.normal(10.0, 3.0, (60, 80)).astype(np.float32)
        y, x = int(rng.integers(10, 50)), int(rng.integers(15, 70))
        image[y - 1:y + 2, x - 1:x + 2] += 400.0
        image[5, 5] = 5000.0
        images.append(image)
    return images


def on_hot_pixel(peaks: np.ndarray) -> int:
    return int(np.sum((np.abs(peaks["ss"] - 5) <= 1) & (np.abs(peaks["fs"] - 5) <= 1)))


def test_a_run_learns_its_hot_pixels_as_peaknet2cxi_does(tmp_path):
    """``find_run`` reads ahead: the hot pixel is never a peak.  ``find`` image by image counts
    the same run: the hot pixel is a peak until enough images were seen, and from the image after
    the read-ahead on both give the same peaks, boxes in step; the run's defect mask is saved as
peaknet2cxi saves it; ``new_run`` forgets it."""
    images = run_with_a_hot_pixel()
    run = list(PeakFinder(predictor=bright_pixels).find_run(images, with_bbox=True))
    assert [on_hot_pixel(peaks) for peaks, _ in run] == [0] * len(images)
    assert all(len(peaks) == 1 and len(boxes) == 1 for peaks, boxes in run)
    finder = PeakFinder(predictor=bright_pixels)
    learning = finder.engine.defects.learning  # the frames a new run reads ahead
    one_by_one = [finder.find(image) for image in images]
    assert on_hot_pixel(one_by_one[0]) == 1 and on_hot_pixel(one_by_one[-1]) == 0
    assert all(same(a, b) for a, b in zip(one_by_one[learning:], [p for p, _ in run[learning:]],
                                          strict=True))
    (good,) = finder.defect_masks()
    assert not good[5, 5] and good.sum() == good.size - 1
    written = finder.save_defects(tmp_path)
    assert [p.name for p in written][:1] == ["pixel_defects.h5"]
    with h5py.File(written[0]) as h5:  # 1 = good, the panel's layout
        assert np.array_equal(h5["/data/data"][()].astype(bool), good)
    finder.new_run()
    assert finder.defect_masks() is None
    assert on_hot_pixel(finder.find(images[0])) == 1


def test_find_run_on_one_image_says_to_use_find():
    """It iterated the image's rows and said a row must be 2-D."""
    with pytest.raises(TypeError, match="find_run takes a dxtbx ImageSet or an iterable of "
                       "images .* for one image use find"):
        list(PeakFinder(predictor=bright_pixels).find_run(spots_image()))


def test_bad_inputs_are_explained():
    with pytest.raises(TypeError, match="numpy array"):
        to_panels("image.cbf")
    with pytest.raises(ValueError, match="2-D"):
        to_panels(np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="panel 1"):
        to_panels([np.zeros((4, 4)), np.zeros(4)])


@pytest.mark.dials
def test_flex_arrays_match_numpy(dials_env):
    from dxtbx import flumpy

    finder = PeakFinder(predictor=bright_pixels)
    image = spots_image()
    flexed = flumpy.from_numpy(image.astype(np.float64))
    assert same(finder.find(flexed), finder.find(image))
    assert np.array_equal(finder.find([flexed, flexed])["panel"], [0, 0, 1, 1])


@pytest.mark.dials
def test_imageset_peaks_and_reflection_table_on_real_cspad(real_data, dials_env):
    from dxtbx.model.experiment_list import ExperimentListFactory

    imageset = ExperimentListFactory.from_filenames([str(real_data / CSPAD)])[0].imageset
    finder = PeakFinder(predictor=bright_pixels, max_peaks=500)
    peaks, boxes = finder.find(imageset, 0, with_bbox=True)
    assert 20 < len(peaks) <= 500
    assert len(set(peaks["panel"].tolist())) > 5 and peaks["panel"].max() < 64
    # thermolysin stills on this CSPAD reach ~2 A; beyond 1/1.5 A nothing can be a Bragg peak
    assert np.all(np.isfinite(peaks["one_over_d"]))
    assert 0.005 < peaks["one_over_d"].min() and peaks["one_over_d"].max() < 1 / 1.5
    table = finder.find_reflections(imageset, 0)
    assert table.size() == len(peaks)
    xyz = np.array(table["xyzobs.px.value"])
    assert np.allclose(xyz[:, 0], peaks["fs"] + 0.5) and np.allclose(xyz[:, 1], peaks["ss"] + 0.5)
    assert np.all(xyz[:, 2] == 0.5)
    bbox = np.array(table["bbox"])
    assert np.array_equal(bbox[:, :4], boxes)
    assert np.all((bbox[:, 0] <= xyz[:, 0]) & (xyz[:, 0] <= bbox[:, 1]))
    assert np.all((bbox[:, 2] <= xyz[:, 1]) & (xyz[:, 1] <= bbox[:, 3]))
    assert list(table["panel"]) == peaks["panel"].tolist()
    assert table.get_flags(table.flags.strong).count(True) == table.size()


@pytest.mark.dials
def test_reflections_of_a_scan_slice_carry_dials_frame_numbers(real_data, dials_env):
    """Image 0 of a sequence sliced to images 5-7 is DIALS' frame 4: its spots' z and boxes say
    so (they said 0.5 and (0, 1), so mapped to the rotation angles of images before the slice),
    as ``dials.find_spots`` writes them."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    files = sorted((real_data / "pilatus2m_lcysteine_rotation").glob("l-cyst_01_*.cbf.bz2"))
    sequence = ExperimentListFactory.from_filenames([str(f) for f in files])[0].imageset
    sliced = sequence[4:7]
    assert sliced.get_scan().get_array_range() == (4, 7)
    finder = PeakFinder(predictor=bright_pixels, max_peaks=50)
    for index in (0, 2):
        table = finder.find_reflections(sliced, index)
        assert table.size() > 0
        z = np.array(table["xyzobs.px.value"])[:, 2]
        bbox = np.array(table["bbox"])
        assert np.all(z == 4 + index + 0.5)
        assert np.all(bbox[:, 4] == 4 + index) and np.all(bbox[:, 5] == 5 + index)


@pytest.mark.dials
def test_an_imageset_without_a_beam_gives_peaks_without_resolution(real_data, dials_env):
    """DIALS finds spots on images without a beam model; so does the API, with 1/d NaN (it
    stopped with an AttributeError, after counting the image towards the run)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    imageset = ExperimentListFactory.from_filenames([str(real_data / CSPAD)])[0].imageset
    finder = PeakFinder(predictor=bright_pixels, max_peaks=500)
    with_beam = finder.find(imageset, 0)
    imageset.set_beam(None)
    assert imageset.get_beam(0) is None
    without = finder.find(imageset, 0)
    assert len(without) == len(with_beam) > 0 and np.isnan(without["one_over_d"]).all()
    assert finder.find_reflections(imageset, 0).size() == len(with_beam)


@pytest.mark.dials
def test_a_mask_of_another_panel_count_is_refused_by_name(real_data, dials_env):
    """A 64-panel CSPAD image with a mask of one panel or of ten: one ValueError saying how
    many panels each has (an IndexError, or ten panels' masks silently applied)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    imageset = ExperimentListFactory.from_filenames([str(real_data / CSPAD)])[0].imageset
    finder = PeakFinder(predictor=bright_pixels)
    for mask in (np.ones((185, 194), bool), [np.ones((185, 194), bool)] * 10):
        with pytest.raises(ValueError, match=r"mask: (1|10) panel\(s\), where the image has 64"):
            finder.find(imageset, 0, mask=mask)
    with pytest.raises(ValueError, match=r"1 mask\(s\) for 2 panel\(s\)"):
        from peaknet_xtal.finding.sanitise import sanitise_frame

        sanitise_frame([np.zeros((4, 4))] * 2, [np.ones((4, 4), bool)])


@pytest.mark.dials
def test_imageset_data_count_photons_for_the_shot_noise(real_data, dials_env):
    """dxtbx hands over data divided by the format's gain, 1 on these CSPAD CBFs though the
    detector gives about 30 ADU per photon; that 1 is a placeholder, so the gain comes from the
    background (finding/gain.py), as it does for plain arrays that declare none: both count the
    same shot noise, which an explicit gain of 0 leaves out."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_xtal.finding.api import imageset_panels

    imageset = ExperimentListFactory.from_filenames([str(real_data / CSPAD)])[0].imageset
    finder = PeakFinder(predictor=bright_pixels, min_snr=0.0)
    counted = finder.find(imageset, 0)
    estimate = finder.engine._gain_from_data.estimate
    assert estimate is not None and 20 < estimate < 40
    panels, masks = imageset_panels(imageset, 0)
    plain = PeakFinder(predictor=bright_pixels, min_snr=0.0).find(panels, mask=masks)
    no_shot = PeakFinder(predictor=bright_pixels, min_snr=0.0, adu_per_photon=0).find(
        panels, mask=masks)
    assert len(counted) == len(plain) == len(no_shot) > 20
    np.testing.assert_array_equal(counted["intensity"], no_shot["intensity"])
    np.testing.assert_allclose(counted["snr"], plain["snr"])
    brighter = counted["intensity"] > 0
    assert np.all(counted["snr"][brighter] < no_shot["snr"][brighter])


_ORDER_SCRIPT = """
import sys
if sys.argv[1] == "cctbx-first":
    import omptbx  # noqa: F401  (cctbx's OpenMP stubs now shadow libgomp)
import numpy as np
import torch
from peaknet_xtal.finding.engine import InferenceEngine
rng = np.random.default_rng(0)
panels = [rng.poisson(4, (96, 96)).astype(np.float32) for _ in range(4)]
engine = InferenceEngine("default", device="cpu", threads=int(sys.argv[3]))
first, second = engine.predict_panels(panels), engine.predict_panels(panels)
assert all(np.array_equal(a, b) for a, b in zip(first, second)), "non-deterministic"
np.save(sys.argv[2], np.stack(first))
print("threads", torch.get_num_threads())
"""


@pytest.mark.dials
def test_cctbx_imported_before_torch_still_gives_correct_probabilities(tmp_path, dials_env):
    """Debian's cctbx exports stub OpenMP functions; with them ahead of libgomp multi-threaded
    torch returns different, wrong values on every call.  The engine detects this and drops to
    one thread, so the result equals a clean process's."""
    script = tmp_path / "order.py"
    script.write_text(_ORDER_SCRIPT)
    outputs = {}
    for order in ("cctbx-first", "torch-first"):
        out = tmp_path / f"{order}.npy"
        run = subprocess.run([sys.executable, str(script), order, str(out), "2"],
                             env=dials_env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[order] = (np.load(out), run.stdout.strip(), run.stderr)
    assert outputs["cctbx-first"][1] == "threads 1"
    # one clear line saying so, and what to do instead; nothing of the kind in a clean process
    said = [line for line in outputs["cctbx-first"][2].splitlines() if "CPU thread" in line]
    assert len(said) == 1 and "per process, not 2: " in said[0] and "mp.nproc=N" in said[0]
    assert "CPU thread" not in outputs["torch-first"][2]
    np.testing.assert_allclose(outputs["cctbx-first"][0], outputs["torch-first"][0], atol=1e-5)
    # a run that asked for one thread loses nothing: no warning (the line stays in the log)
    one = subprocess.run([sys.executable, str(script), "cctbx-first", str(tmp_path / "one.npy"),
                          "1"], env=dials_env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "CPU thread" not in one.stderr


@pytest.mark.dials
@pytest.mark.slow
def test_cctbx_example_runs_on_real_cspad_with_the_default_model(real_data, tmp_path, dials_env):
    out = tmp_path / "strong.refl"
    env = dict(dials_env, PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), dials_env.get("PYTHONPATH", "")])))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "cctbx_peakfinder.py"),
                          str(real_data / CSPAD), "--threshold", "0.9", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "idx-20130301060858401.cbf [0]:" in run.stdout and "peaks, hit=" in run.stdout
    from dials.array_family import flex

    table = flex.reflection_table.from_file(str(out))
    assert "xyzobs.px.value" in table and "panel" in table and "bbox" in table


@pytest.mark.parametrize(("setting", "value", "words"), [
    ("threshold", 2.0, "threshold must be in [0, 1], got 2.0"),
    ("threshold", -0.5, "threshold must be in [0, 1]"),
    ("min_snr", -3.0, "min_snr must be >= 0"),
    ("rescue_prob", float("nan"), "rescue_prob must be in [0, 1]"),
    ("max_peaks", 0, "max_peaks must be >= 1"),
])
def test_settings_outside_their_range_are_refused(setting, value, words):
    """The Python API checks what peaknet2cxi checks (``finding.settings.LIMITS``): a cut of 2
    ran and found 7 peaks where it should have found none or failed."""
    with pytest.raises(ValueError) as err:
        PeakFinder(**{setting: value})
    assert words in str(err.value)


@pytest.mark.parametrize(("setting", "value", "words"), [
    ("threshold", "0.5", "threshold must be a number, got '0.5'"),
    ("min_snr", [3], "min_snr must be a number"),
    ("batch_size", 2.5, "batch_size must be a whole number, got 2.5"),
    ("max_peaks", True, "max_peaks must be a whole number"),
])
def test_settings_of_the_wrong_type_are_refused_by_name(setting, value, words):
    """A string where a number belongs failed at the first comparison, naming no setting."""
    with pytest.raises(TypeError) as err:
        PeakFinder(**{setting: value})
    assert words in str(err.value)


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:7", "not a device"])
def test_a_device_the_model_cannot_run_on_is_refused_at_construction(device):
    """``device="tpu"`` was accepted and failed at the first image with torch's own message."""
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError) as err:
        PeakFinder(device=device)
    assert f"device {device!r}" in str(err.value) and "available here: auto, cpu" in str(err.value)


def test_an_index_with_array_input_is_refused_not_ignored():
    """``find(stack, index=5)`` returned the peaks of the whole stack as one image."""
    finder = PeakFinder(predictor=bright_pixels)
    image = spots_image()
    with pytest.raises(ValueError, match="index 5 picks an image of a dxtbx ImageSet"):
        finder.find(np.stack([image, image]), index=5)
    assert len(finder.find(image, index=0)) == 2


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"threads": 0}, ValueError, "threads must be a whole number >= 1"),
    ({"threads": -2}, ValueError, "got -2"),
    ({"threads": 1.5}, ValueError, "got 1.5"),
    ({"model": None}, TypeError, "model must be a registered model name"),
])
def test_threads_and_model_are_checked_at_construction(kwargs, error, words):
    """threads=0 silently meant the default, -2 failed inside torch at the first image, and
    model=None at the first image as "expected str, bytes or os.PathLike object"."""
    with pytest.raises(error, match=words):
        PeakFinder(**kwargs)


def test_an_empty_image_is_refused():
    with pytest.raises(ValueError, match=r"panel 0 is empty \(shape \(0, 0\)\)"):
        PeakFinder(predictor=bright_pixels).find(np.zeros((0, 0), np.float32))


def test_masked_arrays_keep_their_masked_pixels_out():
    """A numpy masked array's masked values (here a bright spot under the mask) are no pixels:
    the same peaks as the same image with ``mask=``."""
    finder = PeakFinder(predictor=bright_pixels)
    image = spots_image()
    bad = np.zeros(image.shape, bool)
    bad[45, 70] = True
    masked = finder.find(np.ma.array(image, mask=bad))
    assert same(masked, finder.find(image, mask=~bad)) and len(masked) == 1
    listed = finder.find([np.ma.array(image, mask=bad), image])  # one panel masked, one not
    assert sorted(listed["panel"].tolist()) == [0, 1, 1]


def test_per_image_masks_go_with_their_images_not_as_the_runs_mask():
    """find_run's ``mask`` is one mask for every image; a list of per-image masks there is
    refused saying so (it said "panel 0 must be 2-D"), and masked arrays carry each image's."""
    finder = PeakFinder(predictor=bright_pixels)
    image = spots_image()
    bad = np.zeros(image.shape, bool)
    bad[45, 70] = True
    stack = np.stack([image, image])
    with pytest.raises(ValueError, match="the same for every image of find_run") as err:
        list(finder.find_run([stack, stack], mask=[~np.stack([bad, bad])] * 2))
    assert "numpy masked arrays" in str(err.value)
    masked = list(finder.find_run([np.ma.array(image, mask=bad), image]))
    assert [len(p) for p in masked] == [1, 2]


def test_a_slab_with_its_multi_panel_geometry_is_split_into_its_panels(make_geometry_text):
    """One raw array in the geometry's layout goes to the panels the geometry defines (as
    peaknet2cxi reads it), so peaks carry their panel and 1/d; a shape that fits neither the
    layout nor the panels is an error, not one big panel."""
    from peaknet_xtal.formats.geometry import parse_geometry

    geometry = parse_geometry(make_geometry_text(["a", "b"], 80, 60, [(-40, -120), (-40, 60)]))
    image = spots_image()
    slab = np.concatenate([np.full_like(image, 10.0), image])  # panel b holds the spots
    finder = PeakFinder(predictor=bright_pixels)
    peaks = finder.find(slab, geometry=geometry)
    assert peaks["panel"].tolist() == [1, 1] and np.isfinite(peaks["one_over_d"]).all()
    assert same(peaks, finder.find([np.full_like(image, 10.0), image], geometry=geometry))
    with pytest.raises(ValueError, match="does not fit the geometry"):
        finder.find(image, geometry=geometry)


def test_infinite_pixels_are_masked_with_one_warning_and_no_numpy_noise(recwarn):
    """An image with infinities: the finder's own warning says they were masked; numpy's
    "invalid value encountered in subtract" from the defect filter leaked beside it."""
    image = spots_image()
    image[4, 5:9] = np.inf  # on a row the noise estimate samples (every fourth)
    peaks = PeakFinder(predictor=bright_pixels).find(image)
    assert len(peaks) == 2
    assert not [w for w in recwarn.list if issubclass(w.category, RuntimeWarning)]


def test_warnings_about_an_arrays_pixels_name_it_by_its_place_in_the_run(caplog):
    """An array has no file: its warnings read ``frame //: masked ...``, which names nothing a
    user can find; they now name the image by its place among those the finder was given."""
    finder = PeakFinder(predictor=bright_pixels)
    images = [spots_image() for _ in range(3)]
    images[2][4, 5:9] = np.nan
    with caplog.at_level("WARNING", logger="peaknet_xtal.finding.sanitise"):
        finder.find(images[0])
        list(finder.find_run(images[1:], mask=np.ones(images[0].shape, bool)))
    (masked,) = [r.getMessage() for r in caplog.records if "masked" in r.getMessage()]
    assert masked.startswith("PeakFinder image 2: masked 4 non-finite"), masked


@pytest.mark.dials
def test_warnings_about_an_imagesets_pixels_name_its_file_and_image(tmp_path, dials_env, caplog):
    """Through an ImageSet the finder's warnings read ``frame //: masked ...``, naming no
    file; they now name the image's file and, in a file of several images, its event, as
    ``peaknet2cxi`` names them (the README promises a warning naming the file)."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from peaknet_test_support import tiny_nxmx

    stack = np.random.default_rng(2).poisson(3, (3, 40, 48)).astype(np.int32)
    stack[:, :, 20:22] = -1  # gaps, as signed photon counts mark them
    master = tiny_nxmx(tmp_path / "rot", stack, still=False)
    stills = tiny_nxmx(tmp_path / "stills", stack, still=True)
    (sequence,) = ExperimentListFactory.from_filenames([str(master)]).imagesets()
    shots = ExperimentListFactory.from_filenames([str(stills)]).imagesets()
    finder = PeakFinder(predictor=bright_pixels)
    with caplog.at_level("WARNING", logger="peaknet_xtal"):
        finder.find(sequence, 1)
        finder.find(shots[2], 0)  # a still of its own: image 2 of its file
    masked = [r.getMessage() for r in caplog.records if "masked" in r.getMessage()]
    assert len(masked) == 2, masked
    assert masked[0].startswith(f"{master} //1: masked 80 pixels"), masked[0]
    assert masked[1].startswith(f"{stills} //2: masked 80 pixels"), masked[1]


def test_a_one_image_nexus_file_is_named_as_peaknet2cxi_names_it(tmp_path, dials_env, caplog):
    """A NeXus file of one shot is ``//`` in ``peaknet2cxi`` (a file of one image), and was
    ``//0`` through the Python API: one image, two names, in two entry points' warnings."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from peaknet_test_support import tiny_nxmx

    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    stack = np.random.default_rng(3).poisson(3, (1, 40, 48)).astype(np.int32)
    stack[:, :, 20:22] = -1
    for still in (True, False):
        path = tiny_nxmx(tmp_path / str(still), stack, still=still)
        (imageset,) = ExperimentListFactory.from_filenames([str(path)]).imagesets()
        caplog.clear()
        with caplog.at_level("WARNING", logger="peaknet_xtal"):
            PeakFinder(predictor=bright_pixels).find(imageset, 0)
        (frame,) = DxtbxSource(path)
        masked = [r.getMessage() for r in caplog.records if "masked" in r.getMessage()]
        assert masked and masked[0].startswith(f"{path} {frame.event}: masked"), masked


def test_whole_number_floats_mark_gaps_as_the_imageset_does(tmp_path, dials_env, caplog):
    """A script that takes ``imageset.get_corrected_data`` (floats: a Pilatus frame's -1 gaps
    as -1.0) and passes it as an array: its gaps were read as pixels (283 peaks on a real
    Pilatus 6M frame where the imageset gave 493).  Floats of whole numbers now mark them as
    the imageset's do: the same masked pixels, the same peaks."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from peaknet_test_support import tiny_cbf

    pixels = np.random.default_rng(7).poisson(3, (48, 48))
    pixels[:, 20:22] = -1  # a module gap
    pixels[30:33, 10:13] += 300
    (imageset,) = ExperimentListFactory.from_filenames(
        [str(tiny_cbf(tmp_path / "gap_0001.cbf", 100.0, pixels=pixels))]).imagesets()
    floats = np.asarray(imageset.get_corrected_data(0)[0].as_numpy_array(), dtype=np.float64)
    assert floats.dtype.kind == "f" and (floats == -1.0).sum() == 96
    from_imageset = PeakFinder(predictor=bright_pixels).find(imageset, 0)
    with caplog.at_level("WARNING", logger="peaknet_xtal"):
        from_array = PeakFinder(predictor=bright_pixels).find(floats, 0)
    masked = [r.getMessage() for r in caplog.records if "masked 96 pixels" in r.getMessage()]
    assert masked and "-1 marks gaps" in masked[0], masked  # as the imageset's mask has them
    np.testing.assert_array_equal(from_array["fs"], from_imageset["fs"])
    np.testing.assert_array_equal(from_array["ss"], from_imageset["ss"])


def test_an_imageset_index_out_of_range_is_said_as_that(tmp_path, dials_env):
    """find(imageset, 5) on one image read 'FormatError: <imageset>: cannot read image 5
    (RuntimeError: dxtbx Internal Error: ... DXTBX_ASSERT(index < indices_.size()) ...)': a
    caller's index reported as a damaged file; -1 and 1.0 gave an OverflowError and a boost
    ArgumentError."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from peaknet_test_support import tiny_cbf

    (imageset,) = ExperimentListFactory.from_filenames(
        [str(tiny_cbf(tmp_path / "one_0001.cbf", 100.0))]).imagesets()
    finder = PeakFinder(predictor=bright_pixels)
    for index in (5, -1):
        with pytest.raises(IndexError, match=f"index {index}: the imageset holds 1 image"):
            finder.find(imageset, index)
    with pytest.raises(TypeError, match="index 1.0: an image number"):
        finder.find(imageset, 1.0)
    assert finder.find(imageset, 0) is not None


@pytest.mark.parametrize("value", [0.5, np.nan, 2])
def test_a_mask_of_other_values_than_0_and_1_is_refused(value):
    """Masks were cast to booleans: 0.5, NaN and a CrystFEL bad bit (2) read as good pixels,
    so a pixel-status map (bad = nonzero) passed as the good-pixel mask without a word."""
    image = np.random.default_rng(8).poisson(3, (32, 32)).astype(np.float32)
    mask = np.ones((32, 32), dtype=np.float64 if value != 2 else np.uint16)
    mask[3, 4] = value
    with pytest.raises(ValueError, match="mask: 1 value.* other than 0 and 1"):
        PeakFinder(predictor=bright_pixels).find(image, mask=mask)
    mask[3, 4] = 0
    assert PeakFinder(predictor=bright_pixels).find(image, mask=mask) is not None


def test_the_model_running_out_of_memory_is_a_memory_error(monkeypatch):
    """Where torch's allocator fails inside the model, the Python API raises MemoryError, as
    numpy does where its arrays fail (two types for one condition before)."""
    import torch

    from peaknet_xtal.finding.engine import InferenceEngine

    def starved(self, *args, **kwargs):
        torch.empty(2 ** 50, dtype=torch.uint8)

    monkeypatch.setattr(InferenceEngine, "_segment", starved)
    image = np.random.default_rng(3).normal(10.0, 1.0, (64, 64)).astype(np.float32)
    with pytest.raises(MemoryError, match="can't allocate memory"):
        PeakFinder(threads=1).find(image)


def test_a_smaller_tile_size_cuts_a_large_panel_into_tiles_and_keeps_its_peaks(monkeypatch):
    """``tile_size`` (the README's memory saver on large panels) reached no entry point: the
    Python API had no such argument.  A 1200 x 700 panel found in 512-px tiles goes to the
    model as tiles no wider than that, and gives the whole panel's peaks up to the few that
    tile cuts legitimately move (README, 'Tiles': 99.5 % on detectors' panels)."""
    import peaknet_xtal.finding.engine as engine_module

    rng = np.random.default_rng(7)
    image = rng.poisson(8.0, (1200, 700)).astype(np.float32)
    for y, x in np.column_stack([rng.uniform(20, 1180, 60), rng.uniform(20, 680, 60)]):
        ys, xs = np.mgrid[int(y) - 6:int(y) + 7, int(x) - 6:int(x) + 7]
        image[ys, xs] += 400.0 * np.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * 1.2 ** 2))
    cuts = []

    def tile_panel(shape, size, overlap):
        cuts.append(engine_module_tile_panel(shape, size, overlap))
        return cuts[-1]

    engine_module_tile_panel = engine_module.tile_panel
    monkeypatch.setattr(engine_module, "tile_panel", tile_panel)
    settings = {"device": "cpu", "threads": 1, "adu_per_photon": 1.0}
    whole = PeakFinder(**settings).find(image)
    assert cuts and all(len(c) == 1 for c in cuts)  # the default: the panel whole
    cuts.clear()
    tiled = PeakFinder(**settings, tile_size=512).find(image)
    assert cuts and all(len(c) > 1 and max(max(h, w) for _, _, h, w, _ in c) <= 512
                        for c in cuts)
    assert len(whole) >= 55  # the spots are found at all
    apart = np.hypot(whole["fs"][:, None] - tiled["fs"][None], whole["ss"][:, None]
                     - tiled["ss"][None])
    # at most 2 % of either side's peaks (one of ~60) without a partner within 1.5 px
    assert (apart.min(axis=1) > 1.5).sum() <= 0.02 * len(whole)
    assert (apart.min(axis=0) > 1.5).sum() <= 0.02 * len(tiled)


@pytest.mark.parametrize(("value", "error", "words"), [
    (95, ValueError, "tile_size must be >= 96"),  # the model's grid past the 64-px overlap
    (0, ValueError, "tile_size must be >= 96"),
    (1024.0, TypeError, "tile_size must be a whole number of pixels, got 1024.0"),
    (True, TypeError, "tile_size must be a whole number of pixels, got True"),
])
def test_a_tile_size_the_model_cannot_take_is_refused_by_name(value, error, words):
    with pytest.raises(error, match=words):
        PeakFinder(tile_size=value)
