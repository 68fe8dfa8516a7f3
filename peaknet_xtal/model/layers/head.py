"""Two-pathway segmentation head: FPN-style semantic branch plus a learned upsampling path.

The semantic branch brings every neck level to stride 4 and sums them; a 1x1 conv makes logits at
stride 4, which are bilinearly upsampled.  Bragg peaks are often 1-3 pixels wide, smaller than one
stride-4 cell, so a learned ConvTranspose (stride 4) from the summed features adds the sub-cell
detail that bilinear upsampling alone cannot recover.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peaknet_xtal.model.layers.convnext import LayerNorm2d
from peaknet_xtal.model.layers.valid_stats import weighted_group_norm, weights_at
from peaknet_xtal.model.layers.window_stats import window_cells, window_mean


def _groups(channels: int, wanted: int = 32) -> int:
    """32 groups as published for wide heads; at least 4 channels per group for thin ones (a
    one-channel group is instance norm, which zeroes a map with few pixels)."""
    return max(1, math.gcd(channels, min(wanted, channels // 4)))


class FixedGroupNorm(nn.GroupNorm):
    """GroupNorm whose per-group mean and variance are stored buffers, not statistics of the
    input image (``model/fixed_stats.py``): a per-channel affine map, so the output at a pixel
    depends on that pixel alone."""

    group_mean: torch.Tensor
    group_var: torch.Tensor

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps)
        self.register_buffer("group_mean", torch.zeros(num_groups))
        self.register_buffer("group_var", torch.ones(num_groups))

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, shift)`` with ``forward(x) = x * scale + shift``."""
        per = self.num_channels // self.num_groups
        mean = self.group_mean.repeat_interleave(per)
        scale = self.weight / torch.sqrt(self.group_var.repeat_interleave(per) + self.eps)
        return scale, self.bias - mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.channel_affine()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class ValidGroupNorm(nn.GroupNorm):
    """GroupNorm (the same parameters) whose per-group mean and variance are taken over the
    input's valid positions where it has masked pixels (layers/valid_stats.py), else as
    ``nn.GroupNorm``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = weights_at(x.shape[-2], x.shape[-1])
        if positions is None:
            return super().forward(x)
        return weighted_group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                   positions)


class WindowGroupNorm(nn.GroupNorm):
    """GroupNorm whose per-group mean and variance are taken over a ``window`` of cells around
    each position instead of the whole image (layers/window_stats.py): the output at a pixel
    depends on its neighbourhood only."""

    def __init__(self, num_groups: int, num_channels: int, window: int, eps: float = 1e-5
                 ) -> None:
        super().__init__(num_groups, num_channels, eps)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        grouped = x.view(b, self.num_groups, c // self.num_groups, h, w)
        # the mean and the mean square in one pass of the window
        mean, square = window_mean(torch.cat([grouped.mean(dim=2), grouped.pow(2).mean(dim=2)],
                                             dim=1), self.window).chunk(2, dim=1)
        scale = torch.rsqrt((square - mean.pow(2)).clamp_min(0.0) + self.eps)
        y = (grouped - mean.unsqueeze(2)) * scale.unsqueeze(2)
        return y.view(b, c, h, w) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class ConvGNGELU(nn.Sequential):
    """3x3 conv -> GroupNorm (image-wide, fixed or windowed statistics; or, with
    ``pixel_norm``, a LayerNorm over each pixel's channels, which is local) -> GELU."""

    def __init__(self, cin: int, cout: int, fixed_stats: bool = False, window: int = 0,
                 pixel_norm: bool = False) -> None:
        norm: nn.Module
        if pixel_norm:
            norm = LayerNorm2d(cout, eps=1e-6)
        elif fixed_stats:
            norm = FixedGroupNorm(_groups(cout), cout)
        elif window:
            norm = WindowGroupNorm(_groups(cout), cout, window)
        else:
            norm = ValidGroupNorm(_groups(cout), cout)
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm, nn.GELU())


class SegHead(nn.Module):
    """Sum of per-level branches at stride 4 -> logits, + optional learned x4 upsampling."""

    def __init__(self, in_channels: int, strides: list[int], channels: int, num_classes: int = 2,
                 learned_upsample: bool = True, fixed_stats: bool = False,
                 stats_window: int = 0, pixel_norm: bool = False) -> None:
        super().__init__()
        self.base_stride = strides[0]
        self.branches = nn.ModuleList()
        for stride in strides:
            n_up = int(round(math.log2(stride / self.base_stride)))
            layers: list[nn.Module] = []
            for k in range(max(1, n_up)):
                cells = window_cells(stats_window, stride // 2 ** k) if stats_window else 0
                layers.append(ConvGNGELU(in_channels if k == 0 else channels, channels,
                                          fixed_stats, cells, pixel_norm))
                if n_up > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear",
                                              align_corners=False))
            self.branches.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        s = self.base_stride
        self.learned_up = (nn.ConvTranspose2d(channels, num_classes, kernel_size=s + 2, stride=s,
                                              padding=1) if learned_upsample else None)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int],
                difference: bool = False) -> torch.Tensor:
        """Logits ``(B, classes, H, W)``; with ``difference`` (two classes) only the peak logit
        minus the background one, ``(B, 1, H, W)``: what the peak probability needs
        (``sigmoid`` of it), computed at stride 4 before upsampling (both steps are linear), so
        the full-resolution passes carry one channel instead of two."""
        summed = None
        for branch, f in zip(self.branches, feats, strict=False):
            y = branch(f)
            summed = y if summed is None else summed + y
        assert summed is not None
        if difference:
            weight, bias = _difference(self.classifier.weight, self.classifier.bias, dim=0)
            logits = F.conv2d(summed, weight, bias)
        else:
            logits = self.classifier(summed)
        out = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
        if self.learned_up is not None:
            up = (_difference_upsample(self.learned_up, summed) if difference
                  else self.learned_up(summed))
            out = out + up.float()[..., :out_size[0], :out_size[1]]
        return out


def _difference(weight: torch.Tensor, bias: torch.Tensor | None, dim: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A two-class layer's weight and bias as one output: class 1 minus class 0 along ``dim``
    (the output-channel axis: 0 for a conv, 1 for a transposed conv)."""
    if weight.shape[dim] != 2:
        raise ValueError(f"a logit difference needs two classes, got {weight.shape[dim]}")
    one, zero = weight.narrow(dim, 1, 1), weight.narrow(dim, 0, 1)
    return one - zero, None if bias is None else bias[1:2] - bias[0:1]


def _difference_upsample(up: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The learned upsampling's class-1 minus class-0 output, computed as one channel (a module
    with its own ``difference`` method, such as the fused form's, uses it)."""
    if isinstance(up, nn.ConvTranspose2d):
        weight, bias = _difference(up.weight, up.bias, dim=1)
        padding = up.padding
        assert isinstance(padding, tuple)  # a transposed conv's padding is never a string
        return F.conv_transpose2d(x, weight, bias, stride=up.stride, padding=padding,
                                  output_padding=up.output_padding, dilation=up.dilation)
    difference = getattr(up, "difference", None)
    if difference is None:
        raise TypeError(f"{type(up).__name__} has no difference form")
    result: torch.Tensor = difference(x)
    return result
