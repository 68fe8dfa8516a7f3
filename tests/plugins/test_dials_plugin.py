"""The ``peaknet`` DIALS threshold extension in-process: discovery, PHIL, mask contract, pickling.

These run DIALS' own extension machinery (the same code ``dials.find_spots`` uses to build its
PHIL scope and threshold object) and the real default model on a real CSPAD panel; the
subprocess tests of whole DIALS commands are in ``test_dials_commands.py``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.dials

CSPAD = "cspad_thermolysin_stills/idx-20130301060858401.cbf"


@pytest.fixture(scope="module")
def dials_modules(dials_env: dict[str, str]):  # noqa: ARG001 - the fixture checks DIALS is there
    from dials.algorithms.spot_finding.factory import SpotFinderFactory, phil_scope

    return SpotFinderFactory, phil_scope


def _params(phil_scope, *lines: str):
    """Extract DIALS spot-finding parameters from PHIL lines, as dials.find_spots does."""
    from libtbx.phil import parse

    return phil_scope.fetch(sources=[parse("\n".join(lines))]).extract()


@pytest.fixture(scope="module")
def cspad_panel(real_data: Path, dials_modules) -> tuple[np.ndarray, np.ndarray]:  # noqa: ARG001
    """One real CSPAD ASIC (corrected data and the format's mask) with strong Bragg spots."""
    from dxtbx import flumpy
    from dxtbx.model.experiment_list import ExperimentListFactory

    experiments = ExperimentListFactory.from_filenames([str(real_data / CSPAD)])
    imageset = experiments.imagesets()[0]
    data = imageset.get_corrected_data(0)
    mask = imageset.get_mask(0)
    brightest = int(np.argmax([flumpy.to_numpy(p).max() for p in data]))
    return (flumpy.to_numpy(data[brightest]).copy(), flumpy.to_numpy(mask[brightest]).copy())


def test_entry_point_is_found_by_both_discovery_mechanisms(dials_modules) -> None:
    """DIALS 3.12 (pkg_resources) and DIALS >= 3.24 (importlib.metadata) both see ``peaknet``."""
    from importlib.metadata import entry_points

    from dials.extensions import SpotFinderThreshold

    from peaknet_dials.spotfinder_threshold_ext import PeakNetSpotFinderThresholdExt

    assert SpotFinderThreshold.load("peaknet") is PeakNetSpotFinderThresholdExt
    found = {ep.name: ep for ep in entry_points(group="dials.spotfinder.threshold")}
    assert found["peaknet"].load() is PeakNetSpotFinderThresholdExt
    # A `default` attribute would silently make peaknet the default algorithm for every user.
    assert "default" not in PeakNetSpotFinderThresholdExt.__dict__
    assert PeakNetSpotFinderThresholdExt.__doc__.strip()


def test_phil_scope_offers_peaknet_with_help(dials_modules) -> None:
    _, phil_scope = dials_modules
    params = _params(phil_scope)
    assert params.spotfinder.threshold.algorithm == "dispersion_extended"  # we are not default
    scope = phil_scope.get("spotfinder.threshold.peaknet").objects[0]
    names = {obj.name: obj for obj in scope.objects}
    assert set(names) == {"model", "device", "threshold", "min_snr", "min_height",
                          "adu_per_photon", "batch_size", "threads", "dilation", "rescue_prob",
                          "rescue_height", "faint_support", "precision", "tile_size"}
    for name, obj in names.items():
        assert obj.help and len(obj.help) > 20, f"peaknet.{name} needs help text"
    # DIALS' own ``gain=`` shorthand stays DIALS' (an option of ours named gain made it
    # ambiguous for every dials.find_spots user, whatever the algorithm)
    given = phil_scope.command_line_argument_interpreter().process("gain=30")
    assert phil_scope.fetch(sources=[given]).extract().spotfinder.threshold.dispersion.gain == 30
    defaults = params.spotfinder.threshold.peaknet
    assert (defaults.model, defaults.device, defaults.threshold) == ("default", "auto", 0.5)


def test_settings_come_from_phil(dials_modules, monkeypatch) -> None:
    factory, phil_scope = dials_modules
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # nothing else running
    params = _params(
        phil_scope,
        "spotfinder.threshold.algorithm=peaknet",
        "spotfinder.threshold.peaknet.threshold=0.3",
        "spotfinder.threshold.peaknet.device=cpu",
        "spotfinder.threshold.peaknet.batch_size=2",
        "spotfinder.mp.nproc=2",
    )
    ext = factory.configure_threshold(params)
    assert type(ext).__name__ == "PeakNetSpotFinderThresholdExt"
    s = ext.settings
    assert (s.model, s.device, s.threshold, s.batch_size) == ("default", "cpu", 0.3, 2)
    # threads default: the free cores shared among the DIALS worker processes, at least one.
    assert s.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    # dials.stills_process passes its own parameters, whose worker count is the top-level mp.
    from dials.command_line.stills_process import phil_scope as stills_scope

    from peaknet_dials.spotfinder_threshold_ext import PeakNetSettings

    stills = _params(stills_scope, "spotfinder.threshold.algorithm=peaknet", "mp.nproc=2")
    assert PeakNetSettings.from_params(stills).threads == max(
        1, len(os.sched_getaffinity(0)) // 2)
    # a busy machine: other work keeps every core but one busy -> one thread, never more
    monkeypatch.setattr(os, "getloadavg", lambda: (float(len(os.sched_getaffinity(0))),) * 3)
    assert PeakNetSettings.from_params(
        _params(stills_scope, "spotfinder.threshold.algorithm=peaknet")).threads == 1
    # out of range: the extension's own user error, not PHIL's (a traceback in DIALS)
    from libtbx.utils import Sorry

    with pytest.raises(Sorry, match=r"threshold = 1.5: must be in \[0, 1\]"):
        factory.configure_threshold(_params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                                            "spotfinder.threshold.peaknet.threshold=1.5"))


def test_tile_size_reaches_the_engine_and_a_tile_too_small_is_a_sorry(dials_modules) -> None:
    """``tile_size`` (the README's memory saver on large panels) was an unknown parameter
    definition to DIALS.  Now it reaches the engine DIALS' spot finding runs, and a tile the
    model cannot take (``finding.settings.LIMITS``) is DIALS' user error naming it."""
    from libtbx.utils import Sorry

    from peaknet_dials.spotfinder_threshold_ext import PeakNetSettings, _build_predictor
    from peaknet_xtal.finding.settings import DEFAULTS

    factory, phil_scope = dials_modules
    lines = ("spotfinder.threshold.algorithm=peaknet", "spotfinder.threshold.peaknet.device=cpu")
    ext = factory.configure_threshold(_params(phil_scope, *lines,
                                              "spotfinder.threshold.peaknet.tile_size=1024"))
    assert ext.settings.tile_size == 1024
    assert _build_predictor(ext.settings).tile_size == 1024
    assert PeakNetSettings.from_params(_params(phil_scope, *lines)).tile_size == DEFAULTS.tile_size
    with pytest.raises(Sorry, match=r"^peaknet: spotfinder\.threshold\.peaknet\.tile_size = 64: "
                       r"must be >= 96"):
        factory.configure_threshold(_params(phil_scope, *lines,
                                            "spotfinder.threshold.peaknet.tile_size=64"))


@pytest.mark.parametrize("option,value,words", [
    ("min_height", "nan", "must be a finite number"), ("threshold", "nan", "finite"),
    ("min_snr", "nan", "finite"), ("adu_per_photon", "nan", "finite"),
    ("threshold", "None", "must be a number"), ("min_snr", "None", "must be a number"),
    ("rescue_height", "None", "number"), ("batch_size", "None", "number"),
    ("dilation", "None", "number"), ("faint_support", "None", "number"),
    ("tile_size", "None", "number"),
    ("min_height", "Auto", "must be a number")])
def test_a_value_phil_lets_through_is_a_sorry_naming_the_option(dials_modules, option, value,
                                                               words) -> None:
    """PHIL passes None, Auto and nan through its range check (nan compares false with every
    bound); they became a traceback at the first image that DIALS asks users to report as its
    own bug (a TypeError for None, a ValueError naming adu_per_photon for gain=nan; under
    dials.stills_process every image failed and the run exited 0).  Now DIALS' user error when
    the extension is made, naming the option as the user wrote it."""
    from libtbx.utils import Sorry

    factory, phil_scope = dials_modules
    params = _params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                     "spotfinder.threshold.peaknet.device=cpu",
                     f"spotfinder.threshold.peaknet.{option}={value}")
    with pytest.raises(Sorry, match=rf"^peaknet: spotfinder\.threshold\.peaknet\.{option} = "
                       rf"{value.lower() if value == 'nan' else value}: .*{words}"):
        factory.configure_threshold(params)
    # unset gain and threads stay the automatic choice
    auto = factory.configure_threshold(_params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                                               "spotfinder.threshold.peaknet.device=cpu"))
    assert auto.settings.adu_per_photon is None and auto.settings.threads >= 1


