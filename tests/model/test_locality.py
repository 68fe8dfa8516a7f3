"""Networks whose statistics are local (``image_stats`` ``window``, model/layers/window_stats.py,
and ``none``, no image-wide statistics): a pixel's output does not depend on pixels beyond the
receptive field, so the engine's tiles, overlapping by more than it, give the whole panel's
output.  With per-image statistics (the shipped default's) far pixels change every output."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peaknet_test_support import SMALL_PEAKNET, perturbed_norms, spotted_images

from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.model import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: a 32-px window adds 16 px to the receptive field
LOCAL = {"window": {**SMALL_PEAKNET, "image_stats": "window", "stats_window": 32},
         "none": {**SMALL_PEAKNET, "image_stats": "none"}}


@pytest.mark.parametrize(("stats", "local"), [("window", True), ("none", True),
                                              ("per_image", False)])
def test_a_pixels_output_depends_on_far_pixels_only_with_image_wide_statistics(stats, local):
    config = LOCAL.get(stats, {**SMALL_PEAKNET, "image_stats": stats})
    net = perturbed_norms(create_model("yocto", **config), 3)
    x, good = spotted_images(4, 1, (64, 640))
    z = net.normalise(x, good)
    far = z.clone()
    far[..., 448:] = 3.0 * torch.randn_like(far[..., 448:])  # beyond 300 px of columns < 96
    with torch.inference_mode():
        a = net.peak_logit(z, good, normalised=True)[..., :96]
        b = net.peak_logit(far, good, normalised=True)[..., :96]
    assert bool((a - b).abs().max() > 1e-4) is not local


@pytest.mark.parametrize("stats", sorted(LOCAL))
def test_engine_gives_the_same_probabilities_whole_and_tiled(stats):
    """Tiles overlapping by more than the receptive field: the stitched output is the whole
    panel's, to float32 rounding."""
    net = perturbed_norms(create_model("yocto", **LOCAL[stats]), 5)
    panel = spotted_images(7, 1, (200, 900))[0][0, 0].numpy()
    whole = InferenceEngine(net, device="cpu", fast=False, tile_size=1024)
    tiled = InferenceEngine(net, device="cpu", fast=False, tile_size=640, tile_overlap=384)
    (a,), (b,) = whole.predict_panels([panel]), tiled.predict_panels([panel])
    assert np.abs(a - b).max() < 1e-4
