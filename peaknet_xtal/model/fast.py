"""A faster CPU inference form of a trained PeakNet: the same weights and the same function, with
the computation rearranged so that fewer full-size tensors are made.

``fuse_for_inference(model)`` returns an eval-mode copy (the original is untouched) in which:

- every ConvNeXt-V2 block computes ``pwconv2(GRN(y))`` as one batched matmul: GRN is
  ``y * (1 + gamma * n) + beta`` with ``n`` a per-image, per-channel factor, so its scale folds
  into a per-image copy of ``pwconv2``'s (small) weight and ``beta`` into its bias.  The four
  elementwise passes over the block's widest (4x) tensor go; only the norm's read stays.
- the per-image input standardisation takes its quantiles from a partial sort and its asinh from
  numpy (:func:`fast_standardise`; the local one, ``layers.local_norm``, already does);
- every BiFPN node runs its 1x1 conv, LayerNorm and GELU on one channels-last tensor (a matmul and
  a native last-axis LayerNorm) instead of a 1x1 conv and two layout copies around the norm;
- the head's learned x4 upsampling (a transposed conv) is one matmul whose taps are laid into the
  output by phase (:class:`PhaseConvTranspose`);
- a model with fixed image statistics (``model/fixed_stats.py``) has GRN's scale folded into
  ``pwconv2`` once, and each head GroupNorm into the conv before it.

Why here and not in the layers: training needs the plain form (GRN's parameters get gradients
through it, and the plain form is what the published ConvNeXt-V2 computes); the rearranged sums
differ from it only in float32 rounding (``tests/model/test_fast.py`` bounds the difference and
checks that the peaks are the same).  Measured on one thread on 64 CSPAD tiles in batches of 8
(CPU time, each idea beside the plain model in the same run): the GRN fold pays most (backbone
0.55 -> 0.38 s), then the partial-sort standardisation (0.26 -> 0.09 s) and the phase transposed
conv (12 -> 4.5 ms a batch); whole engine 0.61-0.73 of the plain time
(``benchmarks/bench_model.py``).  Tried and not used: a channels-last copy of the whole model,
oneDNN's fused linear+GELU, a ConvTranspose as matmul + ``F.fold``, patchified stem and
downsampling convs, bilinear logit upsampling by phases (none faster);
``torch.jit.freeze`` + ``optimize_for_inference`` (10 % slower, 3 s to prepare); ``torch.compile``
(first call not done after 7 minutes on the busy 2-core machine); onnxruntime 1.32 on the exported
plain network (10 % faster than this form on the network alone, 0.59 against 0.65 s, but an export
per tile shape and two more dependencies for it); OpenVINO 2026.4 (PyPI) on the traced plain
network, fp32, one inference thread: 0.9-1.4 times this form's time on CSPAD tiles and 1.2-1.6
times on a whole Pilatus 6M panel (four runs of ``benchmarks/bench_runtimes.py`` on a busy CPU
without AVX-512), after 7-42 s of conversion per input shape; int8 dynamic quantisation of the
linear layers (1.02x: the folded matmuls are not ``nn.Linear``).  bfloat16 autocast pays on CPUs
with native bfloat16 (1.1-1.7x) and is the engine's opt-in ``precision``
(``finding.settings.PRECISIONS``).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peaknet_xtal.model.layers.bifpn import SeparableConvNorm
from peaknet_xtal.model.layers.convnext import ConvNeXtV2Block
from peaknet_xtal.model.layers.head import ConvGNGELU, FixedGroupNorm
from peaknet_xtal.model.layers.valid_stats import channel_norms, weights_at


class FusedConvNeXtBlock(nn.Module):
    """A :class:`ConvNeXtV2Block` with GRN folded into the second pointwise layer (inference)."""

    gamma: torch.Tensor
    weight_t: torch.Tensor
    bias: torch.Tensor

    def __init__(self, block: ConvNeXtV2Block) -> None:
        super().__init__()
        self.dwconv = block.dwconv
        self.norm = block.norm
        self.pwconv1 = block.pwconv1
        self.act = block.act
        grn = block.grn
        self.eps = grn.eps if grn is not None else 0.0
        with torch.no_grad():
            weight_t = block.pwconv2.weight.detach().t().contiguous()  # (4d, d)
            bias = block.pwconv2.bias.detach()
            gamma = weight_t.new_zeros(1, weight_t.shape[0], 1)
            # fixed statistics (model/fixed_stats.py): the scale is one for every image; no GRN:
            # no scale
            self.fixed = grn is None or bool(grn.fixed)
            if grn is not None:
                gamma = grn.gamma.detach().reshape(1, -1, 1)  # (1, 4d, 1)
                bias = bias + grn.beta.detach().reshape(-1) @ weight_t
                if grn.fixed:
                    weight_t = weight_t * (1 + gamma[0] * grn.nx.detach().reshape(-1, 1))
        self.register_buffer("gamma", gamma)
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _gelu_(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1))), self.act)
        b, h, w, c = y.shape
        if self.fixed:
            out = torch.addmm(self.bias, y.reshape(b * h * w, c), self.weight_t)
            return out.view(b, h, w, -1).permute(0, 3, 1, 2).add_(x)
        positions = weights_at(h, w)
        if positions is None:
            # sum of squares, not vector_norm: measured 1.7x faster on these channels-last maps
            gx = y.square().sum((1, 2)).sqrt_().unsqueeze(-1)  # (b, 4d, 1)
        else:  # over valid positions only (layers/valid_stats.py)
            gx = channel_norms(y, positions).transpose(1, 2)  # (b, 4d, 1)
        scale = torch.addcmul(torch.ones_like(gx), self.gamma,
                              gx / (gx.mean(dim=1, keepdim=True) + self.eps))
        out = torch.baddbmm(self.bias, y.reshape(b, h * w, c), self.weight_t * scale)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2).add_(x)


class FastSeparableConvNorm(nn.Module):
    """A BiFPN node (:class:`SeparableConvNorm`) computed channels-last after the depthwise conv."""

    weight: torch.Tensor

    def __init__(self, node: SeparableConvNorm) -> None:
        super().__init__()
        self.depthwise = node.depthwise
        self.register_buffer("weight", node.pointwise.weight.detach().flatten(1).clone())
        self.norm = node.norm
        self.act = node.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.depthwise(x).permute(0, 2, 3, 1), self.weight)
        y = F.layer_norm(y, self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                         self.norm.eps)
        return _gelu_(y, self.act).permute(0, 3, 1, 2)


def _gelu_(y: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``act(y)``, in place when ``act`` is the exact GELU (one full-size tensor fewer)."""
    if type(act) is nn.GELU and act.approximate == "none":
        return torch.ops.aten.gelu_(y)
    return act(y)


