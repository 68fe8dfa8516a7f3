"""Fixed image statistics: a trained PeakNet whose GRN and GroupNorm layers use statistics
measured once on training data instead of each input image's own.

Why: GRN (in every ConvNeXt-V2 block) and GroupNorm (in the head's branches) normalise by
statistics of the whole input image, so what the network says at a pixel depends on everything
else in the tile the engine hands it: on where a large panel is cut, on the panel's size, on its
masked gaps and beamstop shadow, on its neighbours in a larger layout.  The input normalisation is
local (``layers/local_norm.py``), the network was not.  Measured with
``benchmarks/tile_dependence.py`` (real Pilatus 6M thaumatin hits, one 2527 x 2463 panel with
module gaps; the Eiger2 still; simulated Rayonix frames), the shipped default: of the peaks found
with the engine's default tiles, 99.2 % are found again (within 1 px) with each image whole,
99.5 % with 512-px tiles, 99.2 % with the panel embedded in a larger masked layout (which also
finds 2.3 % more peaks).  (Before the engine's tiles were put on the model's 32-px grid, the
other cause, 1,873 of 1,981 on thaumatin frame 2.)  With fixed statistics: 100.0, 100.0 and
99.8 % (the rest is what 32 px of tile overlap leaves of the receptive field).

With the statistics fixed every layer is a convolution or acts pixel by pixel, so a pixel's
output depends on a bounded neighbourhood only: a panel gives the same peaks whole, tiled or
embedded in a larger layout, to what the tile overlap leaves of the receptive field
(``tests/model/test_fixed_stats.py``).  It is also a little cheaper (0-9 % of the engine's time
on a CSPAD or Pilatus 6M frame, one thread, runs alternating on a busy machine): the statistics
are no longer computed on every tile, and the fused CPU form folds them into the neighbouring
weights (``model/fast.py``).

How (:class:`ImageStatsRecorder`, :func:`fix_image_stats`): the per-image statistics the trained
model itself computes, averaged over every image it sees while recording: per GRN channel the
response ``nx``, per GroupNorm group the mean and the variance.  What it sees should be training
data seen as inference sees it: ``examples/train_default_model.py`` runs the finding engine on
the frames of its own training bank (whole panels, the engine's tiles), so that no selection or
acceptance frame shapes the model.  The weights are unchanged; the config says
``image_stats: fixed``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peaknet_xtal.model.layers.convnext import GRN
from peaknet_xtal.model.layers.head import FixedGroupNorm
from peaknet_xtal.model.layers.valid_stats import group_moments, weights_at


class ImageStatsRecorder:
    """Adds up the per-image statistics of a PeakNet's GRN and GroupNorm layers over every
    forward pass while it is open (a context manager); :meth:`fixed` is then the model's copy with
    their averages stored.  Whatever runs the model inside counts, e.g. the finding engine on
    whole training frames, so that the statistics are those the engine's tiles give."""

    def __init__(self, model: Any) -> None:
        config = dict(getattr(model, "config", {}))
        if config.get("family") != "peaknet":
            raise ValueError("image statistics are recorded on a PeakNet")
        if config.get("image_stats", "per_image") != "per_image":
            raise ValueError("image statistics are recorded on a model that takes them per "
                             f"image, this one's are {config['image_stats']!r}")
        self.model = model
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.counts: dict[str, int] = {}
        self._hooks: list[Any] = []

    def __enter__(self) -> ImageStatsRecorder:
        self._hooks = [module.register_forward_hook(self._recorder(name, module))
                       for name, module in self.model.named_modules()
                       if isinstance(module, (GRN, nn.GroupNorm))]
        return self

    def __exit__(self, *_exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _recorder(self, name: str, module: nn.Module) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            x = inputs[0].detach().float()
            if isinstance(module, GRN):  # the response per channel, channels-last input
                values = [module.response(x).sum(0, keepdim=True)]
            else:  # GroupNorm: mean and variance per group, over valid positions as it runs
                assert isinstance(module, nn.GroupNorm)
                positions = weights_at(x.shape[-2], x.shape[-1])
                if positions is None:
                    grouped = x.reshape(x.shape[0], module.num_groups, -1)
                    values = [grouped.mean(-1).sum(0), grouped.var(-1, unbiased=False).sum(0)]
                else:
                    mean, variance = group_moments(x, module.num_groups, positions)
                    values = [mean.float().sum(0), variance.float().sum(0)]
            before = self.sums.get(name)
            self.sums[name] = values if before is None else [
                a + b for a, b in zip(before, values, strict=True)]
            self.counts[name] = self.counts.get(name, 0) + int(x.shape[0])

        return record

    def fixed(self) -> Any:
        """The model's copy (``image_stats: fixed``, eval mode) with the recorded averages."""
        from peaknet_xtal.model import build_from_config

        if not self.counts:
            raise ValueError("no image statistics recorded: run the model while recording")
        fixed = build_from_config({**self.model.config, "image_stats": "fixed"})
        missing, unexpected = fixed.load_state_dict(self.model.state_dict(), strict=False)
        if unexpected or any(not k.endswith(("nx", "group_mean", "group_var")) for k in missing):
            raise RuntimeError(f"state does not carry over: missing {missing}, unexpected "
                               f"{unexpected}")
        modules = dict(fixed.named_modules())
        with torch.no_grad():
            for name, totals in self.sums.items():
                target, count = modules[name], float(self.counts[name])
                if isinstance(target, GRN):
                    target.nx.copy_(totals[0] / count)
                elif isinstance(target, FixedGroupNorm):
                    target.group_mean.copy_(totals[0] / count)
                    target.group_var.copy_(totals[1] / count)
        return fixed.eval()


def fix_image_stats(model: Any, images: torch.Tensor, masks: torch.Tensor,
                    batch: int = 32) -> Any:
    """A copy of the PeakNet ``model`` (config ``image_stats: per_image``) with its GRN and
    GroupNorm statistics fixed to their averages over raw ``images`` (``(N, 1, H, W)``, normalised
    here as the model normalises its input) with good-pixel ``masks``; eval mode."""
    if len(images) == 0 or images.shape != masks.shape:
        raise ValueError(f"need matching (N, 1, H, W) images and masks, got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    recorder = ImageStatsRecorder(model)
    was_training = model.training
    model.eval()
    try:
        with recorder, torch.inference_mode():
            for start in range(0, len(images), batch):
                x, good = images[start:start + batch], masks[start:start + batch].bool()
                model.peak_logit(model.normalise(x, good), good, normalised=True)
    finally:
        model.train(was_training)
    return recorder.fixed()
