"""Fixed image statistics (``model/fixed_stats.py``): the stored statistics are the model's own
per-image ones averaged, the network becomes local (a pixel's output no longer depends on far
pixels, so tiles and layouts do not change it), the fused CPU form folds them, and the model
saves and loads as any other."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peaknet_test_support import SMALL_PEAKNET, perturbed_norms, spotted_images

from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.model import create_model, load_model, save_model
from peaknet_xtal.model.fast import FusedConvNeXtBlock, fuse_for_inference
from peaknet_xtal.model.fixed_stats import ImageStatsRecorder, fix_image_stats
from peaknet_xtal.model.layers.head import FixedGroupNorm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = SMALL_PEAKNET


def _random_model(seed: int = 0, **config: object) -> torch.nn.Module:
    """A model whose GRN and norm parameters are away from their identity init, so that the
    statistics matter."""
    return perturbed_norms(create_model("yocto", **config), seed)


def test_stored_statistics_are_the_per_image_ones_averaged():
    """On copies of one image the average of the per-image statistics is that image's own, so
    the fixed model computes exactly what the per-image model computes on it."""
    model = _random_model(input_norm="local")
    x, good = spotted_images(1, 1)
    fixed = fix_image_stats(model, x.repeat(3, 1, 1, 1), good.repeat(3, 1, 1, 1))
    assert fixed.config["image_stats"] == "fixed" and model.config["image_stats"] == "per_image"
    assert any(isinstance(m, FixedGroupNorm) for m in fixed.modules())
    with torch.inference_mode():
        torch.testing.assert_close(fixed(x, good), model(x, good), atol=2e-5, rtol=2e-5)
        other, _ = spotted_images(2, 1)  # on another image they differ: the statistics are fixed
        assert (fixed(other, good) - model(other, good)).abs().max() > 1e-3


def test_fixed_statistics_make_a_pixels_output_independent_of_far_pixels():
    """Content far beyond the receptive field changes nothing for the fixed model; with
    per-image statistics it changes every pixel's output (the tile dependence the module
    docstring measures on a real Pilatus 6M frame)."""
    torch.manual_seed(3)
    model = create_model("yocto", **SMALL).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "grn" in name or "norm" in name:
                param.add_(0.5 * torch.randn_like(param))
    x, good = spotted_images(4, 2, (64, 640))
    fixed = fix_image_stats(model, x, good)
    z = fixed.normalise(x[:1], good[:1])
    far = z.clone()
    far[..., 448:] = 3.0 * torch.randn_like(far[..., 448:])  # beyond 300 px of columns < 96
    with torch.inference_mode():
        for net, changed in ((fixed, False), (model, True)):
            a = net.peak_logit(z, good[:1], normalised=True)[..., :96]
            b = net.peak_logit(far, good[:1], normalised=True)[..., :96]
            assert bool((a - b).abs().max() > 1e-4) is changed


def test_engine_gives_the_same_probabilities_whole_and_tiled_with_fixed_statistics():
    """Tiles overlapping by more than the receptive field: the fixed model's stitched output is
    the whole panel's (to float32 rounding); the per-image model's is not."""
    torch.manual_seed(5)
    model = create_model("yocto", **SMALL).eval()
    x, good = spotted_images(6, 3, (96, 512))
    fixed = fix_image_stats(model, x, good)
    panel = spotted_images(7, 1, (200, 900))[0][0, 0].numpy()
    for net, same in ((fixed, True), (model, False)):
        whole = InferenceEngine(net, device="cpu", fast=False, tile_size=1024)
        tiled = InferenceEngine(net, device="cpu", fast=False, tile_size=640, tile_overlap=384)
        (a,), (b,) = whole.predict_panels([panel]), tiled.predict_panels([panel])
        assert bool(np.abs(a - b).max() < 1e-4) is same


def test_fused_form_folds_the_fixed_statistics():
    model = _random_model(seed=8, input_norm="local")
    x, good = spotted_images(9, 4)
    fixed = fix_image_stats(model, x, good)
    fused = fuse_for_inference(fixed)
    blocks = [m for m in fused.modules() if isinstance(m, FusedConvNeXtBlock)]
    assert blocks and all(b.fixed for b in blocks)
    assert not any(isinstance(m, (FixedGroupNorm, torch.nn.GroupNorm)) for m in fused.modules())
    with torch.inference_mode():
        plain, fast = fixed(x, good), fused(x, good)
    scale = plain.abs().max().item()
    torch.testing.assert_close(fast, plain, atol=1e-5 * scale, rtol=1e-5)


def test_a_fixed_model_saves_and_loads(tmp_path):
    model = _random_model(seed=10, input_norm="local")
    x, good = spotted_images(11, 2)
    fixed = fix_image_stats(model, x, good)
    path = save_model(fixed, tmp_path / "fixed.safetensors")
    loaded = load_model(str(path))
    assert loaded.config["image_stats"] == "fixed"
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, good), fixed(x, good))


def test_bad_input_is_refused():
    model = _random_model(seed=12)
    x, good = spotted_images(13, 2)
    with pytest.raises(ValueError, match="matching"):
        fix_image_stats(model, x, good[:1])
    fixed = fix_image_stats(model, x, good)
    with pytest.raises(ValueError, match="per image, this one.s are .fixed."):
        fix_image_stats(fixed, x, good)
    with pytest.raises(ValueError, match="PeakNet"):
        fix_image_stats(torch.nn.Conv2d(1, 1, 3), x, good)
    with pytest.raises(ValueError, match="image_stats"):
        create_model("yocto", image_stats="per_tile")
    with pytest.raises(ValueError, match="no image statistics recorded"):
        ImageStatsRecorder(model).fixed()
