"""The inference engine: tiling, batching across frames and panels, determinism, pickling."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from torch import nn

from peaknet_xtal.finding.engine import InferenceEngine, resolve_device, tile_panel
from peaknet_xtal.finding.peaks import PeakParams
from peaknet_xtal.model.zoo import create_model
from peaknet_xtal.types import PEAK_DTYPE, Frame

torch.set_num_threads(1)


class PixelwiseLogits(nn.Module):
    """A real torch module whose peak logit is the pixel value itself (background logit 0).

    Being pointwise, its exact output is known for every pixel, so any slip in padding, tiling,
    stitching, grouping or batch bookkeeping shows up as a wrong probability.  It counts calls
    and batch sizes so the batching can be checked too.  Like PeakNet it declares the multiple
    its input sides must have, which the engine pads tiles to.
    """

    pad_multiple = 32

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.batches: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.batches.append(tuple(x.shape))
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
        peak = torch.where(mask, x * self.scale, torch.full_like(x, -30.0))
        return torch.cat([torch.zeros_like(x), peak], dim=1)


def test_tiles_of_a_large_panel_are_no_larger_than_the_cover_needs():
    """A Pilatus 6M panel in 1024-px tiles: three a side either way, but 864 x 896 px each, so
    the model sees 1.12x the panel's pixels instead of 1.54x; sides stay multiples of 32 and
    neighbours still share at least the overlap."""
    tiles = tile_panel((2527, 2463), 1024, 64)
    assert len(tiles) == 9
    assert {(-(-h // 32) * 32, -(-w // 32) * 32) for _, _, h, w, _ in tiles} == {(896, 864)}
    assert sum(h * w for _, _, h, w, _ in tiles) / (2527 * 2463) < 1.15
    rows = sorted({(y0, h) for y0, _, h, _, _ in tiles})
    assert all(a + h - b >= 64 for (a, h), (b, _) in zip(rows, rows[1:], strict=False))


@pytest.mark.parametrize("shape", [(2527, 2463), (1920, 1920), (1030, 4100), (2049, 64)])
def test_tiles_start_on_the_model_grid_and_pad_to_the_panels_end(shape):
    """A strided network computes the same features for a pixel only on the same 32-px grid:
    every tile starts on it, and a tile reaching the panel's end is padded to where the whole
    panel would be."""
    for size, overlap in ((1024, 64), (640, 384), (256, 32)):
        for y0, x0, h, w, _ in tile_panel(shape, size, overlap):
            assert y0 % 32 == 0 and x0 % 32 == 0
            for start, extent, length in ((y0, h, shape[0]), (x0, w, shape[1])):
                if start + extent < length:  # inside the panel: unpadded, on the grid
                    assert extent % 32 == 0 or extent == length
                else:
                    assert start + -(-extent // 32) * 32 == -(-length // 32) * 32


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@pytest.mark.parametrize("shape", [(1, 1), (185, 388), (1000, 1000), (1024, 3000), (2049, 64)])
def test_tile_cores_partition_the_panel(shape):
    cover = np.zeros(shape, int)
    for y0, x0, h, w, (ys, xs) in tile_panel(shape, 1024, 64):
        assert h <= 1024 and w <= 1024 and y0 + h <= shape[0] and x0 + w <= shape[1]
        assert y0 <= ys.start and ys.stop <= y0 + h and x0 <= xs.start and xs.stop <= x0 + w
        # cut edges (not panel edges) stay at least overlap/2 away from the kept core
        assert ys.start == 0 or ys.start - y0 >= 32
        assert xs.start == 0 or xs.start - x0 >= 32
        cover[ys, xs] += 1
    assert np.all(cover == 1)


def test_stitched_tiles_and_padding_reproduce_a_pointwise_model_exactly():
    rng = np.random.default_rng(1)
    panels = [rng.normal(0, 2, s).astype(np.float32)
              for s in [(185, 194), (194, 185), (185, 194), (300, 700)]]
    masks = [np.ones(p.shape, bool) for p in panels]
    masks[1][10:20, 30:40] = False
    model = PixelwiseLogits()
    engine = InferenceEngine(model, device="cpu", batch_size=2, tile_size=256, tile_overlap=32)
    probs = engine.predict_panels(panels, masks)
    for panel, mask, prob in zip(panels, masks, probs, strict=False):
        assert prob.dtype == np.float32 and prob.shape == panel.shape
        np.testing.assert_allclose(prob, np.where(mask, sigmoid(panel), 0), atol=1e-6)
    # 2 panels of one padded shape, 1 of another, 2x3 tiles of the big one, each no larger than
    # the cover needs (300 = 2 tiles of 166 -> 192 with 32 shared; 700 = 3 of 256); batches <= 2
    shapes = sorted(model.batches)
    assert shapes == sorted([(2, 1, 192, 224), (1, 1, 224, 192)]
                            + [(2, 1, 192, 256)] * 3)


def test_find_frames_batches_across_frames_and_keeps_order():
    model = PixelwiseLogits()
    engine = InferenceEngine(model, device="cpu", batch_size=4, threshold=0.9, min_peaks=2)
    frames = []
    rng = np.random.default_rng(0)
    for k in range(6):
        # a background with noise: a panel of one value is no data (finding/sanitise.py)
        panels = [rng.normal(-10.0, 0.1, (40, 50)).astype(np.float32) for _ in range(2)]
        for j in range(k % 3):  # 0, 1 or 2 peaks on panel 1
            panels[1][10 + 5 * j, 20] = 10.0
        frames.append(Frame(panels=panels, source="run.cxi", event=f"//{k}", serial=k))
    results = list(engine.find_frames(iter(frames)))
    assert [r.frame.event for r in results] == [f"//{k}" for k in range(6)]
    assert [len(r.peaks) for r in results] == [0, 1, 2, 0, 1, 2]
    assert [r.hit for r in results] == [False, False, True, False, False, True]
    assert all(r.peaks.dtype == PEAK_DTYPE and r.prob_maps is None for r in results)
    assert results[2].peaks["panel"].tolist() == [1, 1]
    # 2 frames x 2 panels fill a batch of 4 tiles: 3 model calls of 4 tiles each
    assert model.batches == [(4, 1, 64, 64)] * 3


def test_injected_predictor_receives_all_panels_of_a_chunk():
    calls = []

    def threshold_image(panels, masks):
        calls.append(len(panels))
        return [(p > 5).astype(np.float32) for p in panels]

    engine = InferenceEngine(predictor=threshold_image, batch_size=3, keep_prob_maps=True)
    frames = [Frame(panels=[np.zeros((8, 8), np.float32)] * 2, event=f"//{k}") for k in range(3)]
    frames[1].panels[0] = frames[1].panels[0].copy()
    frames[1].panels[0][3, 4] = 100.0  # 100 counts on an empty background: SNR 10
    results = list(engine.find_frames(frames))
    assert calls == [4, 2]  # 2 frames (4 tiles >= 3), then the last frame
    assert (results[1].peaks["fs"][0], results[1].peaks["ss"][0]) == (4.0, 3.0)
    assert results[1].prob_maps[0][3, 4] == 1.0
    assert not engine.loaded  # a predictor never loads the model


def test_real_network_is_deterministic_and_batch_size_independent():
    torch.manual_seed(0)
    model = create_model("yocto")
    rng = np.random.default_rng(2)
    panels = [rng.poisson(3, (96, 130)).astype(np.float32) for _ in range(5)]
    first = InferenceEngine(model, device="cpu", batch_size=4).predict_panels(panels)
    again = InferenceEngine(model, device="cpu", batch_size=4).predict_panels(panels)
    single = InferenceEngine(model, device="cpu", batch_size=1).predict_panels(panels)
    for a, b, c in zip(first, again, single, strict=False):
        assert np.array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-5)
        assert 0.0 <= a.min() and a.max() <= 1.0


def test_engine_pickles_without_its_model_and_loads_lazily():
    engine = InferenceEngine("default", device="cpu", threads=1, threshold=0.7)
    assert not engine.loaded
    clone = pickle.loads(pickle.dumps(engine))
    assert not clone.loaded and clone.peak_params.threshold == 0.7
    assert clone.describe()["model"] == "default"


def test_devices_and_bad_settings():
    assert str(resolve_device("cpu")) == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="batch_size"):
        InferenceEngine(batch_size=0)
    with pytest.raises(ValueError, match="tile_overlap"):
        InferenceEngine(tile_size=64, tile_overlap=64)
    with pytest.raises(ValueError, match="grid"):  # tiles must advance by a grid cell at least
        InferenceEngine(tile_size=64, tile_overlap=40)
    with pytest.raises(ValueError, match="grid"):
        tile_panel((100, 300), 64, 40)
    params = InferenceEngine(peak_params=PeakParams(max_peaks=5), threshold=0.2).peak_params
    assert (params.threshold, params.max_peaks) == (0.2, 5)


def test_a_bad_weights_file_is_refused_when_the_engine_is_made(tmp_path):
    """Missing, damaged and non-weights files are one FormatError naming the file as the engine
    (so PeakFinder, peaknet2cxi, the Ray workers) is made, not at its first frame."""
    from peaknet_xtal.errors import FormatError
    from peaknet_xtal.finding import PeakFinder

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    for spec in (tmp_path / "missing.safetensors", damaged, tmp_path):
        with pytest.raises(FormatError) as caught:
            InferenceEngine(str(spec))
        assert str(spec) in str(caught.value)
        with pytest.raises(FormatError):
            PeakFinder(model=spec)
    assert not InferenceEngine("default").loaded  # checked, not built


def test_a_plugin_model_that_downsamples_is_refused_when_the_engine_is_made(install_plugin,
                                                                            tmp_path):
    """Found by a plugin author: weights of a plugin model whose output is smaller than its
    input were taken when the engine was made and refused at its first frame, as the network
    was built (after peaknet2cxi had opened its inputs and written to its output folder).  Now
    the engine, and PeakFinder over it, refuse them as they are made, naming the file and what
    is wrong; the model is still loaded on first use only."""
    from peaknet_test_support import halving_family, unchecked_weights

    from peaknet_xtal.finding import PeakFinder
    from peaknet_xtal.registry import PluginError

    install_plugin("halving", halving_family(2))
    weights = unchecked_weights("halving", "my-halving", tmp_path / "run")
    says = (rf"^{re.escape(str(weights))}: model family 'halving' .*, model 'my-halving': "
            r"model\(image \(1, 1, 33, 35\), mask\) returned \(1, 2, 32, 34\); ")
    with pytest.raises(PluginError, match=says):
        InferenceEngine(str(weights))
    with pytest.raises(PluginError, match=says):
        PeakFinder(model=weights.parent)


def test_mask_shape_mismatch_names_the_panel():
    engine = InferenceEngine(predictor=lambda p, m: [np.zeros(x.shape) for x in p])
    with pytest.raises(ValueError, match="panel 1"):
        engine.predict_panels([np.zeros((4, 4)), np.zeros((4, 4))],
                              [np.ones((4, 4), bool), np.ones((4, 5), bool)])


def test_default_model_loads_lazily_on_first_use_and_predicts():
    """The real ``load_model("default")`` path (trained or seed-0 weights): plumbing, not quality.
    """
    engine = InferenceEngine("default", device="cpu", threads=1)
    assert not engine.loaded
    image = np.random.default_rng(4).poisson(5, (64, 96)).astype(np.float32)
    (prob,) = engine.predict_panels([image])
    assert engine.loaded and prob.shape == image.shape and np.all((prob >= 0) & (prob <= 1))
    clone = pickle.loads(pickle.dumps(engine))
    assert not clone.loaded
    np.testing.assert_array_equal(clone.predict_panels([image])[0], prob)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_matches_cpu_and_is_deterministic():
    torch.manual_seed(0)
    model = create_model("yocto")
    rng = np.random.default_rng(5)
    panels = [rng.poisson(3, (185, 388)).astype(np.float32) for _ in range(6)]
    cpu = InferenceEngine(model, device="cpu").predict_panels(panels)
    gpu = InferenceEngine(model, device="cuda", batch_size=4)
    first, again = gpu.predict_panels(panels), gpu.predict_panels(panels)
    for a, b, c in zip(first, again, cpu, strict=False):
        assert np.array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_the_default_model_on_cuda_finds_the_peaks_it_finds_on_the_cpu():
    """The shipped model's whole path on a GPU (whole-panel local normalisation, tiling of a
    panel larger than a tile, float32 model, stitching, peaks) against the CPU's fused form."""
    rng = np.random.default_rng(6)
    image = rng.poisson(2.0, (1100, 700)).astype(np.float32)
    yy, xx = np.mgrid[-3:4, -3:4]
    for y, x in rng.integers(8, (1092, 692), (40, 2)):
        image[y - 3:y + 4, x - 3:x + 4] += 80 * np.exp(-(yy ** 2 + xx ** 2) / 2.0)
    found = {}
    for device in ("cpu", "cuda"):
        engine = InferenceEngine("default", device=device, threads=1, adu_per_photon=1.0)
        (result,) = engine.find_frames([Frame(panels=[image])])
        found[device] = np.stack([result.peaks["ss"], result.peaks["fs"]], 1)
    cpu, gpu = found["cpu"], found["cuda"]
    assert len(cpu) >= 30 and abs(len(gpu) - len(cpu)) <= 1
    # TF32 convolutions may move a border pixel in or out of a spot, nothing more
    nearest = np.sqrt(((gpu[:, None] - cpu[None]) ** 2).sum(-1)).min(1)
    assert np.all(nearest < 0.5) and np.mean(nearest < 0.05) >= 0.9


