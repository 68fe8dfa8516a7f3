"""Image-wide statistics over valid pixels only.

GRN (every ConvNeXt-V2 block) and GroupNorm (the head's branches) normalise by statistics of the
whole image they are given.  A masked pixel enters the network as 0, but its features are not 0,
and they entered those statistics too, so masking a region changed the peaks far from it (a user
trial: a DIALS mask over a quarter of a real Pilatus 6M frame left 127 of the other 402 peaks
where they were; with these statistics and the block-wise count dither of ``local_norm``, 394 of
400, the rest mostly beside the mask).  Here each such layer weighs each position by the fraction
of the input pixels under it that are valid (:func:`weights_at`: the validity map average-pooled
to the layer's resolution), so that a masked region drops out of the sums; a position half over
a gap counts half.  Padding to the model's multiple of 32 counts as valid, as it always did, and
an input with no masked pixel takes the layers' own unweighted code on the CPU
(:func:`statistics_over` sets no weights): bit-identical to the statistics the shipped weights
were trained with (off the CPU, see :func:`statistics_over`).  The shipped weights were
trained with unweighted statistics; on frames with gaps inside a panel (Pilatus and Eiger module
gaps) they now see statistics without the gaps (docs/measurements.md, "Masks and the image-wide
statistics", has what that changed).

How the weights reach the layers: :meth:`PeakNet.forward` and ``peak_logit`` run the network
inside :func:`statistics_over`, a context variable (per thread, per task) that the layers read
with :func:`weights_at` for their own feature map's size; outside it (other callers of the
layers) they see ``None`` and compute plain statistics.  Training goes through ``forward`` too,
so a model trained from now on meets the statistics it runs with.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F


class _Weights:
    """A (B, 1, H, W) validity map at the network input's size and its pooled copies."""

    def __init__(self, valid: torch.Tensor) -> None:
        self.valid = valid.float()
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, h: int, w: int) -> torch.Tensor:
        """(B, 1, h, w) weights for a feature map of ``h`` x ``w`` (a whole-number stride)."""
        found = self.cache.get((h, w))
        if found is None:
            big_h, big_w = self.valid.shape[-2:]
            if big_h % h or big_w % w:
                raise ValueError(f"a {h} x {w} map is no whole stride of {big_h} x {big_w}")
            # the share of valid pixels: needs no threshold and moves smoothly as a mask edge
            # crosses a cell (1 where any pixel is valid, or only where all are, gave the same
            # peaks within a few: the real Pilatus 6M thaumatin frame, its top-left 1200 x 1200
            # masked, 390-393 of the 395 peaks outside it unchanged with each of the three)
            found = F.avg_pool2d(self.valid, (big_h // h, big_w // w))
            self.cache[(h, w)] = found
        return found


_CURRENT: ContextVar[_Weights | None] = ContextVar("peaknet_valid_stats", default=None)


@contextlib.contextmanager
def statistics_over(valid: torch.Tensor | None) -> Iterator[None]:
    """Within it, the network's image-wide statistics weigh positions by ``valid``
    ((B, 1, H, W) bool at the padded input size); ``None``, or on the CPU all valid:
    unweighted, as before.  Off the CPU the weighted code runs even where every pixel is valid
    (weights of 1: the same statistics to float rounding, as a GPU's kernels give anyway):
    asking the device whether any pixel is masked would make the host wait for it once a
    batch, which the engine avoids everywhere (tests/test_meta_device.py)."""
    if valid is None:
        weights = None
    elif valid.device.type == "cpu":
        weights = None if bool(valid.all()) else _Weights(valid)
    else:  # no wait for the device to ask: the weighted code, the same statistics to rounding
        weights = _Weights(valid)
    token = _CURRENT.set(weights)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def weights_at(h: int, w: int) -> torch.Tensor | None:
    """The (B, 1, h, w) position weights for a feature map of that size, or ``None`` (no
    masked pixel, or outside :func:`statistics_over`): take the plain statistics."""
    current = _CURRENT.get()
    return None if current is None else current.at(h, w)


def channel_norms(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each channel's L2 norm of a channels-last ``x`` (B, H, W, C) over positions weighted by
    ``positions`` (B, 1, H, W), ``(B, 1, C)``: GRN's response over valid positions, one
    weighted sum of squares as a matrix product (plain and fused blocks alike)."""
    b, h, w, c = x.shape
    return torch.bmm(positions.reshape(b, 1, h * w).to(x.dtype),
                     x.reshape(b, h * w, c).square()).sqrt_()


def group_moments(x: torch.Tensor, groups: int, positions: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's mean and variance of ``x`` (B, C, H, W) over positions weighted by
    ``positions`` (B, 1, H, W), as float64 ``(B, groups)`` each: the weighted sums of ``x`` and
    ``x**2`` per channel as two matrix-vector products (a first form, with elementwise weighted
    sums, took 0.3 s more of a Pilatus 6M frame's network time)."""
    b, c, h, w = x.shape
    per = c // groups
    flat = x.reshape(b, c, h * w)
    pw = positions.reshape(b, h * w, 1).to(x.dtype)
    sums = torch.cat([torch.bmm(flat, pw), torch.bmm(flat.square(), pw)], -1).double()
    sums = sums.view(b, groups, per, 2).sum(2)  # (b, groups, 2)
    count = (pw.double().sum(1) * per).clamp_min(1e-12)  # (b, 1)
    mean = sums[..., 0] / count
    return mean, (sums[..., 1] / count - mean.square()).clamp_min(0.0)


def weighted_group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float, positions: torch.Tensor
                        ) -> torch.Tensor:
    """``F.group_norm`` with each group's mean and variance over positions weighted by
    ``positions`` (B, 1, H, W) (:func:`group_moments`); the normalisation itself applies
    everywhere, as one per-channel affine pass."""
    b, c = x.shape[:2]
    per = c // groups
    mean, variance = group_moments(x, groups, positions)
    inv = torch.rsqrt(variance + eps)  # (b, groups)
    scale = inv.repeat_interleave(per, dim=1)  # (b, c)
    shift = -(mean * inv).repeat_interleave(per, dim=1)
    if weight is not None:
        scale, shift = scale * weight.double(), shift * weight.double()
    if bias is not None:
        shift = shift + bias.double()
    return torch.addcmul(shift.to(x.dtype).view(b, c, 1, 1), x,
                         scale.to(x.dtype).view(b, c, 1, 1))