def test_a_dispersion_gain_carried_over_is_said_to_be_unused(dials_modules, caplog) -> None:
    """``spotfinder.threshold.dispersion.gain=25`` on a command line switched to
    ``algorithm=peaknet`` was dropped without a word; DIALS' log now says which setting takes
    it, and says nothing where peaknet.adu_per_photon is set or dispersion.gain is not."""
    factory, phil_scope = dials_modules
    base = ("spotfinder.threshold.algorithm=peaknet", "spotfinder.threshold.peaknet.device=cpu")
    for extra, said in ((("spotfinder.threshold.dispersion.gain=25",), True),
                        (("spotfinder.threshold.dispersion.gain=25",
                          "spotfinder.threshold.peaknet.adu_per_photon=25"), False),
                        ((), False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="dials"):
            factory.configure_threshold(_params(phil_scope, *base, *extra))
        lines = [r.getMessage() for r in caplog.records if "dispersion.gain" in r.getMessage()]
        assert bool(lines) is said, (extra, lines)
        if said:
            assert "spotfinder.threshold.peaknet.adu_per_photon=25" in lines[0]


def test_dispersion_thresholds_carried_over_are_said_to_be_unused(dials_modules,
                                                                   caplog) -> None:
    """A tuned dispersion PHIL (``sigma_strong=5 global_threshold=100``) kept on a command
    line switched to ``algorithm=peaknet`` was dropped without a word; DIALS' log now names the
    settings it does not read, and says nothing for DIALS' defaults."""
    factory, phil_scope = dials_modules
    base = ("spotfinder.threshold.algorithm=peaknet", "spotfinder.threshold.peaknet.device=cpu")
    for extra, said in ((("spotfinder.threshold.dispersion.sigma_strong=5",
                          "spotfinder.threshold.dispersion.global_threshold=100"),
                         ["sigma_strong=5", "global_threshold=100"]),
                        (("spotfinder.threshold.dispersion.kernel_size=5,5",), ["kernel_size=5 5"]),
                        (("spotfinder.threshold.dispersion.sigma_strong=3",), []),
                        ((), [])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="dials"):
            factory.configure_threshold(_params(phil_scope, *base, *extra))
        lines = [r.getMessage() for r in caplog.records
                 if "not read by algorithm=peaknet" in r.getMessage()]
        assert bool(lines) is bool(said), (extra, lines)
        for setting in said:
            assert setting in lines[0]


def _ext(phil_scope, threshold: float, dilation: int = 1, min_snr: float | None = None,
         gain: float | None = None, min_height: float | None = None,
         faint_support: int | None = None):
    from peaknet_dials.spotfinder_threshold_ext import PeakNetSpotFinderThresholdExt

    extra = [] if min_snr is None else [f"spotfinder.threshold.peaknet.min_snr={min_snr}"]
    extra += [] if faint_support is None else [
        f"spotfinder.threshold.peaknet.faint_support={faint_support}"]
    extra += [] if min_height is None else [
        f"spotfinder.threshold.peaknet.min_height={min_height}"]
    extra += [] if gain is None else [f"spotfinder.threshold.peaknet.adu_per_photon={gain}"]
    params = _params(phil_scope, f"spotfinder.threshold.peaknet.threshold={threshold}",
                     "spotfinder.threshold.peaknet.device=cpu",
                     "spotfinder.threshold.peaknet.threads=1",
                     f"spotfinder.threshold.peaknet.dilation={dilation}", *extra)
    return PeakNetSpotFinderThresholdExt(params)


def test_rescue_and_faint_settings_reach_the_shared_engine(dials_modules) -> None:
    """The shared defaults, as in every entry point; asked for, the engine's peak settings carry
    them."""
    from peaknet_dials.spotfinder_threshold_ext import PeakNetSettings, _build_predictor
    from peaknet_xtal.finding.settings import DEFAULTS

    _, phil_scope = dials_modules
    default = _ext(phil_scope, 0.5).settings
    assert (default.rescue_prob, default.rescue_height) == (DEFAULTS.rescue_prob,
                                                             DEFAULTS.rescue_height)
    assert default.faint_support == DEFAULTS.faint_support
    params = _params(phil_scope, "spotfinder.threshold.peaknet.rescue_prob=0.4",
                     "spotfinder.threshold.peaknet.rescue_height=25",
                     "spotfinder.threshold.peaknet.faint_support=0",
                     "spotfinder.threshold.peaknet.device=cpu")
    engine = _build_predictor(PeakNetSettings.from_params(params))
    assert (engine.peak_params.rescue_prob, engine.peak_params.rescue_height) == (0.4, 25.0)
    assert engine.peak_params.faint_support == 0
    assert (default.precision, engine.precision) == (DEFAULTS.precision, "fp32")
    bf16 = _params(phil_scope, "spotfinder.threshold.peaknet.precision=bf16",
                   "spotfinder.threshold.peaknet.device=cpu")
    assert _build_predictor(PeakNetSettings.from_params(bf16)).precision == "bf16"


def test_min_snr_removes_weak_predicted_spots_only(dials_modules, cspad_panel) -> None:
    """The SNR and height cuts drop whole predicted spots (never parts of one) and keep the
    strong ones (the frame-level faint-peak rule off, to see the cuts alone: on one panel of a
    still its few tall spots would leave neither run any faint one; then the rule on, which
    only ever takes whole spots away)."""
    from scipy import ndimage

    from peaknet_xtal.finding.settings import DEFAULTS

    _, phil_scope = dials_modules
    data, mask = cspad_panel
    pixels = data.astype(np.float32)
    # the library's default: one set of defaults for every entry point (settings.py)
    settings = _ext(phil_scope, 0.3).settings
    assert (settings.min_snr, settings.min_height) == (DEFAULTS.min_snr, DEFAULTS.min_height)
    every = _ext(phil_scope, 0.3, dilation=0, min_snr=0, min_height=0,
                 faint_support=0).peak_pixels(pixels, mask)
    strong = _ext(phil_scope, 0.3, dilation=0, faint_support=0).peak_pixels(pixels, mask)
    assert strong.any() and strong.sum() < every.sum()
    labels, _ = ndimage.label(every, np.ones((3, 3), bool))
    for spot in np.unique(labels[strong]):  # every kept spot is kept whole
        assert strong[labels == spot].all()
    default = _ext(phil_scope, 0.3, dilation=0).peak_pixels(pixels, mask)
    assert default.any() and not (default & ~strong).any()
    for spot in np.unique(labels[default]):
        assert default[labels == spot].all()


def test_gain_puts_shot_noise_into_the_snr_cut(dials_modules, cspad_panel) -> None:
    """peaknet.adu_per_photon is the counts per photon of the image DIALS hands over: a larger
    gain means fewer photons behind each count, so fewer predicted spots pass min_snr; 0 counts
    background noise only; unset, the image counts photons (dxtbx divided by the format's
    gain)."""
    _, phil_scope = dials_modules
    data, mask = cspad_panel
    pixels = data.astype(np.float32)
    assert _ext(phil_scope, 0.3).settings.adu_per_photon is None
    counts = [_ext(phil_scope, 0.3, dilation=0, gain=g).peak_pixels(pixels, mask).sum()
              for g in (0, 1, 30)]
    assert counts[0] >= counts[1] > counts[2] > 0
    unset = _ext(phil_scope, 0.3, dilation=0).peak_pixels(pixels, mask)
    assert np.array_equal(unset, _ext(phil_scope, 0.3, dilation=0, gain=1).peak_pixels(pixels,
                                                                                          mask))


def test_spots_whose_values_sum_to_zero_or_less_are_dropped() -> None:
    """A faint spot on a zero background plus its read-noise rim can sum below zero; DIALS would
    give it a zero centroid variance, which stops refinement."""
    from peaknet_xtal.finding.peaks import positive_spots as _positive_spots

    pixels = np.full((12, 12), -0.3, np.float32)
    pixels[2:5, 2:5] = 2.0  # a real spot: positive sum
    pixels[8, 8] = 1.0  # a faint one whose 3x3 footprint sums to 1 - 8 * 0.3 < 0
    foreground = np.zeros((12, 12), bool)
    foreground[1:6, 1:6] = True
    foreground[7:10, 7:10] = True
    kept = _positive_spots(pixels, foreground)
    assert kept[1:6, 1:6].all() and not kept[7:10, 7:10].any()
    assert not _positive_spots(pixels, np.zeros((12, 12), bool)).any()


def test_dilation_grows_each_spot_by_a_rim_within_the_mask(dials_modules, cspad_panel) -> None:
    """dilation=1 turns each predicted core into core + one-pixel rim, never into masked pixels
    and never into another core's rim: DIALS then labels each core as a spot of its own."""
    from scipy import ndimage

    _, phil_scope = dials_modules
    data, mask = cspad_panel
    mask = mask.copy()
    mask[:, :10] = False
    # A low probability cut makes sure there are cores to grow on this panel.
    core = _ext(phil_scope, 0.05, dilation=0).peak_pixels(data.astype(np.float32), mask)
    grown = _ext(phil_scope, 0.05, dilation=1).peak_pixels(data.astype(np.float32), mask)
    assert core.any()
    plain = ndimage.binary_dilation(core, np.ones((3, 3), bool)) & mask
    assert (grown >= core).all() and not (grown & ~plain).any()
    assert grown.sum() > core.sum() and not grown[~mask].any()
    eight = np.ones((3, 3), bool)
    spots, n = ndimage.label(grown, eight)
    cores, _ = ndimage.label(core, eight)
    assert all(len(np.unique(cores[(spots == k) & core])) == 1 for k in range(1, n + 1))
    # these close cores joined when grown together; where no core is near, the rim is whole
    assert ndimage.label(plain, eight)[1] < n
    big = np.iinfo(np.int32).max
    highest = ndimage.maximum_filter(cores, size=7)
    lowest = ndimage.minimum_filter(np.where(cores > 0, cores, big), size=7)
    lone = core & (highest == lowest)  # no other core within 3 px
    lonely = ndimage.binary_dilation(lone, eight) & mask
    assert lone.any() and np.array_equal(grown[lonely], plain[lonely])


def test_running_out_of_memory_is_dials_user_error_saying_what_to_lower(
        dials_modules, cspad_panel, monkeypatch) -> None:
    """Torch's allocator failing inside the model (a real allocation failure) is DIALS' user
    error naming the settings to lower, not a crash DIALS asks to have reported (a user trial
    under a memory limit: 120 lines ending in "Please report this error to dials-support")."""
    import torch
    from dxtbx import flumpy
    from libtbx.utils import Sorry

    from peaknet_xtal.finding.engine import InferenceEngine

    def starved(self, *args, **kwargs):
        torch.empty(2 ** 50, dtype=torch.uint8)

    monkeypatch.setattr(InferenceEngine, "_segment", starved)
    _, phil_scope = dials_modules
    data, mask = cspad_panel
    with pytest.raises(Sorry, match=r"^peaknet: out of memory: .*can't allocate memory.*"
                                    r"peaknet\.tile_size=1024.*mp\.nproc"):
        _ext(phil_scope, 0.5).compute_threshold(flumpy.from_numpy(data),
                                                flumpy.from_numpy(mask), imageset=None,
                                                i_panel=0)


def test_result_is_flex_bool_within_the_mask(dials_modules, cspad_panel) -> None:
    """The returned mask has the panel's shape and never marks a pixel DIALS masked out."""
    from dxtbx import flumpy
    from scitbx.array_family import flex

    _, phil_scope = dials_modules
    data, mask = cspad_panel
    mask = mask.copy()
    mask[:, : mask.shape[1] // 2] = False  # mask out the left half, spots included
    ext = _ext(phil_scope, 0.5)
    result = ext.compute_threshold(flumpy.from_numpy(data), flumpy.from_numpy(mask),
                                   imageset=None, i_panel=0)
    assert isinstance(result, flex.bool)
    assert result.all() == data.shape
    peaks = flumpy.to_numpy(result)
    assert not peaks[~mask].any()

    # Threshold 0 keeps every pixel the model may see: the result is then exactly the mask.
    everything = _ext(phil_scope, 0.0).compute_threshold(
        flumpy.from_numpy(data), flumpy.from_numpy(mask), imageset=None, i_panel=0)
    assert np.array_equal(flumpy.to_numpy(everything), mask)

    # A fully masked panel costs no model call and gives nothing.
    none = ext.compute_threshold(flumpy.from_numpy(data),
                                 flumpy.from_numpy(np.zeros_like(mask)), imageset=None, i_panel=0)
    assert none.count(True) == 0


def test_pickle_round_trip_is_small_and_drops_the_model(dials_modules, cspad_panel) -> None:
    """DIALS pickles the extension into each worker: only the settings may travel (with the
    few PHIL values DIALS makes its mask and work split from, a few kB at most)."""
    from dxtbx import flumpy

    from peaknet_dials import spotfinder_threshold_ext as module

    _, phil_scope = dials_modules
    data, mask = cspad_panel
    ext = _ext(phil_scope, 0.5)
    before = ext.compute_threshold(flumpy.from_numpy(data), flumpy.from_numpy(mask),
                                   imageset=None, i_panel=3)
    assert ext.settings in module._PREDICTORS  # the model is loaded and cached per process
    blob = pickle.dumps(ext)
    assert len(blob) < 10_000, f"pickled extension is {len(blob)} bytes: the model travelled"
    clone = pickle.loads(blob)
    assert clone.settings == ext.settings
    after = clone.compute_threshold(flumpy.from_numpy(data), flumpy.from_numpy(mask),
                                    imageset=None, i_panel=3)
    assert np.array_equal(flumpy.to_numpy(before), flumpy.to_numpy(after))


def test_shape_mismatch_is_a_clear_error(dials_modules) -> None:
    from dxtbx import flumpy

    _, phil_scope = dials_modules
    ext = _ext(phil_scope, 0.5)
    with pytest.raises(ValueError, match="panel 7 image shape"):
        ext.compute_threshold(flumpy.from_numpy(np.zeros((4, 5))),
                              flumpy.from_numpy(np.ones((5, 4), dtype=bool)), i_panel=7)


def test_missing_model_fails_at_start_up_naming_it(dials_modules, tmp_path) -> None:
    """A wrong model path is reported when DIALS builds the finder, not deep in a worker, as
    DIALS' user error (Sorry: printed as one line, not as a crash to report)."""
    from libtbx.utils import Sorry

    factory, phil_scope = dials_modules
    missing = tmp_path / "nowhere.safetensors"
    params = _params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                     f"spotfinder.threshold.peaknet.model={missing}")
    with pytest.raises(Sorry, match="nowhere.safetensors.*model not found"):
        factory.configure_threshold(params)
    # a name that is not a model's: the forms a model takes are said
    params = _params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                     "spotfinder.threshold.peaknet.model=no-such-model")
    with pytest.raises(Sorry, match=r"no-such-model: PeakNet model not found .*'default' for "
                                    r"the shipped model"):
        factory.configure_threshold(params)
    # an architecture's name (it was "not found"): it has no weights, as peaknet2cxi says
    params = _params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                     "spotfinder.threshold.peaknet.model=tiny")
    with pytest.raises(Sorry, match=r"tiny: is a model architecture .* without trained weights"
                                    r".*'default' for the shipped model "
                                    r"\(spotfinder\.threshold\.peaknet\.model\)$"):
        factory.configure_threshold(params)
    # a folder without weights: what is wrong with it, and the setting that named it
    params = _params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                     f"spotfinder.threshold.peaknet.model={tmp_path}")
    with pytest.raises(Sorry, match=r"safetensors.*\(spotfinder\.threshold\.peaknet\.model\)$"):
        factory.configure_threshold(params)


