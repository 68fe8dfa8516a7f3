"""The network's image-wide statistics over valid pixels only (``model.layers.valid_stats``): a
masked region drops out of every GRN and GroupNorm sum, an image without masked pixels gets
exactly the statistics it always did, and masking part of a panel barely moves the network's
answer far from the mask (the user trial's case: a DIALS mask over a quarter of a one-panel
detector had moved spots everywhere)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from peaknet_xtal.model.layers.convnext import GRN
from peaknet_xtal.model.layers.head import ValidGroupNorm
from peaknet_xtal.model.layers.valid_stats import statistics_over, weighted_group_norm, weights_at
from peaknet_xtal.model.weights_io import load_model

torch.set_num_threads(1)


def _left_valid(shape: tuple[int, int, int, int], columns: int) -> torch.Tensor:
    """(B, 1, H, W) validity with only the first ``columns`` columns valid."""
    valid = torch.zeros(shape[0], 1, shape[2], shape[3], dtype=torch.bool)
    valid[..., :columns] = True
    return valid


def test_weighted_group_norm_is_group_norm_over_the_valid_part():
    torch.manual_seed(0)
    x = 3.0 * torch.randn(2, 8, 12, 20) + 1.5
    weight, bias = torch.randn(8), torch.randn(8)
    out = weighted_group_norm(x, 4, weight, bias, 1e-5, _left_valid(x.shape, 13).float())
    expected = F.group_norm(x[..., :13], 4, weight, bias, 1e-5)
    torch.testing.assert_close(out[..., :13], expected, atol=1e-5, rtol=1e-5)


def test_masked_positions_never_reach_the_statistics():
    """Whatever a masked position holds, GroupNorm's output and GRN's response at the valid
    positions are those of the valid part alone."""
    torch.manual_seed(1)
    x = torch.randn(1, 8, 16, 24)
    garbage = x.clone()
    garbage[..., 10:] = 1e3 * torch.randn(1, 8, 16, 14)
    norm = ValidGroupNorm(4, 8)
    grn = GRN(8)
    with statistics_over(_left_valid(x.shape, 10)):
        normed = norm(x), norm(garbage)
        # GRN takes channels-last maps (B, H, W, C)
        responses = grn.response(x.permute(0, 2, 3, 1)), grn.response(garbage.permute(0, 2, 3, 1))
    torch.testing.assert_close(normed[0][..., :10], normed[1][..., :10])
    torch.testing.assert_close(normed[0][..., :10], F.group_norm(x[..., :10], 4), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(responses[0], responses[1])
    torch.testing.assert_close(responses[0], grn.response(x[..., :10].permute(0, 2, 3, 1)))


def test_an_image_without_masked_pixels_takes_the_plain_statistics():
    valid = torch.ones(2, 1, 64, 96, dtype=torch.bool)
    with statistics_over(valid):
        assert weights_at(16, 24) is None
    with statistics_over(_left_valid((2, 1, 64, 96), 40)):
        weights = weights_at(16, 24)  # stride 4: a cell half over the edge counts half
        assert weights is not None and weights.shape == (2, 1, 16, 24)
        assert float(weights[0, 0, 0, 9]) == 1.0 and float(weights[0, 0, 0, 10]) == 0.0
        assert float(weights_at(2, 3)[0, 0, 0, 1]) == 0.25
    assert weights_at(16, 24) is None  # outside: every layer computes what it always did
    model = load_model().eval()
    x = torch.from_numpy(np.random.default_rng(2).poisson(2.0, (1, 1, 96, 128))
                         .astype(np.float32))
    with torch.inference_mode():
        assert torch.equal(model.peak_logit(x), model.peak_logit(x, torch.ones_like(x).bool()))


def test_weights_of_one_give_the_plain_statistics_to_rounding():
    """Off the CPU the weighted code runs on every image (no wait for the device to say whether
    any pixel is masked): with every position valid it must give the plain statistics."""
    torch.manual_seed(3)
    x = torch.randn(2, 8, 12, 20) * 4.0 + 2.0
    ones = torch.ones(2, 1, 12, 20)
    torch.testing.assert_close(weighted_group_norm(x, 4, None, None, 1e-5, ones),
                               F.group_norm(x, 4, eps=1e-5), atol=1e-5, rtol=1e-5)
    grn = GRN(8)
    channels_last = x.permute(0, 2, 3, 1)
    plain = grn.response(channels_last)
    with statistics_over(torch.ones(2, 1, 48, 80, dtype=torch.bool)):
        assert weights_at(12, 20) is None  # on the CPU: the plain code itself
    from peaknet_xtal.model.layers import valid_stats

    token = valid_stats._CURRENT.set(valid_stats._Weights(torch.ones(2, 1, 48, 80)))
    try:
        torch.testing.assert_close(grn.response(channels_last), plain, atol=1e-6, rtol=1e-5)
    finally:
        valid_stats._CURRENT.reset(token)


def test_masking_part_of_a_panel_barely_moves_the_answer_far_from_it():
    """The shipped model on a counting panel with 40 spots, a 100 x 140 box masked: beyond the
    dither blocks the box touches and the network's reach (128 px) the peak probability moves by
    less than 0.05 (with the statistics over every pixel and one dither shift for the panel it
    moved by up to 0.37 there, and 35 pixels crossed 0.5)."""
    rng = np.random.default_rng(3)
    h, w = 384, 448
    yy, xx = np.mgrid[0:h, 0:w]
    lam = np.full((h, w), 0.3)
    for cy, cx in rng.uniform(10, [h - 10, w - 10], (40, 2)):
        lam += rng.uniform(5, 60) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0) / (2 * np.pi)
    x = torch.from_numpy(rng.poisson(lam).astype(np.float32))[None, None]
    valid = torch.ones_like(x, dtype=torch.bool)
    masked = valid.clone()
    masked[..., 100:200, 120:260] = False
    model = load_model().eval()
    with torch.inference_mode():
        moved = (torch.sigmoid(model.peak_logit(x, valid))
                 - torch.sigmoid(model.peak_logit(x, masked))).abs()[0, 0].numpy()
    dy = np.maximum(0, np.maximum(100 - yy, yy - 199))
    dx = np.maximum(0, np.maximum(120 - xx, xx - 259))
    far = np.hypot(dy, dx) > 128
    assert far.sum() > 0.25 * far.size and moved[far].max() < 0.05
