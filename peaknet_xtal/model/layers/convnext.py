"""ConvNeXt-V2 building blocks with a single input channel.

The backbone follows the published ConvNeXt-V2 family (7x7 depthwise conv, LayerNorm, inverted
bottleneck MLP with Global Response Normalisation, no layer-scale) so that its parameter counts
match the published sizes exactly; only the stem takes one channel because detector images are
monochrome.

Why not timm's ConvNeXt-V2 (measured with ``benchmarks/compare_timm_convnext.py``, timm 1.0.31,
torch 2.13): the architectures agree -- identical parameter counts for every size from atto
(3,385,480) to huge (657,455,744), and with the same weights copied in, stage outputs equal to
within float32 rounding (max |diff| / max |value| 2e-7 to 1.6e-6, atto to nano) -- but not
exactly: timm's blocks use 1x1 convolutions and a channels-first GRN where these use
``nn.Linear`` on channels-last tensors, so values differ in the last bits and a probability at the
threshold could flip a peak.  timm also requires torchvision, whose PyPI wheel does not load
against the project's pinned CPU torch (timm cannot be imported in the project's environment
without a stand-in), its parameter names differ from those of the shipped weights, and it has no
per-stage output norms (``out_norms``), which the neck needs.  So the backbone stays here.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peaknet_xtal.model.layers.valid_stats import channel_norms, weights_at
from peaknet_xtal.model.layers.window_stats import window_cells, window_mean


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor.

    BatchNorm is avoided throughout: batches here are tiny (one detector frame is already large) and
    statistics across frames from different detectors would leak between images.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalisation (channels-last): boosts channels with large spatial energy.

    Starts as the identity (gamma = beta = 0), which keeps deep stacks stable from scratch.
    With ``fixed`` the per-channel response ``nx`` is a stored buffer instead of a statistic of
    the input image (``model/fixed_stats.py``): the layer is then pointwise, so what comes out at a
    pixel no longer depends on the rest of the tile.
    """

    nx: torch.Tensor

    def __init__(self, dim: int, eps: float = 1e-6, fixed: bool = False, window: int = 0) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.eps = eps
        self.fixed = fixed
        self.window = window  # cells; 0: the whole image (layers/window_stats.py)
        if fixed:
            self.register_buffer("nx", torch.ones(1, 1, 1, dim))

    def response(self, x: torch.Tensor) -> torch.Tensor:
        """The per-image, per-channel response ``(B, 1, 1, C)`` of a channels-last ``x``, over
        its valid positions where the input has masked pixels (layers/valid_stats.py)."""
        positions = weights_at(x.shape[1], x.shape[2])
        if positions is None:
            gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        else:
            gx = channel_norms(x, positions).unsqueeze(1)  # (B, 1, 1, C)
        return gx / (gx.mean(dim=-1, keepdim=True) + self.eps)

    def local_response(self, x: torch.Tensor) -> torch.Tensor:
        """The response per position, ``(B, H, W, C)``, from each channel's energy over the
        ``window`` around it (layers/window_stats.py)."""
        energy = window_mean(x.pow(2).permute(0, 3, 1, 2), self.window).permute(0, 2, 3, 1)
        # floored: a window of zeros (masked, padded) has no finite gradient at 0, and the
        # cumulative sums can leave an energy of zero a rounding error below it
        gx = torch.sqrt(energy.clamp_min(self.eps ** 2))
        return gx / (gx.mean(dim=-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed:
            nx = self.nx
        elif self.window:
            nx = self.local_response(x)
        else:
            nx = self.response(x)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtV2Block(nn.Module):
    """7x7 depthwise conv -> LN -> Linear(d, 4d) -> GELU -> GRN -> Linear(4d, d), plus residual.

    ``grn=False`` leaves GRN out (the ConvNeXt-V1 block without layer scale): every operation is
    then local, so the block's output at a pixel depends only on its 7 x 7 neighbourhood.
    """

    grn: GRN | None

    def __init__(self, dim: int, drop_path: float = 0.0, fixed_stats: bool = False,
                 window: int = 0, grn: bool = True) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim, fixed=fixed_stats, window=window) if grn else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))
        if self.grn is not None:
            y = self.grn(y)
        y = self.pwconv2(y)
        y = y.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0.0:
            keep = torch.rand(y.shape[0], 1, 1, 1, device=y.device) >= self.drop_path
            y = y * keep.to(y.dtype) / (1.0 - self.drop_path)
        return x + y


class ConvNeXtV2Backbone(nn.Module):
    """Four stages at strides 4/8/16/32; returns one normalised feature map per stage.

    ``feature_info`` lists ``{"channels", "stride"}`` per output so that the neck and head size
    themselves from the backbone rather than from hard-coded widths.  ``grn=False`` builds the
    blocks without GRN (:class:`ConvNeXtV2Block`).
    """

    def __init__(self, dims: list[int] | tuple[int, ...], depths: list[int] | tuple[int, ...],
                 in_chans: int = 1, drop_path: float = 0.0, fixed_stats: bool = False,
                 stats_window: int = 0, grn: bool = True) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"dims {list(dims)} and depths {list(depths)} differ in length")
        self.dims = [int(d) for d in dims]
        self.depths = [int(d) for d in depths]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                                  LayerNorm2d(dims[0], eps=1e-6))
        self.downsamples = nn.ModuleList()
        for i in range(1, len(dims)):
            self.downsamples.append(nn.Sequential(
                LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dims[i], 2, stride=2)))
        total = sum(self.depths)
        rates = [drop_path * k / max(total - 1, 1) for k in range(total)]
        self.stages = nn.ModuleList()
        start = 0
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths, strict=False)):
            cells = window_cells(stats_window, 4 * 2 ** i) if stats_window else 0
            self.stages.append(nn.Sequential(
                *[ConvNeXtV2Block(dim, rates[start + j], fixed_stats, cells, grn)
                  for j in range(depth)]))
            start += depth
        self.out_norms = nn.ModuleList(LayerNorm2d(d, eps=1e-6) for d in self.dims)

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        return [{"channels": d, "stride": 4 * 2 ** i} for i, d in enumerate(self.dims)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = stage(x)
            feats.append(self.out_norms[i](x))
        return feats