def test_a_plugin_model_that_downsamples_fails_at_start_up_naming_it(dials_modules, tmp_path,
                                                                     install_plugin) -> None:
    """Weights of a plugin model whose output is smaller than its input passed the start-up
    check and failed on the first image, inside a DIALS worker; now the start-up check (the
    one every host makes) refuses them, as DIALS' user error naming the file and setting."""
    from libtbx.utils import Sorry
    from peaknet_test_support import halving_family, unchecked_weights

    factory, phil_scope = dials_modules
    install_plugin("halving", halving_family(2))
    weights = unchecked_weights("halving", "my-halving", tmp_path / "run")
    params = _params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                     f"spotfinder.threshold.peaknet.model={weights.parent}")
    with pytest.raises(Sorry, match=(
            r"^peaknet: .*model\.safetensors: model family 'halving' .* returned "
            r"\(1, 2, 32, 34\); .*\(spotfinder\.threshold\.peaknet\.model\)$")):
        factory.configure_threshold(params)


def test_unusable_device_fails_at_start_up_naming_it(dials_modules) -> None:
    """A device the model cannot run on is DIALS' user error when DIALS builds the finder (before
    any image, in the main process), naming the setting and the devices there are; settings
    that reach the engine some other way (unpickled in a worker) fail the same way, not as a
    crash to report.  ``auto`` and ``cpu`` always work."""
    import torch
    from libtbx.utils import Sorry

    from peaknet_dials.spotfinder_threshold_ext import (
        PeakNetSettings,
        PeakNetSpotFinderThresholdExt,
        check_device,
    )

    factory, phil_scope = dials_modules
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = "auto, cpu" + "".join([", cuda"] + [f", cuda:{i}" for i in range(n_gpus)]
                                      if n_gpus else [])
    check_device("auto")
    check_device("cpu")
    setting = r"\(spotfinder\.threshold\.peaknet\.device\)"
    for spec, why in (("gpu", "not a device torch knows"), ("cuda:x", "not a device torch knows"),
                      ("meta", "not a device PeakNet runs on"),
                      (f"cuda:{n_gpus}", f"torch sees {n_gpus} CUDA GPU" if n_gpus else
                       "torch sees no CUDA GPU")):
        with pytest.raises(Sorry, match=f"^peaknet: device '{spec}' {setting}: {why}.*; "
                                        f"available here: {available}$"):
            check_device(spec)
    if n_gpus:
        return  # device=cuda is usable here
    params = _params(phil_scope, "spotfinder.threshold.algorithm=peaknet",
                     "spotfinder.threshold.peaknet.device=cuda")
    with pytest.raises(Sorry, match="device 'cuda' .*no CUDA GPU; available here: auto, cpu$"):
        factory.configure_threshold(params)
    ext = PeakNetSpotFinderThresholdExt.__new__(PeakNetSpotFinderThresholdExt)
    ext.__setstate__({"settings": {**PeakNetSettings().__dict__, "device": "cuda"}})
    with pytest.raises(Sorry, match="device 'cuda' .*no CUDA GPU"):
        ext.peak_pixels(np.zeros((8, 8), np.float32), np.ones((8, 8), bool))


