"""Losses on cases small enough to compute by hand."""
from __future__ import annotations

import math

import pytest
import torch

from peaknet_xtal.training.losses import distillation_loss, focal_loss
from peaknet_xtal.training.schedule import cosine_with_warmup


def _logits(p_peak: float) -> torch.Tensor:
    """(1, 2, 1, 1) logits whose softmax gives peak probability ``p_peak``."""
    return torch.tensor([0.0, math.log(p_peak / (1 - p_peak))]).view(1, 2, 1, 1)


def test_focal_loss_matches_the_formula_for_each_class() -> None:
    # target peak, p = 0.8: 0.75 * 0.2^2 * -log 0.8
    assert focal_loss(_logits(0.8), torch.ones(1, 1, 1)).item() == pytest.approx(
        0.75 * 0.04 * -math.log(0.8), rel=1e-5)
    # target background, p_bg = 0.9: 0.25 * 0.1^2 * -log 0.9
    assert focal_loss(_logits(0.1), torch.zeros(1, 1, 1)).item() == pytest.approx(
        0.25 * 0.01 * -math.log(0.9), rel=1e-5)


def test_focal_loss_ignores_invalid_pixels_in_sum_and_count() -> None:
    logits = torch.cat([_logits(0.8), _logits(0.5)], dim=3)  # (1, 2, 1, 2)
    target = torch.ones(1, 1, 2, dtype=torch.long)
    valid = torch.tensor([[[True, False]]])
    expected = 0.75 * 0.04 * -math.log(0.8)
    assert focal_loss(logits, target, valid).item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_is_zero_for_identical_confident_logits() -> None:
    t = torch.tensor([10.0, -10.0]).view(1, 2, 1, 1)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_terms_by_hand() -> None:
    s = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)      # student: 50/50
    t = torch.tensor([0.0, 2 * math.log(3)]).view(1, 2, 1, 1)  # teacher at T=2: p = (1/4, 3/4)
    mse = (0 + (2 * math.log(3)) ** 2) / 2
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    focal = 0.75 * 0.5 ** 2 * -math.log(0.5)            # teacher argmax = peak
    expected = 0.4 * mse + 0.4 * 4 * kl + 0.2 * focal
    assert distillation_loss(s, t, temperature=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


def _tile_with_a_spot(seed: int):
    """A 64x64 noisy tile, all pixels good, one 3x3 labelled spot at its centre."""
    import numpy as np

    image = np.random.default_rng(seed).normal(100.0, 5.0, (64, 64)).astype(np.float32)
    label = np.zeros(image.shape, bool)
    label[30:33, 30:33] = True
    return image, np.ones(image.shape, bool), label


def test_detector_artifact_augmentations_change_pixels_but_never_the_label():
    import numpy as np

    from peaknet_xtal.training.data import Augment

    image, good, label = _tile_with_a_spot(1)
    plain = Augment(flips=False, gain=(1.0, 1.0), offset_sigma=0.0, noise=0.0,
                    dead_pixel_fraction=0.0, dead_line_prob=0.0)
    busy = Augment(flips=False, gain=(1.0, 1.0), offset_sigma=0.0, noise=0.0,
                   dead_pixel_fraction=0.0, dead_line_prob=0.0, gain_spread=0.2, banding=2.0,
                   correlated_noise=2.0, bright_line_prob=1.0, bright_edge_prob=1.0)
    same, _, same_label = plain(image.copy(), good, label, np.random.default_rng(2))
    assert np.allclose(same, image) and (same_label == label).all()
    changed = 0
    for seed in range(20):
        out, out_good, out_label = busy(image.copy(), good, label, np.random.default_rng(seed))
        assert (out_label == label).all() and out_good.all()
        changed += not np.allclose(out, image)
    assert changed == 20  # bright lines and edges are always applied here


def test_hot_pixels_are_lone_bright_pixels_away_from_peaks_and_stay_background():
    import numpy as np

    from peaknet_xtal.training.data import Augment

    image, good, label = _tile_with_a_spot(5)
    hot = Augment(flips=False, gain=(1.0, 1.0), offset_sigma=0.0, noise=0.0,
                  dead_pixel_fraction=0.0, dead_line_prob=0.0, hot_pixel_prob=1.0)
    counts = []
    for seed in range(20):
        out, out_good, out_label = hot(image.copy(), good, label, np.random.default_rng(seed))
        assert (out_label == label).all() and out_good.all()
        raised = np.argwhere(out - image > 1e-3)
        assert 1 <= len(raised) <= 6
        # never on or within 3 px of the spot (its pixels and their neighbours keep their values)
        assert np.allclose(out[27:36, 27:36], image[27:36, 27:36])
        counts.append(len(raised))
    assert max(counts) > 1  # several at once, not always one