def test_bf16_runs_the_network_in_bfloat16_and_finds_the_same_peaks():
    """precision bf16: the network under bfloat16 autocast (its probabilities move by bf16
    rounding, so it did run so), everything around it float32; planted spots are found where
    float32 finds them.  A CUDA device gets the GPU's own check (see the CUDA tests)."""
    rng = np.random.default_rng(7)
    image = rng.poisson(2.0, (300, 400)).astype(np.float32)
    yy, xx = np.mgrid[-3:4, -3:4]
    for y, x in rng.integers(8, (292, 392), (25, 2)):
        image[y - 3:y + 4, x - 3:x + 4] += 80 * np.exp(-(yy ** 2 + xx ** 2) / 2.0)
    engines = {p: InferenceEngine("default", device="cpu", threads=1, adu_per_photon=1.0,
                                  precision=p) for p in ("fp32", "bf16")}
    probs = {p: e.predict_panels([image])[0] for p, e in engines.items()}
    assert probs["bf16"].dtype == np.float32
    difference = np.abs(probs["bf16"] - probs["fp32"])
    assert 0 < difference.max() < 0.05  # bfloat16 keeps about three significant digits
    found = {}
    for p, engine in engines.items():
        (result,) = engine.find_frames([Frame(panels=[image])])
        found[p] = np.stack([result.peaks["ss"], result.peaks["fs"]], 1)
    assert len(found["fp32"]) >= 20 and len(found["bf16"]) == len(found["fp32"])
    nearest = np.sqrt(((found["bf16"][:, None] - found["fp32"][None]) ** 2).sum(-1)).min(1)
    assert np.all(nearest < 0.5)
    assert engines["bf16"].describe()["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        InferenceEngine(precision="fp16")


def test_each_frame_brings_its_own_gain_for_the_shot_noise(make_geometry_text):
    """Two background photons stacked in one pixel of a sparse photon-counting frame: noise to a
    gain-aware SNR, a peak to background noise alone.  The frame's declared gain decides."""
    from peaknet_xtal.formats.geometry import parse_geometry

    rng = np.random.default_rng(4)
    gain = 20.0
    image = (rng.poisson(0.02, (64, 64)) * gain + rng.normal(0, 3.0, (64, 64))).astype(np.float32)
    image[30, 30] += 2 * gain

    def marks_the_pixel(panels, masks):
        prob = np.zeros((64, 64), np.float32)
        prob[30, 30] = 1.0
        return [prob]

    def found(engine, **frame_kw):
        return len(next(iter(engine.find_frames([Frame(panels=[image], **frame_kw)]))).peaks)

    engine = InferenceEngine(predictor=marks_the_pixel, min_snr=3.0)
    assert found(engine) == 1  # no gain known: background noise only
    assert found(engine, meta={"adu_per_photon": gain}) == 0
    geometry = parse_geometry(make_geometry_text(["p0"], 64, 64, [(0.0, 0.0)],
                                                 adu_per_photon=str(gain), dims=False))
    assert found(engine, geometry=geometry) == 0
    off = InferenceEngine(predictor=marks_the_pixel, min_snr=3.0, adu_per_photon=0.0)
    assert found(off, meta={"adu_per_photon": gain}) == 1  # an explicit 0 wins


def test_each_result_says_the_gain_it_used_and_whether_it_was_measured():
    """Writers put a gain measured from the data into the geometry they write (a placeholder
    gain of 1 there made peaknet-integrate report ADU as photons), so each result says it."""
    rng = np.random.default_rng(5)
    level = 2.0 + 40.0 * np.indices((256, 256))[1] / 256  # photons: a gain shows as a slope
    image = (rng.poisson(level) * 25.0 + rng.normal(0, 2.0, level.shape))
    frame = Frame(panels=[image.astype(np.float32)], meta={"adu_per_photon": 1.0})

    def nothing(panels, masks):
        return [np.zeros(p.shape, np.float32) for p in panels]

    (measured,) = InferenceEngine(predictor=nothing).find_frames([frame])
    assert measured.meta["gain_measured"] and measured.meta["adu_per_photon"] == pytest.approx(
        25.0, rel=0.15)
    (given,) = InferenceEngine(predictor=nothing, adu_per_photon=7.0).find_frames([frame])
    assert given.meta == {"adu_per_photon": 7.0, "gain_measured": False}
    declared = Frame(panels=frame.panels, meta={"adu_per_photon": 24.0})
    (kept,) = InferenceEngine(predictor=nothing).find_frames([declared])
    assert kept.meta == {"adu_per_photon": 24.0, "gain_measured": False}


def test_a_broken_input_comes_after_the_frames_read_before_it():
    """Frames batched together with a broken one's predecessors are found and handed out
    before the error (a truncated file after a few small ones lost them all)."""
    def frames():
        for i in range(7):  # past the five frames read ahead, into a part-filled batch
            yield Frame(panels=[np.full((16, 16), float(i), np.float32)], event=f"//{i}")
        raise OSError("truncated file")

    def nothing(panels, masks):
        return [np.zeros(p.shape, np.float32) for p in panels]

    engine = InferenceEngine(predictor=nothing, batch_size=64)
    found = []
    with pytest.raises(OSError, match="truncated"):
        for result in engine.find_frames(frames()):
            found.append(result.frame.event)
    assert found == [f"//{i}" for i in range(7)]


def test_peaks_dropped_after_finding_leave_the_pixel_maps_too():
    """A peak the defect filter drops takes its connected pixels out of the DIALS foreground;
    kept peaks keep theirs, and the caller's maps are not changed."""
    from peaknet_xtal.finding.engine import _without_dropped
    from peaknet_xtal.types import peaks_from_columns

    pixels = np.zeros((20, 20), bool)
    pixels[2:4, 2:4] = True  # kept
    pixels[10, 10] = True  # dropped (a hot pixel)
    pixels[15:17, 5:8] = True  # dropped
    peaks = peaks_from_columns(panel=np.zeros(3, np.int32), fs=np.array([2.5, 10.0, 6.0]),
                               ss=np.array([2.5, 10.0, 15.5]))
    (left,) = _without_dropped([pixels], peaks[1:])
    assert left[2:4, 2:4].all() and left.sum() == 4
    assert pixels[10, 10] and pixels[15:17, 5:8].all()


def test_a_dropped_peak_whose_position_lies_on_its_rim_takes_its_marked_pixels_along():
    """The real CSPAD case: the model marks the pixel beside a hot pixel; the peak's footprint
    (marked pixel and rim) puts its centroid on the hot pixel, where nothing is marked.  The
    filter drops the peak; its marked pixel must leave the map too (it stayed, and DIALS grew it
    back over the hot pixel as a strong spot), while a neighbouring kept peak stays."""
    from peaknet_xtal.finding.engine import _without_dropped
    from peaknet_xtal.types import peaks_from_columns

    pixels = np.zeros((30, 30), bool)
    pixels[10, 9] = True  # marked beside the hot pixel at (10, 10)
    pixels[10, 16:18] = True  # another peak, kept, 6 px away
    dropped = peaks_from_columns(panel=np.zeros(1, np.int32), fs=np.array([10.0]),
                                 ss=np.array([10.0]))
    (left,) = _without_dropped([pixels], dropped)
    assert not left[10, 9] and left[10, 16:18].all() and left.sum() == 2


def spotted_panel(rng: np.random.Generator, shape: tuple[int, int], spots: int) -> np.ndarray:
    """Poisson background (2 photons a pixel, 10 ADU each) with Gaussian spots of 30-300
    photons, 0.6-1.2 px wide."""
    yy, xx = np.indices(shape)
    photons = np.full(shape, 2.0)
    for _ in range(spots):
        cy, cx = rng.uniform(6, shape[0] - 6), rng.uniform(6, shape[1] - 6)
        width = rng.uniform(0.6, 1.2)
        photons += (rng.uniform(30, 300) / (2 * np.pi * width**2)
                    * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2)))
    return (10.0 * rng.poisson(photons)).astype(np.float32)