class PhaseConvTranspose(nn.Module):
    """The head's learned upsampling (``ConvTranspose2d``, kernel ``s + 2``, stride ``s``,
    padding 1) as one matmul and ``s * s`` output phases.

    Output pixel ``s*I + r`` takes kernel row ``r + 1`` of input row ``I``, plus kernel row 0 of
    row ``I + 1`` (when ``r = s - 1``) or row ``s + 1`` of row ``I - 1`` (when ``r = 0``); the same
    along columns.  So the output is the matmul's centre ``s x s`` taps laid out in place, plus
    eight thin strips for the border taps.  oneDNN's general transposed convolution took 2.7x
    longer on the default model's head (12.3 against 4.5 ms for 8 CSPAD tiles, one thread).
    """

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if not phase_decomposable(conv):
            raise ValueError(f"not a kernel s+2, stride s, padding 1 transposed conv: {conv}")
        self.stride = int(conv.stride[0])
        cin, cout, k, _ = conv.weight.shape
        self.cout = int(cout)
        self.register_buffer("weight", conv.weight.detach().reshape(cin, cout * k * k).t()
                             .contiguous())
        bias = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(cout)
        self.register_buffer("bias", bias.reshape(1, cout, 1, 1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._phases(x, self.weight, self.bias, self.cout)

    def difference(self, x: torch.Tensor) -> torch.Tensor:
        """Output channel 1 minus channel 0, computed as one channel (two-class logits: what the
        peak probability needs; see ``layers.head.SegHead``)."""
        if self.cout != 2:
            raise ValueError(f"a logit difference needs two classes, got {self.cout}")
        taps = self.weight.shape[0] // 2
        weight = self.weight[taps:] - self.weight[:taps]
        return self._phases(x, weight, self.bias[:, 1:2] - self.bias[:, 0:1], 1)

    def _phases(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                o: int) -> torch.Tensor:
        b, _, h, w = x.shape
        s, k = self.stride, self.stride + 2
        taps = torch.matmul(weight, x.reshape(b, -1, h * w)).view(b, o, k, k, h, w)
        out = (taps[:, :, 1:-1, 1:-1].permute(0, 1, 4, 2, 5, 3) + bias).reshape(
            b, o, s * h, s * w)
        y = out.view(b, o, h, s, w, s)  # (b, o, I, r_y, J, r_x)
        y[:, :, :-1, -1] += taps[:, :, 0, 1:-1, 1:].permute(0, 1, 3, 4, 2)
        y[:, :, 1:, 0] += taps[:, :, -1, 1:-1, :-1].permute(0, 1, 3, 4, 2)
        y[:, :, :, :, :-1, -1] += taps[:, :, 1:-1, 0, :, 1:].permute(0, 1, 3, 2, 4)
        y[:, :, :, :, 1:, 0] += taps[:, :, 1:-1, -1, :, :-1].permute(0, 1, 3, 2, 4)
        y[:, :, :-1, -1, :-1, -1] += taps[:, :, 0, 0, 1:, 1:]
        y[:, :, :-1, -1, 1:, 0] += taps[:, :, 0, -1, 1:, :-1]
        y[:, :, 1:, 0, :-1, -1] += taps[:, :, -1, 0, :-1, 1:]
        y[:, :, 1:, 0, 1:, 0] += taps[:, :, -1, -1, :-1, :-1]
        return out


def phase_decomposable(conv: nn.Module) -> bool:
    """Whether :class:`PhaseConvTranspose` computes ``conv``."""
    if type(conv) is not nn.ConvTranspose2d:
        return False
    s = conv.stride[0]
    return (conv.stride == (s, s) and conv.kernel_size == (s + 2, s + 2)
            and conv.padding == (1, 1) and conv.output_padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and s >= 2)


def fuse_for_inference(model: Any) -> Any:
    """An eval-mode copy of ``model`` with the rearrangements above; modules of other kinds, and
    models without these layers, are returned copied but unchanged."""
    fused = copy.deepcopy(model).eval()
    for parent in list(fused.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is ConvNeXtV2Block and (child.grn is None or not child.grn.window):
                setattr(parent, name, FusedConvNeXtBlock(child))
            elif type(child) is SeparableConvNorm:
                setattr(parent, name, FastSeparableConvNorm(child))
            elif phase_decomposable(child):
                setattr(parent, name, PhaseConvTranspose(child))
            elif type(child) is ConvGNGELU and isinstance(child[1], FixedGroupNorm):
                setattr(parent, name, _conv_with_norm(child))
    for param in fused.parameters():
        param.requires_grad_(False)
    config = getattr(fused, "config", {})
    if config.get("family") == "peaknet" and config.get("input_norm", "global") == "global":
        fused.normalise = fast_standardise  # instance attribute: PeakNet.forward calls it
    fused.fused_for_inference = True
    return fused


def _conv_with_norm(block: ConvGNGELU) -> nn.Sequential:
    """A head block's bias-free conv and fixed-statistics GroupNorm as one conv with a bias (the
    norm is then a per-channel affine map), then its activation."""
    conv, norm, act = block[0], block[1], block[2]
    assert isinstance(conv, nn.Conv2d) and isinstance(norm, FixedGroupNorm)
    scale, shift = norm.channel_affine()
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        fused.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = shift if conv.bias is None else shift + conv.bias * scale
        fused.bias = nn.Parameter(bias.detach().clone())
    return nn.Sequential(fused, act)


def _order_quantiles(sample: torch.Tensor, qs: tuple[float, ...]) -> list[torch.Tensor]:
    """``torch.quantile(sample, qs)`` (linear interpolation), value for value, from a partial
    sort: numpy's ``partition`` selects the order statistics in O(n) where ``quantile`` sorts;
    the ranks, weights and ``lerp`` are torch's own, so the result is bit-identical."""
    import numpy as np

    ranks = torch.tensor(qs, dtype=sample.dtype) * (sample.numel() - 1)
    below, above = ranks.long(), ranks.ceil().long()
    kth = sorted({int(k) for k in below.tolist() + above.tolist()})
    part = torch.from_numpy(np.partition(sample.numpy(), kth))
    return list(torch.lerp(part[below], part[above], ranks - below))


def fast_standardise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`layers.standardise.standardise` for CPU inference: the same statistics (bit for
    bit: :func:`_order_quantiles`), the asinh through numpy (``local_norm.fast_asinh``, ~5x
    faster than torch's on CPU, equal to float32 rounding)."""
    from peaknet_xtal.model.layers.local_norm import fast_asinh
    from peaknet_xtal.model.layers.standardise import MAX_SAMPLES

    if x.device.type != "cpu":
        from peaknet_xtal.model.layers.standardise import standardise

        return standardise(x, valid)
    out = torch.empty_like(x, dtype=torch.float32)
    for b in range(x.shape[0]):
        xb = x[b].float()
        values = torch.from_numpy(xb.numpy()[valid[b].numpy()])
        if values.numel() == 0:
            median, sigma = values.new_zeros(()), values.new_ones(())
        else:
            step = max(1, values.numel() // MAX_SAMPLES)
            sample = values[::step].contiguous()
            median, high = _order_quantiles(sample, (0.5, 0.99))
            below = sample[sample <= high]
            sigma = below.std(unbiased=False) if below.numel() > 1 else sample.new_zeros(())
            sigma = torch.where(sigma > 1e-3 * (median.abs() + 1e-6), sigma,
                                torch.ones_like(sigma))
        zb = fast_asinh((xb - median) / sigma)
        out[b] = torch.where(valid[b], zb, torch.zeros_like(zb))
    return out
