"""A PeakNet without image-wide statistics (``image_stats: none``): no GRN, the head's norms per
pixel over channels (its locality: test_locality.py); the fused CPU form folds its blocks; it
saves and loads as any other model, and older configs build as before."""
from __future__ import annotations

import pytest
import torch
from peaknet_test_support import SMALL_PEAKNET, perturbed_norms, spotted_images

from peaknet_xtal.model import create_model, load_model, save_model
from peaknet_xtal.model.fast import FusedConvNeXtBlock, fuse_for_inference
from peaknet_xtal.model.layers.convnext import GRN, LayerNorm2d
from peaknet_xtal.model.layers.head import ConvGNGELU

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {**SMALL_PEAKNET, "image_stats": "none"}


def test_no_layer_takes_image_wide_statistics():
    net = create_model("yocto", **SMALL)
    assert not any(isinstance(m, (GRN, torch.nn.GroupNorm)) for m in net.modules())
    heads = [m for m in net.modules() if isinstance(m, ConvGNGELU)]
    assert heads and all(isinstance(m[1], LayerNorm2d) for m in heads)
    per_image = create_model("yocto", **{**SMALL, "image_stats": "per_image"})
    assert any(isinstance(m, GRN) for m in per_image.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in per_image.modules())


def test_fused_form_folds_the_blocks_and_keeps_the_output():
    net = perturbed_norms(create_model("yocto", **SMALL), 8)
    fused = fuse_for_inference(net)
    assert any(isinstance(m, FusedConvNeXtBlock) for m in fused.modules())
    x, good = spotted_images(9, 2, (96, 128))
    with torch.inference_mode():
        plain, fast = net(x, good), fused(x, good)
        torch.testing.assert_close(fast, plain, atol=1e-5 * plain.abs().max().item(), rtol=1e-5)
        torch.testing.assert_close(fused.peak_logit(x, good),
                                   (plain[:, 1:2] - plain[:, 0:1]), atol=1e-4, rtol=1e-5)


def test_saves_and_loads_and_other_configs_are_unchanged(tmp_path):
    net = perturbed_norms(create_model("yocto", **SMALL), 10)
    loaded = load_model(str(save_model(net, tmp_path / "none.safetensors")))
    assert loaded.config["image_stats"] == "none"
    assert not any(isinstance(m, GRN) for m in loaded.modules())
    x, good = spotted_images(11, 2, (96, 128))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, good), net(x, good))
    names = {k for k, _ in create_model("yocto").named_parameters()}
    assert any(".grn." in k for k in names)  # the per-image default keeps its GRN parameters
