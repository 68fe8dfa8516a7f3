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


def _groups(channels: int, wanted: int = 32) -> int:
    """32 groups as published for wide heads; at least 4 channels per group for thin ones (a
    one-channel group is instance norm, which zeroes a map with few pixels)."""
    return max(1, math.gcd(channels, min(wanted, channels // 4)))


class _ConvGNGELU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.GroupNorm(_groups(cout), cout), nn.GELU())


class SegHead(nn.Module):
    """Sum of per-level branches at stride 4 -> logits, + optional learned x4 upsampling."""

    def __init__(self, in_channels: int, strides: list[int], channels: int, num_classes: int = 2,
                 learned_upsample: bool = True) -> None:
        super().__init__()
        self.base_stride = strides[0]
        self.branches = nn.ModuleList()
        for stride in strides:
            n_up = int(round(math.log2(stride / self.base_stride)))
            layers: list[nn.Module] = []
            for k in range(max(1, n_up)):
                layers.append(_ConvGNGELU(in_channels if k == 0 else channels, channels))
                if n_up > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear",
                                              align_corners=False))
            self.branches.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        s = self.base_stride
        self.learned_up = (nn.ConvTranspose2d(channels, num_classes, kernel_size=s + 2, stride=s,
                                              padding=1) if learned_upsample else None)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        summed = None
        for branch, f in zip(self.branches, feats, strict=False):
            y = branch(f)
            summed = y if summed is None else summed + y
        assert summed is not None
        logits = self.classifier(summed)
        out = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
        if self.learned_up is not None:
            out = out + self.learned_up(summed).float()[..., :out_size[0], :out_size[1]]
        return out