def test_phil_defaults_are_the_shared_finding_defaults(dials_modules) -> None:
    """The PHIL defaults are generated from peaknet_xtal.finding.settings.DEFAULTS, so the DIALS
    plugin, the library and peaknet2cxi cannot drift apart."""
    from peaknet_xtal.finding.settings import DEFAULTS

    _, phil_scope = dials_modules
    scope = _params(phil_scope).spotfinder.threshold.peaknet
    for name in ("model", "device", "threshold", "batch_size", "dilation", "tile_size"):
        assert getattr(scope, name) == getattr(DEFAULTS, name), name
    assert scope.min_snr == DEFAULTS.min_snr
    assert scope.adu_per_photon is None  # settings.resolve_gain: the corrected image's 1


def test_whole_image_is_found_in_one_batched_run(dials_modules, real_data, monkeypatch) -> None:
    """DIALS asks panel by panel; with the imageset it passes, every panel of the image goes
    through the model in one run (batch_size counts tiles across panels), with the same answer
    per panel as finding each panel alone, and a panel whose mask is not the one DIALS makes
    from its parameters (here: one changed by hand) is found alone."""
    from dxtbx import flumpy
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_dials import spotfinder_threshold_ext as module

    _, phil_scope = dials_modules
    imageset = ExperimentListFactory.from_filenames([str(real_data / CSPAD)]).imagesets()[0]
    data, masks = imageset.get_corrected_data(0), list(imageset.get_mask(0))
    masks[5] = masks[5] & flex_false_corner(flumpy, masks[5])
    # What is compared is batching: a stated gain (not one measured on different pixels), and
    # no per-frame spike decision (it looks at the frame's strong spots: a whole CSPAD image has
    # many, one panel few; tests/finding/test_defects.py covers it)
    from peaknet_xtal.finding.defects import DefectFilter

    monkeypatch.setattr(DefectFilter, "keep",
                        lambda self, peaks, panels, masks=None, spikes=None:
                        np.ones(len(peaks), bool))
    ext = _ext(phil_scope, 0.5, gain=25.0)
    runs: list[int] = []
    original = module.PeakNetSpotFinderThresholdExt._foreground

    def counted(self, panels, goods, source=None, i_panel=None, **options):
        runs.append(len(panels))
        return original(self, panels, goods, source, i_panel, **options)

    monkeypatch.setattr(module.PeakNetSpotFinderThresholdExt, "_foreground", counted)
    batched = [flumpy.to_numpy(ext.compute_threshold(d, m, imageset=imageset, i_panel=i))
               for i, (d, m) in enumerate(zip(data, masks, strict=True))]
    assert runs[0] == len(data) and runs[1:] == [1]  # the whole image, then panel 5 alone
    alone = [flumpy.to_numpy(ext.compute_threshold(d, m, imageset=None, i_panel=i))
             for i, (d, m) in enumerate(zip(data, masks, strict=True))]
    assert sum(a.sum() for a in alone) > 100
    assert all(np.array_equal(b, a) for b, a in zip(batched, alone, strict=True))


