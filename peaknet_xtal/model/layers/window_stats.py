"""Statistics over a window around each position instead of over the whole image.

Why: GRN (every ConvNeXt-V2 block) and GroupNorm (the head) normalise by statistics of the whole
input image, so what the network says at a pixel depends on the whole tile the engine hands it
and differs between a panel run whole and run in tiles (``benchmarks/tile_dependence.py``).
Stored averages make the layers pointwise (``model/fixed_stats.py``) but lose the gain control
the per-image statistics give on noisy frames.  Taken over a window of the training crop's size,
they keep that gain control, and a network trained with them sees at inference the statistics it
was trained with (a 96-px crop in training; a 96-px neighbourhood of every pixel of a large
panel), while what it says at a pixel depends on a bounded neighbourhood only.
"""
from __future__ import annotations

import torch


def window_cells(window_px: int, stride: int) -> int:
    """The odd window side, in cells of a feature map at ``stride``, that covers ``window_px``
    input pixels (at least one cell)."""
    cells = max(1, window_px // stride)
    return cells if cells % 2 else cells + 1


def window_mean(x: torch.Tensor, cells: int) -> torch.Tensor:
    """The mean of ``(B, C, H, W)`` ``x`` over the ``cells`` x ``cells`` window centred on each
    position, over the part of the window inside the map.  Separable (a mean along rows, then
    along columns, which over a rectangle is the 2-D mean), each from cumulative sums: with the
    training crop's 25-cell windows forward and backward take a quarter of the time of
    ``avg_pool2d`` with ``count_include_pad=False`` (one thread, 8 x 64 x 24 x 24: 26 against
    98 ms), which agrees with it to float rounding (``tests/model/test_window_stats.py``).
    The running sums are padded (zeros before, the total after) so that each window's sum is
    the difference of two shifted views, not of two gathers: 0.018 against 0.029 s for a GRN's
    8 x 64 x 48 x 48 on one thread, the same values.
    Half-precision input (bf16 or fp16 under GPU autocast) is summed in float32 and returned in
    its own dtype: a running sum over a row of a large panel in bf16 keeps about three digits,
    so the difference of two such sums, the window's sum, would be mostly rounding."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    pad = cells // 2
    for dim in (2, 3):
        n = x.shape[dim]
        sums = torch.cumsum(x, dim)
        before, after = list(sums.shape), list(sums.shape)
        before[dim], after[dim] = pad + 1, pad
        padded = torch.cat([sums.new_zeros(before), sums,
                            sums.narrow(dim, n - 1, 1).expand(after)], dim)
        at = torch.arange(n, device=x.device)
        count = (at + pad + 1).clamp(max=n) - (at - pad).clamp(min=0)
        shape = [1, 1, 1, 1]
        shape[dim] = n
        inverse = count.to(x.dtype).reciprocal().view(shape)
        # padded[i + 2 pad + 1] - padded[i]: the sum of x[i - pad .. i + pad] inside the map
        x = (padded.narrow(dim, 2 * pad + 1, n) - padded.narrow(dim, 0, n)) * inverse
    return x.to(dtype)
