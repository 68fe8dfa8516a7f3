"""Window statistics (``model/layers/window_stats.py``): GRN and GroupNorm statistics over a
window around each position.  The window mean is the padded-out average pool's; a window
covering the whole map gives the per-image layers back; the network becomes local
(test_locality.py), the fused CPU form leaves those blocks as they are, and the model saves and
loads with its window."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peaknet_test_support import SMALL_PEAKNET, perturbed_norms, spotted_images

from peaknet_xtal.model import create_model, load_model, save_model
from peaknet_xtal.model.fast import FusedConvNeXtBlock, fuse_for_inference
from peaknet_xtal.model.layers.convnext import GRN
from peaknet_xtal.model.layers.head import WindowGroupNorm
from peaknet_xtal.model.layers.window_stats import window_cells, window_mean

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the window adds 16 px to the receptive field
SMALL = {**SMALL_PEAKNET, "image_stats": "window", "stats_window": 32}


@pytest.mark.parametrize("cells", [1, 3, 7, 25, 61])
def test_window_mean_is_the_average_over_the_window_inside_the_map(cells):
    x = torch.randn(2, 3, 30, 17, dtype=torch.float64)
    pad = cells // 2
    rows = F.avg_pool2d(x, (cells, 1), 1, (pad, 0), count_include_pad=False)
    expected = F.avg_pool2d(rows, (1, cells), 1, (0, pad), count_include_pad=False)
    torch.testing.assert_close(window_mean(x, cells), expected)
    corner = x[..., :pad + 1, :pad + 1].mean(dim=(-2, -1))  # at (0, 0): the quarter inside
    torch.testing.assert_close(window_mean(x, cells)[..., 0, 0], corner)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_windows_are_summed_in_float32(dtype):
    # a long row of a bright background: running sums in half precision would be rounded far
    # coarser than one value's own rounding
    torch.manual_seed(0)
    x = 100.0 + torch.randn(1, 2, 3, 3000, dtype=torch.float64)
    out = window_mean(x.to(dtype), 25)
    assert out.dtype == dtype
    expected = window_mean(x.to(dtype).double(), 25)
    resolution = 100.0 * torch.finfo(dtype).eps  # one step of the format near 100
    assert (out.double() - expected).abs().max() <= resolution


def test_window_cells_are_odd_and_cover_the_pixels():
    assert [window_cells(96, s) for s in (4, 8, 16, 32)] == [25, 13, 7, 3]
    assert window_cells(8, 32) == 1


def test_a_window_over_the_whole_map_gives_the_per_image_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 10, 8)  # channels-last for GRN
    whole, windowed = GRN(8), GRN(8, window=2 * 12 + 1)
    with torch.no_grad():
        for layer in (whole, windowed):
            layer.gamma.fill_(0.7)
            layer.beta.fill_(0.1)
        torch.testing.assert_close(windowed(x), whole(x))
    norm, local = torch.nn.GroupNorm(2, 8), WindowGroupNorm(2, 8, window=25)
    local.load_state_dict(norm.state_dict())
    y = 3.0 + torch.randn(2, 8, 12, 10)
    torch.testing.assert_close(local(y), norm(y), atol=1e-5, rtol=1e-5)


def test_windows_of_zeros_keep_values_and_gradients_finite():
    """Masked or padded regions give windows of zeros: the training loss must not turn NaN."""
    x = torch.zeros(1, 12, 10, 8)
    x[:, :4, :3] = torch.randn(1, 4, 3, 8)
    x.requires_grad_(True)
    layer = GRN(8, window=3)
    with torch.no_grad():
        layer.gamma.fill_(0.7)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_fused_form_keeps_window_blocks_and_their_output():
    net = perturbed_norms(create_model("yocto", **SMALL), 8)
    fused = fuse_for_inference(net)
    assert not any(isinstance(m, FusedConvNeXtBlock) for m in fused.modules())
    x, good = spotted_images(9, 2, (96, 128))
    with torch.inference_mode():
        plain, fast = net(x, good), fused(x, good)
    torch.testing.assert_close(fast, plain, atol=1e-5 * plain.abs().max().item(), rtol=1e-5)


def test_a_window_model_saves_and_loads_and_other_configs_are_unchanged(tmp_path):
    net = perturbed_norms(create_model("yocto", **SMALL), 10)
    loaded = load_model(str(save_model(net, tmp_path / "window.safetensors")))
    assert loaded.config["image_stats"] == "window" and loaded.config["stats_window"] == 32
    x, good = spotted_images(11, 2, (96, 128))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x, good), net(x, good))
    assert "stats_window" not in create_model("yocto").config
    with pytest.raises(ValueError, match="stats_window"):
        create_model("yocto", image_stats="window", stats_window=0)