def test_a_worker_handed_a_later_block_finds_its_images_whole(dials_modules, real_data,
                                                            monkeypatch) -> None:
    """With ``spotfinder.mp.nproc=2`` DIALS hands each worker process a block of an imageset's
    images with a fresh copy of the extension, and does not say which image a panel is of: a
    block that starts past the first image is found as whole images too (one batched run per
    image), not panel by panel, so a spot does not depend on the worker that found it."""
    from dxtbx.imageset import ImageSetFactory

    from peaknet_dials import spotfinder_threshold_ext as module

    _, phil_scope = dials_modules
    stills = sorted((real_data / "cspad_thermolysin_stills").glob("*.cbf"))
    imageset = ImageSetFactory.make_imageset([str(s) for s in stills])
    assert len(imageset) == 2
    params = _params(phil_scope, "spotfinder.mp.nproc=2", "spotfinder.threshold.peaknet.device=cpu",
                     "spotfinder.threshold.peaknet.threads=1")
    worker = pickle.loads(pickle.dumps(module.PeakNetSpotFinderThresholdExt(params)))
    runs: list[int | None] = []
    original = module.PeakNetSpotFinderThresholdExt._foreground

    def counted(self, panels, goods, source=None, i_panel=None, **options):
        runs.append(i_panel)
        return original(self, panels, goods, source, i_panel, **options)

    monkeypatch.setattr(module.PeakNetSpotFinderThresholdExt, "_foreground", counted)
    data, masks = imageset.get_corrected_data(1), imageset.get_mask(1)  # the second block
    found = [worker.compute_threshold(d, m, imageset=imageset, i_panel=i)
             for i, (d, m) in enumerate(zip(data, masks, strict=True))]
    assert runs == [None]  # one whole-image run, no panel found alone
    assert sum(f.count(True) for f in found) > 100