def test_the_default_model_finds_a_panels_peaks_wherever_a_masked_layout_puts_it():
    """Issue 14: a panel embedded in a larger masked layout gives the peaks it gives alone,
    with the shipped network (whose tile-wide statistics see every pixel of a tile), at an
    offset on no grid of the model's or the normalisation's."""
    rng = np.random.default_rng(11)
    panel = spotted_panel(rng, (200, 260), 40)
    engine = InferenceEngine("default", device="cpu", threads=1, adu_per_photon=10.0)
    alone = next(iter(engine.find_frames([Frame(panels=[panel])]))).peaks
    assert len(alone) >= 20
    for y0, x0 in ((37, 53), (5, 300)):
        layout = np.zeros((y0 + 200 + 41, x0 + 260 + 29), np.float32)
        good = np.zeros(layout.shape, bool)
        layout[y0:y0 + 200, x0:x0 + 260], good[y0:y0 + 200, x0:x0 + 260] = panel, True
        engine.new_run()
        inside = next(iter(engine.find_frames([Frame(panels=[layout], masks=[good])]))).peaks
        assert len(inside) == len(alone)  # the same peaks, in the same order
        np.testing.assert_allclose(inside["ss"] - y0, alone["ss"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(inside["fs"] - x0, alone["fs"], rtol=0, atol=1e-9)
        for column in ("intensity", "snr", "prob"):
            np.testing.assert_allclose(inside[column], alone[column], rtol=1e-6)


def test_panels_go_to_the_model_whole_in_batches_of_a_fixed_pixel_budget():
    """Issue 14: no panel of a detector in use is cut into tiles by default, so no tile cut can
    change its peaks; ``batch_size`` counts 1-Mpx slots, so whole 6-Mpx panels go one at a time
    (eight in one pass took twice the CPU time and three times the memory) while CSPAD-sized
    ASICs still go eight at a time."""
    from peaknet_xtal.finding.engine import SLOT_PIXELS, slots

    assert SLOT_PIXELS == 1024 * 1024 and slots(185, 194) == 1 and slots(2528, 2464) == 6
    model = PixelwiseLogits()
    engine = InferenceEngine(model, device="cpu")
    rng = np.random.default_rng(4)
    big = [rng.normal(0, 2, (2527, 2463)).astype(np.float32) for _ in range(2)]
    asics = [rng.normal(0, 2, (185, 194)).astype(np.float32) for _ in range(16)]
    probs = engine.predict_panels(big + asics)
    for panel, prob in zip(big + asics, probs, strict=True):
        np.testing.assert_allclose(prob, sigmoid(panel), atol=1e-6)
    assert sorted(model.batches) == sorted([(1, 1, 2528, 2464)] * 2 + [(8, 1, 192, 224)] * 2)


def test_the_default_model_finds_a_large_panels_peaks_alone_beside_others_or_embedded():
    """Issue 14: a panel larger than the engine's old 1024-px tiles gives with the defaults the
    peaks it gives whole (one tile of its own size), in a frame beside a brighter panel of its
    shape (one batch), one panel a batch, and embedded at an offset in a larger masked layout:
    the network's image-wide statistics always cover exactly this panel.  (Cut into 1024-px
    tiles, as the engine did by default before, its peaks differ: benchmarks/tile_dependence.py.)
    """
    rng = np.random.default_rng(12)
    shape = (1100, 1310)
    panel = spotted_panel(rng, shape, 120)
    neighbour = spotted_panel(rng, shape, 60) * 3.0

    def peaks(frame: Frame, **engine: object) -> np.ndarray:
        eng = InferenceEngine("default", device="cpu", threads=1, adu_per_photon=10.0,
                              **engine)  # type: ignore[arg-type]
        return next(iter(eng.find_frames([frame]))).peaks

    alone = peaks(Frame(panels=[panel]))
    assert len(alone) >= 60
    variants = {"whole": peaks(Frame(panels=[panel]), tile_size=1312),
                "beside another panel": peaks(Frame(panels=[neighbour, panel])),
                "one panel a batch": peaks(Frame(panels=[neighbour, panel]), batch_size=1)}
    y0, x0 = 45, 77
    layout = np.zeros((shape[0] + 90, shape[1] + 120), np.float32)
    good = np.zeros(layout.shape, bool)
    layout[y0:y0 + shape[0], x0:x0 + shape[1]], good[y0:y0 + shape[0], x0:x0 + shape[1]] = (
        panel, True)
    inside = peaks(Frame(panels=[layout], masks=[good])).copy()
    inside["ss"], inside["fs"] = inside["ss"] - y0, inside["fs"] - x0
    variants["embedded"] = inside
    for name, found in variants.items():
        found = found[found["panel"] == found["panel"].max()] if name != "embedded" else found
        assert len(found) == len(alone), name
        np.testing.assert_allclose(found["ss"], alone["ss"], rtol=0, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(found["fs"], alone["fs"], rtol=0, atol=1e-9, err_msg=name)
        np.testing.assert_allclose(found["snr"], alone["snr"], rtol=1e-6, err_msg=name)


def test_the_model_sees_each_panels_valid_region_and_no_empty_panel():
    """Masked margins are cut off before the model and an all-masked panel never reaches it;
    outside the valid region the probability is 0 and the logits are the masked ones."""
    from peaknet_xtal.model.peaknet import MASKED_LOGITS

    model = PixelwiseLogits()
    engine = InferenceEngine(model, device="cpu", tile_size=1024)
    panel = np.random.default_rng(3).normal(size=(100, 120)).astype(np.float32)
    margins = np.zeros(panel.shape, bool)
    margins[10:60, 20:90] = True
    dead = np.zeros(panel.shape, bool)
    prob, nothing = engine.predict_panels([panel, panel], [margins, dead])
    assert model.batches == [(1, 1, 64, 96)]  # the 50 x 70 region, padded to the model's 32
    np.testing.assert_allclose(prob[margins], sigmoid(panel[margins]), rtol=1e-6)
    assert not prob[~margins].any() and not nothing.any()
    logits, dead_logits = engine.predict_logits([panel, panel], [margins, dead])
    assert logits.shape == dead_logits.shape == (2, 100, 120)
    assert (dead_logits[0] == MASKED_LOGITS[0]).all() and (dead_logits[1] == MASKED_LOGITS[1]).all()
    assert (logits[1][~margins] == MASKED_LOGITS[1]).all()


def test_panels_and_valid_regions_of_any_size_go_through_the_shipped_model():
    """Tiny panels and thin strips of good pixels (a valid region is what the model sees) give
    peak tables, not errors: a 40 x 3 panel once failed in the normalisation's correlation
    step, whose pixel offsets reach 4 px."""
    rng = np.random.default_rng(8)
    engine = InferenceEngine("default", device="cpu", threads=1)
    for shape in [(1, 1), (3, 3), (40, 3), (3, 40), (2, 200), (5, 5), (17, 4)]:
        panel = rng.poisson(3.0, shape).astype(np.float32)
        engine.new_run()
        result = next(iter(engine.find_frames([Frame(panels=[panel])])))
        assert result.peaks.dtype == PEAK_DTYPE
    panel = rng.poisson(3.0, (120, 90)).astype(np.float32)
    panel[60, 1] += 400.0
    for strip in [(slice(None), slice(0, 3)), (slice(59, 62), slice(None)),
                  (slice(60, 61), slice(1, 2))]:
        good = np.zeros(panel.shape, bool)
        good[strip] = True
        engine.new_run()
        peaks = next(iter(engine.find_frames([Frame(panels=[panel], masks=[good])]))).peaks
        assert all(good[int(round(p["ss"])), int(round(p["fs"]))] for p in peaks)


def test_faint_peaks_go_on_frames_with_few_tall_peaks_with_their_pixels():
    """The frame-level faint-peak rule runs in the engine, so every entry point has it: a frame
    with fewer than faint_support tall peaks loses its faint ones (and their pixels), one with
    enough keeps them; ``whole=False`` (one panel of an image handed over alone) and
    faint_support 0 leave it out."""
    rng = np.random.default_rng(5)
    spots: dict[str, list[tuple[int, int, float]]] = {
        "few": [(10, 10, 40.0), (10, 40, 40.0)] + [(40, x, 3.0) for x in (10, 30, 50)],
        "many": [(10, x, 40.0) for x in (10, 22, 34, 46, 58)] + [(40, x, 3.0) for x in (10, 30)],
    }
    frames, boxes = [], {}
    for name, places in spots.items():
        image = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
        box = np.zeros((64, 64), bool)
        for y, x, height in places:  # spots with a profile (a lone tall pixel is a spike)
            image[y - 1:y + 2, x - 1:x + 2] += height * np.array([[.3, .5, .3], [.5, 1, .5],
                                                                  [.3, .5, .3]], np.float32)
            box[y - 1:y + 2, x - 1:x + 2] = True
        boxes[name] = box
        frames.append(Frame(panels=[image], masks=[np.ones((64, 64), bool)], source=name))

    def predictor(panels, masks):
        return [boxes[name].astype(np.float32) for name in
                ["few" if p[10, 40] > 20 and p[10, 22] < 20 else "many" for p in panels]]

    def found(**options):
        engine = InferenceEngine(predictor=predictor, min_snr=0.0, adu_per_photon=0.0,
                                 **{k: v for k, v in options.items() if k != "whole"})
        return {r.frame.source: r for r in engine.find_frames(
            frames, with_pixels=True, whole=options.get("whole", True))}

    default = found(faint_support=5)
    assert len(default["few"].peaks) == 2 and len(default["many"].peaks) == 7
    assert (default["few"].peaks["max_value"] > 20).all()
    pixels = default["few"].peak_pixels[0]
    assert not pixels[30:].any()  # the faint peaks' pixels went too
    assert pixels[:30].sum() == 2 * 9  # the tall ones' stayed
    for kept in (found(faint_support=0), found(faint_support=5, whole=False)):
        assert len(kept["few"].peaks) == 5 and len(kept["many"].peaks) == 7
    assert len(found(faint_support=2)["few"].peaks) == 5
    # faint_snr: a peak is tall only with that integrated SNR too (here none has it)
    doubted = found(faint_support=5, peak_params=PeakParams(faint_snr=1e6))
    assert len(doubted["many"].peaks) == 0 and len(doubted["few"].peaks) == 0
    assert len(found(faint_support=0, peak_params=PeakParams(faint_snr=1e6))["many"].peaks) == 7
    with pytest.raises(ValueError, match="faint_support"):
        InferenceEngine(predictor=predictor, faint_support=-1)


def test_the_logits_running_out_of_memory_is_a_memory_error(monkeypatch):
    """``predict_logits`` (the reports' path to the raw model output) raised torch's
    RuntimeError where the probabilities' path raises MemoryError for the same condition."""

    def starved(self, *args, **kwargs):
        torch.empty(2 ** 50, dtype=torch.uint8)

    monkeypatch.setattr(InferenceEngine, "_segment", starved)
    image = np.random.default_rng(3).normal(10.0, 1.0, (64, 64)).astype(np.float32)
    with pytest.raises(MemoryError, match="can't allocate memory"):
        InferenceEngine("default", device="cpu", threads=1).predict_logits([image])


class Halving(nn.Module):
    """Halves the image with a strided convolution (``kernel`` 2: an odd side loses a pixel;
    3, padded: it gains one) and doubles it back, without saying ``pad_multiple``."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 4, kernel, stride=2, padding=kernel - 2)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


@pytest.mark.parametrize("kernel, got", [(2, "(1, 2, 184, 194)"), (3, "(1, 2, 186, 194)")])
def test_a_model_whose_output_is_another_size_is_one_error_naming_it(kernel, got):
    """Found by a plugin author: a model that downsamples, trained on 64-px crops, crashed on
    185 x 194 panels with a torch shape traceback from inside the engine (one pixel smaller), or
    had its output cropped without a word (one larger).  Either is now one error naming the
    model and what the engine needs."""
    from peaknet_xtal.errors import PeakNetError

    engine = InferenceEngine(Halving(kernel), device="cpu")
    panel = np.random.default_rng(0).normal(size=(185, 194)).astype(np.float32)
    with pytest.raises(PeakNetError, match=(
            rf"^model Halving: returned {re.escape(got)} for a "
            r"\(1, 1, 185, 194\) batch; the finding engine needs an output of the input's "
            r"height and width: a network that downsamples sets pad_multiple")):
        engine.predict_panels([panel])


class ThreadsSeen(PixelwiseLogits):
    """:class:`PixelwiseLogits` that notes torch's CPU threads at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        return super().forward(x, mask)


def test_each_engine_runs_at_its_own_threads_and_leaves_the_processs_own(monkeypatch):
    """An engine set torch's threads for the whole process as its model loaded: a script's
    own torch work ran at them after its first find (a notebook at torch's 2 ran at 1 on a
    loaded machine), and a second engine's setting became the first's (``threads=1`` ran at
    2).  Each now runs at its own, and the process's setting comes back, after Ctrl-C too."""
    from peaknet_xtal import threads

    monkeypatch.setattr(threads, "openmp_shadowed", lambda: None)  # a clean process's case
    panel = [np.random.default_rng(0).poisson(4, (40, 50)).astype(np.float32)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        one, two = ThreadsSeen(), ThreadsSeen()
        first = InferenceEngine(one, device="cpu", threads=1)
        second = InferenceEngine(two, device="cpu", threads=2)
        first.predict_panels(panel)
        second.predict_panels(panel)
        first.predict_panels(panel)
        assert one.threads == [1, 1] and two.threads == [2]
        assert torch.get_num_threads() == 3

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(one, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            first.predict_panels(panel)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("stop", ["break", "interrupt"])
def test_the_frames_after_a_run_stopped_while_reading_ahead_are_counted_as_themselves(stop):
    """A run's first frames are read ahead and counted towards its pixel defects; stopped
    before they were all found (Ctrl-C, a loop left with break at the first image), they stayed
    pending, and the next frames found, other images, were taken for them and never counted:
    after 5 blank frames read ahead and 15 with a hot pixel found, the hot pixel (15 of 20
    frames, the defect fraction) was no defect, as it is where the blank frames were found."""
    from peaknet_xtal.finding.defects import DEFECT_FRACTION, MIN_FRAMES

    rng = np.random.default_rng(4)
    blank = [Frame(panels=[rng.poisson(10, (48, 64)).astype(np.float32)])
             for _ in range(MIN_FRAMES)]
    hot = []
    # the fewest frames with the hot pixel that make it a defect of the whole run
    for _ in range(int(np.ceil(DEFECT_FRACTION * MIN_FRAMES / (1 - DEFECT_FRACTION)))):
        panel = rng.poisson(10, (48, 64)).astype(np.float32)
        panel[12, 20] = 5000.0
        hot.append(Frame(panels=[panel]))

    def bright(panels, masks):
        return [(p > 60).astype(np.float32) for p in panels]

    found = InferenceEngine(predictor=bright)
    list(found.find_frames(blank))
    expected = list(found.find_frames(hot))
    assert not found.defects.tracker.good_masks()[0][12, 20]
    assert len(expected[-1].peaks) == 0  # the hot pixel is no peak once it is a defect

    def interrupted(panels, masks):
        raise KeyboardInterrupt

    stopped = InferenceEngine(predictor=bright if stop == "break" else interrupted)
    if stop == "break":
        for _ in stopped.find_frames(blank):
            break
    else:
        with pytest.raises(KeyboardInterrupt):
            list(stopped.find_frames(blank))
        stopped.predictor = bright
    assert stopped.defects.tracker.frames == MIN_FRAMES  # read ahead: counted
    got = list(stopped.find_frames(hot))
    assert [len(r.peaks) for r in got] == [len(r.peaks) for r in expected]
    np.testing.assert_array_equal(stopped.defects.tracker.good_masks()[0],
                                  found.defects.tracker.good_masks()[0])