def flex_false_corner(flumpy, mask):
    """A copy of a flex.bool mask with its top-left 8x8 pixels masked out."""
    array = flumpy.to_numpy(mask).copy()
    array[:8, :8] = False
    return flumpy.from_numpy(array)


@pytest.mark.slow
def test_a_sequence_is_read_ahead_as_peaknet2cxi_reads_a_run(dials_modules, real_data,
                                                            monkeypatch) -> None:
    """On a sequence's first image the plugin counts that image and the next ones (as many as
    the defect filter needs) before finding it, so hot pixels are known on a scan's first
    images too; each later image is then found without being counted twice.  The counts equal
    those of the engine reading the same images as one run (the real thaumatin grid, an
    ImageSequence of ten Pilatus 6M images)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from peaknet_dials import spotfinder_threshold_ext as module
    from peaknet_xtal.finding import InferenceEngine
    from peaknet_xtal.formats.dxtbx_images import image_arrays
    from peaknet_xtal.types import Frame

    _, phil_scope = dials_modules
    files = sorted((real_data / "pilatus6m_thaumatin_grid").glob("*.cbf.bz2"))
    (sequence,) = ExperimentListFactory.from_filenames([str(f) for f in files]).imagesets()
    assert len(sequence) == 10
    monkeypatch.setattr(module, "_PREDICTORS", {})  # a new process's engine
    ext = _ext(phil_scope, 0.5)
    engine = module.get_predictor(ext.settings)
    learning = engine.defects.learning
    for index in range(learning + 1):
        data, masks = sequence.get_corrected_data(index), sequence.get_mask(index)
        for i_panel, (d, m) in enumerate(zip(data, masks, strict=True)):
            ext.compute_threshold(d, m, imageset=sequence, i_panel=i_panel)
        if index == 0:  # read ahead: the first five images counted before the first is found
            assert engine.defects.tracker.frames == learning
            assert engine.defects.pending == learning - 1
    assert engine.defects.tracker.frames == learning + 1 and engine.defects.pending == 0
    run = InferenceEngine(predictor=lambda panels, goods: [np.zeros(p.shape, np.float32)
                                                           for p in panels])
    frames = [Frame(panels=panels, masks=goods)
              for panels, goods in (image_arrays(sequence, i) for i in range(learning + 1))]
    list(run.find_frames(frames))
    assert all(np.array_equal(a, b) for a, b in zip(engine.defects.tracker.counts,
                                                    run.defects.tracker.counts, strict=True))


def test_panels_found_alone_keep_their_own_defect_runs(dials_modules, monkeypatch) -> None:
    """Where DIALS' panels come alone (no imageset; a region of interest or a user mask DIALS
    folded in does the same), each panel's pixel defects are tracked across images by a filter
    of its own: a hot pair on one panel of four is foreground until five images were seen, then
    a defect.  Counted as one run, the four panels would share one counter per pixel, the pair
    would spike in one "frame" of four and stay foreground."""
    from dxtbx import flumpy

    from peaknet_dials import spotfinder_threshold_ext as module
    from peaknet_xtal.finding import InferenceEngine

    _, phil_scope = dials_modules
    ext = _ext(phil_scope, 0.5)

    def bright(panels, goods):
        return [(np.asarray(p) > 60).astype(np.float32) for p in panels]

    monkeypatch.setattr(module, "_PREDICTORS",
                        {ext.settings: InferenceEngine(predictor=bright, adu_per_photon=1.0)})
    monkeypatch.setattr(module, "_PANEL_DEFECTS", {})
    rng = np.random.default_rng(0)
    hot_pair_found = []
    for _ in range(8):
        panels = [rng.poisson(10.0, (40, 50)).astype(float) for _ in range(4)]
        panels[2][20, 30:32] = 200.0
        good = flumpy.from_numpy(np.ones((40, 50), bool))
        foreground = [flumpy.to_numpy(ext.compute_threshold(flumpy.from_numpy(p), good,
                                                            imageset=None, i_panel=i))
                      for i, p in enumerate(panels)]
        hot_pair_found.append(bool(foreground[2][20, 30:32].any()))
    assert hot_pair_found == [True] * 4 + [False] * 4
    assert sorted(k[1] for k in module._PANEL_DEFECTS) == [0, 1, 2, 3]


def test_the_gain_line_says_what_dxtbx_did_with_the_formats_gain(dials_modules, tmp_path,
                                                                  caplog) -> None:
    """An ADSC image declares 2.4 ADU per photon; dxtbx hands it over divided by that, so the
    peak SNRs count shot noise at 1 per photon.  DIALS' log said "a detector gain of 1 ... as
    the images declare", which the images do not: it now names the format's 2.4 and that dxtbx
    divided the images by it.  A truncated image is a Sorry naming the file."""
    from dxtbx.model.experiment_list import ExperimentListFactory
    from libtbx.utils import Sorry
    from peaknet_test_support import tiny_smv

    _, phil_scope = dials_modules
    photons = np.random.default_rng(9).poisson(20, (48, 48))
    image = tiny_smv(tmp_path / "adsc_001.img", np.round(40 + 2.4 * photons), gain=2.4,
                     pedestal=40)
    (imageset,) = ExperimentListFactory.from_filenames([str(image)]).imagesets()
    ext = _ext(phil_scope, 0.5)
    with caplog.at_level("DEBUG", logger="dials"):
        ext.compute_threshold(imageset.get_corrected_data(0)[0], imageset.get_mask(0)[0],
                              imageset=imageset, i_panel=0)
    (line,) = [r.getMessage() for r in caplog.records if "peak SNRs" in r.getMessage()]
    assert "detector gain of 1 counts per photon" in line, line
    assert "divided them by the 2.4 ADU per photon the format declares" in line, line
    assert "as the images declare" not in line

    cut = tmp_path / "cut_001.img"
    cut.write_bytes(image.read_bytes()[:-100])
    (short,) = ExperimentListFactory.from_filenames([str(cut)]).imagesets()
    with pytest.raises(Sorry, match=f"peaknet: {cut}: truncated"):
        ext.compute_threshold(short.get_corrected_data(0)[0], short.get_mask(0)[0],
                              imageset=short, i_panel=0)


def test_dials_log_names_the_package_version_and_the_model_weights(dials_modules, caplog,
                                                                    monkeypatch) -> None:
    """DIALS' log said which algorithm found the spots, not which code and weights (a user
    trial); it now names both, once a process and model, as peaknet2cxi's run record does."""
    import peaknet_xtal
    from peaknet_dials import spotfinder_threshold_ext as ext
    from peaknet_xtal.model.weights_io import model_digest

    monkeypatch.setattr(ext, "_MODELS_SAID", set())
    monkeypatch.setattr(peaknet_xtal, "__version__", "9.8.7")
    factory, phil_scope = dials_modules
    with caplog.at_level("INFO", logger="dials"):
        for _ in range(2):
            _ext(phil_scope, 0.5)
    said = [r.getMessage() for r in caplog.records if "peaknet-xtal" in r.getMessage()]
    assert said == [f"peaknet: peaknet-xtal 9.8.7, model default (weights SHA-256 "
                    f"{model_digest('default')})"], said
