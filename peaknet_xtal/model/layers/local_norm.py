"""Local input normalisation: each pixel measured against its own neighbourhood's background.

Why: a global standardisation (one median and one sigma per tile, ``layers.standardise``) takes
the large-scale background range for the noise whenever the background is strong and smooth
(kapton and solvent scatter on a Rayonix: ~1,000 ADU of range, 33 ADU of pixel noise), so a
340-ADU spot becomes 0.3 "sigma"; and it makes what the network sees depend on where tiles are cut
and how panels are laid out.  Every classic finder uses a local background; so does this.

``z = asinh((x - B) / S)`` where ``B`` (background) and ``S`` (noise) are smooth maps built from
``block`` x ``block`` cells of the panel:

1. per cell, from one sample per 2 x 2 pixels (64 values for 16-px cells): the interquartile
   mean; then, on the residual from the interpolated background (step 4), a noise scale: the
   larger of the 16-84 % half range and the rms of the lowest 90 % of |residuals| (robust to
   the few spot and hot pixels a cell holds);
2. a 3 x 3 median over neighbouring cells (a cell full of one bright spot or a cluster of hot
   pixels takes its neighbours' values; a plane stays a plane);
3. cells still without a noise scale (empty photon-counting regions, where nearly every pixel is
   0) take the typical nonzero deviation of their 5 x 5 cell neighbourhood; cells with no valid
   pixel at all (masked gaps) take their nearest cell's values, so that a masked gap acts like a
   panel edge;
4. bilinear interpolation between cell centres (exact on linear gradients away from the edges).

Noise of a spot-sized sum (``noise="sum2x2"``, a model's ``norm_noise`` config; ``"pixel"``, the
default, is the scale above and what every model trained before it uses).  Why: on spatially
correlated noise (CCD point spread, the strong Rayonix backgrounds: neighbour correlation ~0.4-0.5)
the per-pixel scale is right pixel by pixel, but a 2 x 2 sum of the normalised input spreads ~1.4x
as much as on uncorrelated noise, so noise blobs of spot size look like weak spots (measured on
the selection frames: examples/train_default_model.py, benchmarks/selection_recall.py
--decorrelate).  Here the scale per cell is also measured on 2 x 2 sums of the residual from the
background, each divided by the square root of its valid pixels (half the sum for full groups):
the same spread as a pixel's on uncorrelated noise, larger by the noise excess of a sum on
correlated noise.  Each cell takes the larger of that and the pixel scale (steps 1-3, so sparse
photon-counting cells keep their single-photon scale), after the same 3 x 3 median: still per
panel and local, the same cells, so whole, tiled and embedded panels see the same input.

Panel-wide decorrelation (``noise="decorrelated"``): the pixel scale, then the whole panel's
normalised residual divided by one factor ``f``, how much more half a 2 x 2 sum of it spreads than
one pixel, from the neighbour correlations of its noise (measured on pixel differences, which
cancel what smooth background the local estimate leaves; sigma-clipped; ``f`` kept within [1, 2]:
1 on uncorrelated noise, 2 when neighbours move together).  Why it
exists beside ``sum2x2``: a model trained on the pixel scale sees the white noise it was trained on
wherever the noise is white (``f`` = 1), and on a correlated background noise blobs of spot size
shrink to the height they would have on white noise, while spots keep their height relative to
that noise.  Measured on the model-selection frames (examples/train_default_model.py): it removes
most false peaks of the strong-background blanks for a model trained on the pixel scale, where a
model retrained on the per-cell ``sum2x2`` scale learnt to call the blobs again.  One factor per
panel, so it depends on the panel, not on tiles; a standard deviation rather than a median
deviation, because photon-counting backgrounds are mostly one value (a median deviation of 0).
Cost, measured on one thread for a CSPAD frame's 32 panels: 0.078 s for the pixel scale, 0.150 s
decorrelated (the correlations from every 4th row; all rows took 0.80 s); later, with the
asinh and the clipped spreads through numpy, 0.14 and 0.19 s for its 64 ASICs; later still,
with the cells' statistics and the dither through numpy as below, decorrelated, 0.12 against
0.18 s for the CSPAD frame and 0.29 against 0.48 s for a Pilatus 6M frame of counts (CPU time,
old and new code alternating on the busy 2-core machine; the same input to the last bit).

Exact photon counts (:func:`dequantise_counts`): a panel whose valid pixels are all whole,
non-negative numbers with at least one count (Pilatus, Eiger and other counting detectors write
them) gets Gaussian noise of :data:`COUNT_DITHER` quanta (the step every count is a multiple
of: one photon on a counting detector) before the maps are made and the network sees it; the
peaks are still measured on the counts themselves (``finding.peaks``).  Why: the network was
trained on backgrounds with read noise (0.05-1 photon, uniform: the training bank of
examples/train_default_model.py), and on whole counts at a fraction of a photon per pixel the
quantiles above are biased (measured on Poisson panels: at 0.2-0.5 photons a pixel 0.6-1.3 % of
pixels lie beyond 5 "sigma" against 0.15-0.44 % with 0.3 photon of read noise), so single
photons and pairs look like weak spots.  Half a photon is the middle of the training draw.
Measured on the blank benchmark's model-selection frames (benchmarks/bench_blanks.py, exact
counts, 8 blanks and 8 hits each; false peaks per blank, blanks called hits, F1 on hits),
Pilatus 6M / Eiger 16M binned: without 3.9, 1 of 8, 0.64 / 14.3, 3 of 8, 0.71; dither 0.25:
2.1, 0, 0.72 / 5.4, 2, 0.76; 0.5: 2.0, 0, 0.72 / 4.9, 0, 0.72 (fresh noise per frame), 1.5, 0,
0.72 / 4.4, 1, 0.73 (this function).  Also measured and not kept: a Poisson-consistent
background (clipped cell means) and noise floor (square root of it) lowered the false peaks
less (2.1 / 9.3) and cost hit recall on the Pilatus (0.52 -> 0.44).  The dither
is set block by block (64 px) by each block's own count and anchored at the panel's first
valid row and column (:func:`dither_noise`): the same panel gives the same input every time,
whole, tiled (the engine normalises whole panels) or embedded in a larger masked layout, and a
mask moves the noise of the blocks it touches only.  Integrating detectors' ADU are unaffected
in practice where they are whole numbers (pedestal-subtracted ones go negative; elsewhere half
an ADU is far below their noise), and float data are never touched.

What the network sees at a pixel depends on pixels within ~3 cells (~50 px for 16-px cells) and
on nothing else except where a panel is empty or masked; it does not depend on tile cuts: the
engine computes it once per whole panel before tiling (``PeakNet.normalise``).  A panel alone and
the same panel inside a larger layout with masked gaps get the same input when the layout puts
the panel on the 16-px cell grid (tests/model/test_local_norm.py); at other offsets the cells
differ and the background estimate changes by its own noise.  The finding engine hands over each
panel cut to its valid region (``finding.peaks.valid_region``), so masked margins around a panel
never move its cells there.  A large smooth gradient changes
the input by a few hundredths of a sigma on average.  Cost: two sorts of 1/4 of the pixels in
columns of 64 (one sorting network for every cell at once, :func:`sort_rows`), a merge for the
residuals' magnitudes, and a few full-resolution passes (benchmarks/bench_model.py prints the
whole model).  On the CPU the cells' statistics run through numpy, with torch's own sums and
square roots, so that they are the torch code's to the last bit (tests/model/test_local_norm.py
compares the two on every count of valid samples).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from peaknet_xtal.types import valid_start

DEFAULT_BLOCK = 16
#: noise scales: per pixel (the original), the larger of that and the noise of a 2 x 2 sum, or
#: the pixel scale times the panel's 2 x 2-sum noise excess (module docstring)
NOISE_SCALES = ("pixel", "sum2x2", "decorrelated")
#: the panel factor of ``decorrelated`` is kept within these (fully correlated neighbours: 2)
DECORRELATION_RANGE = (1.0, 2.0)
#: largest share of an image's values its factor's clipped spreads may leave out (Gaussian
#: noise: 0.006 % beyond 4 sigma; spots of a rich hit: a few hundredths of a per cent)
MAX_CLIPPED = 0.02
#: cells with fewer valid samples than this have no statistics of their own
MIN_SAMPLES = 8
#: quanta (photons): standard deviation of the noise given to exact photon counts (module doc)
COUNT_DITHER = 0.5
#: side of the dither's periodic noise field (pixels)
DITHER_PERIOD = 1024
#: side of the blocks whose own counts pick their window of that field (:func:`dither_noise`):
#: four normalisation cells, so that a mask moves the noise of few pixels beyond it
DITHER_BLOCK = 64
#: odd multipliers that mix a block's count and its place into its window (:func:`block_windows`)
_MIX = (1_000_003, 7_919, 104_729)
#: every this-many-th pixel is looked at first, on the tensor's own device: most float panels
#: show a fraction there, and then nothing is copied to the host
_INTEGER_PROBE_STEP = 97


def _cells(a: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, W) -> (B, ny, nx, k*k) with k = block // 2: the samples of each cell of a
    half-resolution image ``a`` (one sample per 2 x 2 pixels)."""
    b, h, w = a.shape
    ny, nx, k = 2 * h // block, 2 * w // block, block // 2
    return a.reshape(b, ny, k, nx, k).permute(0, 1, 3, 2, 4).reshape(b, ny, nx, k * k)


def _sorted(t: torch.Tensor) -> torch.Tensor:
    """``t.sort(-1).values``; on CPU without gradient through numpy (:func:`sort_rows`), whose
    sort of these 64-value rows is ~20x faster than torch's (the cells' statistics on the host
    sort by :func:`_sorted_columns` instead).  Sorting gives the same values either way (NaN
    last in all)."""
    if t.device.type == "cpu" and not t.requires_grad:
        return torch.from_numpy(sort_rows(t.detach().contiguous().numpy()))
    return t.sort(-1).values


#: fewer rows than this go to ``np.sort``: the network's fixed cost (a few numpy calls for each
#: of its stages) would outweigh what it saves
_NETWORK_MIN_ROWS = 256


@functools.cache
def _network_pays() -> bool:
    """Whether :func:`_bitonic` sorts 64-value columns faster than ``np.sort`` sorts the same
    values as rows on this machine, measured once (4,096 of them, best of two; ~20 ms).

    Why ask: where numpy sorts with SIMD (AVX-512 for 32-bit floats since numpy 1.23, AVX2
    too since numpy 2.0) its sort of these short rows takes ~1 ms for a CSPAD frame's cells,
    faster than the network; on the 2-core machine's AVX2 CPU with numpy 1.24 it took 16.7 ms
    against the network's 2.3.  Either way the same sorted values."""
    import time

    import numpy as np

    columns = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    rows = np.ascontiguousarray(columns.T)

    def best(work: Any) -> float:
        seconds = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            work()
            seconds = min(seconds, time.perf_counter() - start)
        return seconds

    return best(lambda: _bitonic(columns.copy())) < best(lambda: np.sort(rows, axis=-1))


def sort_rows(a: Any) -> Any:
    """``np.sort(a, axis=-1)`` of a float numpy array: the same values, in a new array.

    Why not ``np.sort`` itself: it sorts row by row, and a row of a cell's 64 samples is too
    short for its introsort to pay (26 ns a value on the 2-core machine's AVX2 CPU, numpy 1.24).
    Here all rows pass together through a bitonic sorting network (:func:`_bitonic`; rows
    padded with +inf to a power of two), each of its stages one ``np.minimum`` and one
    ``np.maximum`` vectorised across rows: 4.4 against 16.8 ms for a CSPAD frame's 9,984 rows
    of 64, one thread (2.3 ms of it the network, the rest the transposes).  A compare-exchange
    network gives exactly the sorted values (only the order of 0 and -0 may differ, which
    compare equal); rows with NaN, which min and max would spread, short inputs and machines
    where numpy's own sort is the faster (:func:`_network_pays`) go to ``np.sort``."""
    import numpy as np

    m = a.shape[-1]
    rows = a.reshape(-1, m)
    if (m < 2 or len(rows) < _NETWORK_MIN_ROWS or not _network_pays()
            or np.isnan(rows).any()):
        return np.sort(a, axis=-1)
    n = 1 << (m - 1).bit_length()
    work = np.empty((n, len(rows)), a.dtype)
    work[:m] = rows.T
    work[m:] = np.inf
    return np.ascontiguousarray(_bitonic(work)[:m].T).reshape(a.shape)


def _bitonic(work: Any) -> Any:
    """The columns of ``work`` (``(n, N)``, ``n`` a power of two) sorted: a bitonic network in
    its form without descending blocks (each merge starts by comparing element ``i`` of a block
    with element ``k - 1 - i``, then halves as usual), one vectorised step each.  Each step
    writes the smaller and the larger of its pairs into a second array, and the two swap roles
    (an in-place step took a third pass, the copy back: 5.5 against 2.3 ms for a CSPAD frame's
    cells); returns whichever holds the result, ``work`` or an array of its shape."""
    import numpy as np

    n, count = work.shape
    src, dst = work, np.empty_like(work)
    k = 2
    while k <= n:
        blocks, into = src.reshape(n // k, k, count), dst.reshape(n // k, k, count)
        low, high = blocks[:, :k // 2], blocks[:, k // 2:][:, ::-1]
        np.minimum(low, high, out=into[:, :k // 2])
        np.maximum(low, high, out=into[:, k // 2:][:, ::-1])
        src, dst = _half_cleaners(dst, src, k // 4)
        k *= 2
    return src


def _half_cleaners(src: Any, dst: Any, j: int) -> tuple[Any, Any]:
    """The bitonic merge's steps from distance ``j`` down to 1 on the columns of ``src``, each
    writing the smaller and the larger of its pairs into the other array; returns ``(result,
    spare)``."""
    import numpy as np

    n, count = src.shape
    while j >= 1:
        pairs, into = src.reshape(n // (2 * j), 2, j, count), dst.reshape(n // (2 * j), 2, j,
                                                                          count)
        np.minimum(pairs[:, 0], pairs[:, 1], out=into[:, 0])
        np.maximum(pairs[:, 0], pairs[:, 1], out=into[:, 1])
        src, dst = dst, src
        j //= 2
    return src, dst


def _cell_medians(xs: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """Robust centre (interquartile mean) of each cell's valid samples; NaN if too few."""
    n = vs.sum(-1)
    vals = _sorted(torch.where(vs, xs, float("inf")))
    # interquartile mean: as robust as the median to the few spot pixels of a cell, less noisy
    pos = torch.arange(xs.shape[-1], device=xs.device)
    nf = n.float().unsqueeze(-1)
    middle = (pos >= (0.25 * nf).floor()) & (pos < (0.75 * nf).ceil()) & (pos < nf)
    median = (torch.where(middle, vals, torch.zeros_like(vals)).sum(-1)
              / middle.sum(-1).clamp(min=1))
    return torch.where(n < MIN_SAMPLES, torch.full_like(median, float("nan")), median)


def _cell_noise(rs: torch.Tensor, vs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, typical nonzero |residual|) per cell from background-subtracted samples ``rs``.

    noise: the larger of the 16-84 % half range and the rms of the lowest 90 % of |residuals|
    (spot and hot pixels are the top few per cent); NaN where a cell has too few samples.
    """
    n = vs.sum(-1)
    last = (n - 1).clamp(min=0).float()
    inf = float("inf")
    vals = _sorted(torch.where(vs, rs, inf))

    def rank(q: float) -> torch.Tensor:
        return vals.gather(-1, (q * last).floor().long().unsqueeze(-1)).squeeze(-1)

    half_range = (rank(0.84) - rank(0.16)) / 2
    dev = _sorted(torch.where(vs, rs.abs(), inf))
    keep = torch.arange(rs.shape[-1], device=rs.device) < (0.9 * n.float()).ceil().unsqueeze(-1)
    finite_dev = finite(dev)
    kept = torch.where(keep & finite_dev, dev, torch.zeros_like(dev))
    rms = (kept.square().sum(-1) / (keep & finite_dev).sum(-1).clamp(min=1)).sqrt()
    # the scale of single photons on a sparse photon-counting cell (median residual 0)
    nz = finite_dev & (dev > 1e-6 * (1.0 + dev.masked_fill(~finite_dev, 0).amax(-1,
                                                                           keepdim=True)))
    typical = torch.where(nz, dev, torch.zeros_like(dev)).sum(-1) / nz.sum(-1).clamp(min=1)
    nan = torch.full_like(half_range, float("nan"))
    few = n < MIN_SAMPLES
    return (torch.where(few, nan, torch.maximum(half_range, rms)),
            torch.where(few | (nz.sum(-1) == 0), nan, typical))


def _on_host(t: torch.Tensor) -> bool:
    """Whether ``t``'s statistics go through numpy: on the CPU, without gradient."""
    return t.device.type == "cpu" and not t.requires_grad


def _by_sample(a: torch.Tensor, block: int) -> Any:
    """(B, h, w) half-resolution samples -> numpy (k*k, B*ny*nx), k = block // 2, a new array:
    each cell's samples down one column (the cells of :func:`_cells`, in its order), the layout
    in which :func:`_bitonic` sorts every cell at once with no transposes."""
    b, h, w = a.shape
    ny, nx, k = 2 * h // block, 2 * w // block, block // 2
    cells = a.detach().reshape(b, ny, k, nx, k).permute(2, 4, 0, 1, 3)
    # always a copy of its own (a view where the permutation moves nothing): it is sorted in
    # place
    cells = cells.clone() if cells.is_contiguous() else cells.contiguous()
    return cells.reshape(k * k, b * ny * nx).numpy()


def _sorted_columns(values: Any, ok: Any) -> Any:
    """Each column of numpy ``values`` (m, N) sorted, its values off ``ok`` taken as +inf (so
    after its valid ones); ``values`` is overwritten and may be returned."""
    import numpy as np

    np.copyto(values, np.inf, where=~ok)
    m, count = values.shape
    if m < 2 or count < _NETWORK_MIN_ROWS or np.isnan(values).any():
        return np.sort(values, axis=0)
    if not _network_pays():  # numpy's own sort, on rows in memory order
        rows = np.ascontiguousarray(values.T)
        rows.sort(axis=-1)
        return rows.T
    return _bitonic(_padded_rows(values))[:m]


def _padded_rows(values: Any) -> Any:
    """(m, N) ``values`` with rows of +inf below to a power of two (the array itself if m is
    one)."""
    import numpy as np

    m, count = values.shape
    n = 1 << max(0, m - 1).bit_length()
    if n == m:
        return values
    return np.concatenate([values, np.full((n - m, count), np.inf, values.dtype)])


def _sorted_magnitudes(ascending: Any) -> Any:
    """``np.sort(np.abs(ascending), axis=0)`` of columns already sorted ascending (+inf after
    their valid values), through a bitonic merge: sorted values' magnitudes fall and then rise
    (the negatives', then the rest's), a bitonic sequence, which the last log2(m) steps of the
    network sort (6 steps for 64 values, against 21 for a sort)."""
    import numpy as np

    m, count = ascending.shape
    size = np.abs(ascending)
    if m < 2 or count < _NETWORK_MIN_ROWS or np.isnan(size).any():
        return np.sort(size, axis=0)
    src = _padded_rows(size)
    return _half_cleaners(src, np.empty_like(src), len(src) // 2)[0][:m]


def _row_sums(columns: Any) -> torch.Tensor:
    """Each column's sum of numpy ``columns`` (m, N) float32, summed by torch along the rows
    of its transpose: the order, and so the float32 rounding, of :func:`_cell_medians` and
    :func:`_cell_noise` summing the same values laid out as (N, m)."""
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(columns.T)).sum(-1)


def _cell_medians_host(xs: torch.Tensor, vs: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`_cell_medians` of the cells of half-resolution samples ``xs`` (B, h, w) and their
    validity ``vs``, through numpy, as (B, ny, nx) float32: the same sorted values and ranks,
    the same sums (:func:`_row_sums`) and the rest in torch as there, so the same means to the
    last bit."""
    import numpy as np

    ok = _by_sample(vs, block)
    vals = _sorted_columns(_by_sample(xs, block), ok)
    n = np.count_nonzero(ok, axis=0)
    nf = n.astype(np.float32)
    pos = np.arange(len(vals), dtype=np.float32)[:, None]
    middle = ((pos >= np.floor(np.float32(0.25) * nf)) & (pos < np.ceil(np.float32(0.75) * nf))
              & (pos < nf))
    median = (_row_sums(np.where(middle, vals, np.float32(0)))
              / torch.from_numpy(np.count_nonzero(middle, axis=0)).clamp(min=1))
    median = torch.where(torch.from_numpy(n < MIN_SAMPLES), float("nan"), median)
    b, h, w = xs.shape
    return median.view(b, 2 * h // block, 2 * w // block)


def _cell_noise_host(rs: torch.Tensor, vs: torch.Tensor, block: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_cell_noise` of the cells of half-resolution residuals ``rs`` (B, h, w) and their
    validity ``vs``, through numpy, as two (B, ny, nx) float32 maps: the same sorted values
    (the magnitudes' order from the residuals' by :func:`_sorted_magnitudes`, not a second
    sort), ranks and comparisons, the same sums (:func:`_row_sums`) and the rest in torch as
    there, so the same statistics to the last bit (torch's float32 square root is not always
    numpy's, which rounds correctly: 13.2001286 against 13.2001276 for one cell of a CSPAD
    frame)."""
    import numpy as np

    ok = _by_sample(vs, block)
    with np.errstate(invalid="ignore"):  # empty cells: inf - inf, NaN as torch gives
        vals = _sorted_columns(_by_sample(rs, block), ok)
        n = np.count_nonzero(ok, axis=0)
        last = np.maximum(n - 1, 0).astype(np.float32)

        def rank(q: float) -> torch.Tensor:
            at = np.floor(np.float32(q) * last).astype(np.intp)
            return torch.from_numpy(np.take_along_axis(vals, at[None], 0)[0])

        half_range = (rank(0.84) - rank(0.16)) / 2
        dev = _sorted_magnitudes(vals)
    pos = np.arange(len(dev))[:, None]
    finite_dev = np.isfinite(dev)
    kept = (pos < np.ceil(np.float32(0.9) * n.astype(np.float32))) & finite_dev
    squares = np.where(kept, dev, np.float32(0))
    np.square(squares, out=squares)
    rms = (_row_sums(squares) / torch.from_numpy(np.count_nonzero(kept, axis=0)).clamp(
        min=1)).sqrt()
    # the scale of single photons on a sparse photon-counting cell (median residual 0)
    largest = torch.from_numpy(np.where(finite_dev, dev, np.float32(0)).max(0))
    nz = finite_dev & (dev > (1e-6 * (1.0 + largest)).numpy())
    count = torch.from_numpy(np.count_nonzero(nz, axis=0))
    typical = _row_sums(np.where(nz, dev, np.float32(0))) / count.clamp(min=1)
    few = torch.from_numpy(n < MIN_SAMPLES)
    noise = torch.where(few, float("nan"), torch.maximum(half_range, rms))
    typical = torch.where(few | (count == 0), float("nan"), typical)
    b, h, w = rs.shape
    cells = (b, 2 * h // block, 2 * w // block)
    return noise.view(cells), typical.view(cells)


def _medians_of_cells(xs: torch.Tensor, vs: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`_cell_medians` of the cells of half-resolution samples (B, h, w)."""
    if _on_host(xs):
        return _cell_medians_host(xs, vs, block)
    return _cell_medians(_cells(xs, block), _cells(vs, block))


def _noise_of_cells(rs: torch.Tensor, vs: torch.Tensor, block: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_cell_noise` of the cells of half-resolution residuals (B, h, w)."""
    if _on_host(rs):
        return _cell_noise_host(rs, vs, block)
    return _cell_noise(_cells(rs, block), _cells(vs, block))


def _upsample(grid: torch.Tensor, block: int, h: int, w: int) -> torch.Tensor:
    """Bilinear interpolation between cell centres: (B, C, ny, nx) -> (B, C, h, w)."""
    return F.interpolate(grid, scale_factor=block, mode="bilinear", align_corners=False)[
        ..., :h, :w]


def _nan_median_filter(grid: torch.Tensor, size: int) -> torch.Tensor:
    """NaN-aware ``size`` x ``size`` median over a (B, ny, nx) grid.

    Outside the grid counts as missing (NaN), like masked gaps between panels, so that a panel
    alone and the same panel inside a larger layout with masked gaps get the same values.
    """
    r = size // 2
    padded = F.pad(grid.unsqueeze(1), (r, r, r, r), value=float("nan"))
    if _on_host(grid):
        return _nan_median_host(padded[:, 0], size).view_as(grid)
    patches = F.unfold(padded, size)  # (B, size*size, ny*nx)
    return patches.nanmedian(dim=1).values.view_as(grid)


def _nan_median_host(padded: torch.Tensor, size: int) -> torch.Tensor:
    """``F.unfold(padded, size).nanmedian(dim=1).values`` of a NaN-padded (B, H, W) grid, through
    numpy: each window's values down a column, NaN taken as +inf behind the others, one sorting
    network for all (:func:`_sorted_columns`), and the lower middle of the values that are not
    NaN, as ``nanmedian`` takes it (NaN where all are).  The same order statistic; measured on
    one thread for a CSPAD frame's cells: 1.9 and 6.7 ms through torch for the 3 x 3 and the
    5 x 5 filter, under 1 ms each here."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    windows = sliding_window_view(padded.numpy(), (1, size, size))[..., 0, :, :]
    values = np.array(windows.transpose(3, 4, 0, 1, 2), order="C").reshape(size * size, -1)
    present = ~np.isnan(values)
    ordered = _sorted_columns(values, present)
    count = np.count_nonzero(present, axis=0)
    median = np.take_along_axis(ordered, (np.maximum(count - 1, 0) // 2)[None], 0)[0]
    median[count == 0] = np.nan
    return torch.from_numpy(median)


def _fill(grid: torch.Tensor, fallback: float) -> torch.Tensor:
    """NaN cells take the value of the nearest valid cell (growing one ring at a time through
    the four neighbours, first valid of up/down/left/right), else ``fallback``.

    Next to a panel's edge this reproduces the edge replication of the interpolation, so a
    masked gap and the panel's border look alike.
    """
    out = grid.clone()
    for _ in range(max(grid.shape[-2:])):
        bad = torch.isnan(out)
        if not bad.any():
            break
        p = F.pad(out.unsqueeze(1), (1, 1, 1, 1), value=float("nan"))[:, 0]
        candidates = [p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]
        fill = torch.full_like(out, float("nan"))
        for c in reversed(candidates):
            fill = torch.where(torch.isnan(c), fill, c)
        out = torch.where(bad, fill, out)
    return torch.nan_to_num(out, nan=fallback)


def background_maps(x: torch.Tensor, valid: torch.Tensor, block: int = DEFAULT_BLOCK,
                    noise_scale: str = "pixel") -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth background and noise maps, both (B, 1, H, W) float32, for a (B, 1, H, W) input.

    The noise is measured on the residual from the smooth background, so that a large gradient
    within a cell is not taken for noise; ``noise_scale="sum2x2"`` makes it at least the noise
    of a 2 x 2 sum (module docstring).
    """
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W), got {tuple(x.shape)}")
    if noise_scale not in NOISE_SCALES:
        raise ValueError(f"noise_scale must be one of {NOISE_SCALES}, got {noise_scale!r}")
    h, w = x.shape[-2:]
    ph, pw = (-h) % block, (-w) % block
    xf = x[:, 0].float()
    vf = valid[:, 0] & finite(xf)
    xf = torch.where(vf, xf, 0.0)
    if ph or pw:
        xf = F.pad(xf, (0, pw, 0, ph))
        vf = F.pad(vf, (0, pw, 0, ph))
    hp, wp = xf.shape[-2:]
    # Background samples: means of diagonal pixel pairs, centred on the 2 x 2 groups, so that the
    # cell medians sit at the cell centres where the interpolation puts them (exact on ramps).
    v00, v11 = vf[:, ::2, ::2], vf[:, 1::2, 1::2]
    pairs = torch.where(v00 & v11, (xf[:, ::2, ::2] + xf[:, 1::2, 1::2]) / 2,
                        torch.where(v00, xf[:, ::2, ::2], xf[:, 1::2, 1::2]))
    any_valid = _cells(v00 | v11, block)
    # cells without a valid sample (gaps, masked areas) take their nearest cell's values after
    # filtering, not a filtered mix of their neighbours: a masked gap then acts like an edge
    empty = ~any_valid.any(-1)
    nan = float("nan")
    median = _medians_of_cells(pairs, v00 | v11, block)
    median = _fill(_nan_median_filter(median, 3).masked_fill(empty, nan), 0.0)
    background = _upsample(median.unsqueeze(1), block, hp, wp)  # (B, 1, hp, wp)
    # Noise samples: single pixels (pair means would halve the variance), minus the background.
    noise, typical = _noise_of_cells(xf[:, ::2, ::2] - background[:, 0, ::2, ::2], v00, block)
    noise = _nan_median_filter(noise, 3).masked_fill(empty, nan)
    # no spread at all (empty photon-counting cells): the size of the rare nonzero values
    typical = _fill(_nan_median_filter(typical, 5).masked_fill(empty, nan), 1.0)
    scale_floor = 1e-6 * (median.abs() + 1.0)
    noise = torch.where(noise <= scale_floor, typical, noise)
    noise = torch.where(torch.isnan(noise) & ~empty, typical, noise)
    if noise_scale == "sum2x2":
        noise = torch.fmax(noise, _sum_noise(xf, vf, background[:, 0], block).masked_fill(
            empty, nan))
    noise = torch.maximum(_fill(noise, 1.0), scale_floor)
    return background[..., :h, :w], _upsample(noise.unsqueeze(1), block, h, w)


def _sum_noise(xf: torch.Tensor, vf: torch.Tensor, background: torch.Tensor,
               block: int) -> torch.Tensor:
    """Per cell (3 x 3 median-filtered, NaN where unknown) noise of 2 x 2 sums of the residual
    ``xf - background`` over valid pixels, each sum divided by the square root of its valid
    pixels: a pixel's noise on uncorrelated noise, more on correlated noise."""
    r = torch.where(vf, xf - background, torch.zeros_like(xf))
    sums = r[:, ::2, ::2] + r[:, 1::2, ::2] + r[:, ::2, 1::2] + r[:, 1::2, 1::2]
    count = (vf[:, ::2, ::2].int() + vf[:, 1::2, ::2].int() + vf[:, ::2, 1::2].int()
             + vf[:, 1::2, 1::2].int())
    scaled = sums / count.clamp(min=1).float().sqrt()
    noise, _ = _noise_of_cells(scaled, count > 0, block)
    return _nan_median_filter(noise, 3)


def finite(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(t)``; on CPU through numpy, whose test is vectorised: 0.5 against 6.8 ms
    for a CSPAD frame's 2.3 Mpx of float32 on one thread (torch's is not), four times a frame
    in the normalisation and once a batch of tiles in the network's input.  Booleans, so the
    same answer either way."""
    if t.device.type != "cpu" or t.requires_grad:
        return torch.isfinite(t)
    import numpy as np

    return torch.from_numpy(np.isfinite(t.detach().numpy()))


def fast_asinh(t: torch.Tensor) -> torch.Tensor:
    """``torch.asinh`` for inputs that need no gradient; on CPU as ``sign(t) * log(|t| +
    sqrt(t**2 + 1))`` in place through numpy (``log(2 |t|)`` beyond 1e18, where the square would
    overflow).  Why: numpy vectorises its float32 ``asinh`` only on AVX-512 CPUs (through SVML;
    measured in an earlier session: 2.5 ms per megapixel) and torch's is not vectorised; on an
    AVX2 CPU (the 2-core machine's AMD EPYC, numpy 1.24, one thread, a CSPAD frame's 2.3 Mpx)
    either library's ``asinh`` took 46 ms, these five vectorised passes 9.7 ms.  Within 3e-7 of
    the exact value (float32 rounding; float32 ``np.arcsinh``: 2e-7)."""
    if t.device.type != "cpu" or t.requires_grad:
        return torch.asinh(t)
    import numpy as np

    x = t.detach().contiguous().numpy()
    a = np.abs(x)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.square(a)
        out += 1
        np.sqrt(out, out=out)
        out += a
        np.log(out, out=out)
    big = a > _ASINH_LOG_ABOVE
    if big.any():
        out[big] = np.log(a[big]) + np.log(2.0).astype(x.dtype)
    return torch.from_numpy(np.copysign(out, x, out=out))


#: beyond this magnitude ``asinh(t) = log(2 |t|)`` to float32 precision, and ``t**2`` nears
#: float32's overflow (3e38)
_ASINH_LOG_ABOVE = 1e18


#: the decorrelation's clipped spreads: clipped at this many standard deviations, this often
CLIP, CLIP_ROUNDS = 4.0, 3


def _clipped_std(values: torch.Tensor, ok: torch.Tensor, clip: float = CLIP,
                 rounds: int = CLIP_ROUNDS) -> torch.Tensor:
    """Per row of (B, N) ``values`` over ``ok``: the standard deviation after ``rounds`` of
    clipping at ``clip`` standard deviations around the mean (spots, hot pixels and streaks are
    the few far values); 0 where a row has fewer than two such values, or where clipping took
    more than :data:`MAX_CLIPPED` of them: then the values are no noise with a few outliers (a
    sparse photon count, whose single photons sit beyond ``clip`` deviations of the zeros, so
    that clipping would leave the zeros' spread of nothing).  Sums in float64; on CPU through
    numpy (:func:`_clipped_std_numpy`), whose float64 sums of float32 values are ~8x faster than
    torch's."""
    if values.device.type == "cpu" and not values.requires_grad:
        import numpy as np

        return torch.from_numpy(_clipped_std_numpy(
            np.ascontiguousarray(values.detach().numpy(), dtype=np.float32),
            np.ascontiguousarray(ok.numpy()), clip, rounds))
    v = torch.where(ok, values.float(), torch.zeros((), dtype=torch.float32))
    keep = ok
    std = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
    for _ in range(rounds):
        w = keep.float()
        n = w.sum(-1, dtype=torch.float64)
        mean = (v * w).sum(-1, dtype=torch.float64) / n.clamp(min=1)
        dev = v - mean.float().unsqueeze(-1)
        var = (dev * dev * w).sum(-1, dtype=torch.float64) / (n - 1).clamp(min=1)
        std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
        keep = ok & (dev.abs() <= clip * std.float().unsqueeze(-1))
    clipped = 1.0 - keep.sum(-1) / ok.sum(-1).clamp(min=1)
    return torch.where(clipped > MAX_CLIPPED, torch.zeros_like(std), std)


def _clipped_std_numpy(values: Any, ok: Any, clip: float, rounds: int,
                       zeroed: bool = False) -> Any:
    """:func:`_clipped_std` on float32 / bool numpy rows, the same statistic (the same float32
    deviations and clipping tests, float64 sums); measured on one thread for a CSPAD frame's
    six correlation offsets: 66 ms through torch, 16 ms here.  ``zeroed``: ``values`` are 0
    off ``ok`` already (:func:`_difference_variance` makes them so).

    Where every value and every deviation is finite (anything a noise image gives), the values
    and deviations left out of a round's sums are multiplied by 0 rather than replaced by it:
    the same sums (a product by 0 adds nothing, as the 0 did), in fewer and cheaper passes than
    ``np.where``, into arrays made once (7.1 -> 4.5 ms an offset of a CSPAD frame, one
    thread).  Otherwise :func:`_clipped_std_where` (a product by 0 of an infinity is NaN)."""
    import numpy as np

    v = values if zeroed else np.where(ok, values, np.float32(0))
    with np.errstate(over="ignore", invalid="ignore"):
        span = np.float32(v.max(initial=0)) - np.float32(v.min(initial=0)) if v.size else 0
    if not np.isfinite(span):  # non-finite values, or deviations that could overflow
        return _clipped_std_where(v, ok, clip, rounds)
    keep = ok
    total = np.count_nonzero(ok, axis=-1)
    n = total.astype(np.float64)
    std = np.zeros(len(v))
    dev, square, kept_buffer = np.empty_like(v), np.empty_like(v), np.empty_like(ok)
    for round_ in range(rounds):
        if round_:
            n = np.count_nonzero(keep, axis=-1).astype(np.float64)
        kept = v if keep is ok else np.multiply(v, keep, out=square)
        mean = kept.sum(-1, dtype=np.float64) / np.maximum(n, 1)
        np.subtract(v, mean.astype(np.float32)[:, None], out=dev)
        np.multiply(dev, keep, out=square)
        np.square(square, out=square)
        var = square.sum(-1, dtype=np.float64) / np.maximum(n - 1, 1)
        std = np.where(n >= 2, np.sqrt(var), 0.0)
        np.abs(dev, out=dev)
        keep = np.less_equal(dev, (clip * std).astype(np.float32)[:, None], out=kept_buffer)
        keep &= ok
    clipped = 1.0 - np.count_nonzero(keep, axis=-1) / np.maximum(total, 1)
    return np.where(clipped > MAX_CLIPPED, 0.0, std)


def _clipped_std_where(v: Any, ok: Any, clip: float, rounds: int) -> Any:
    """:func:`_clipped_std_numpy` for values 0 off ``ok``, through ``np.where`` (any values,
    infinities included)."""
    import numpy as np

    keep = ok
    std = np.zeros(len(v))
    for _ in range(rounds):
        n = np.count_nonzero(keep, axis=-1).astype(np.float64)
        kept = v if keep is ok else np.where(keep, v, np.float32(0))
        mean = kept.sum(-1, dtype=np.float64) / np.maximum(n, 1)
        dev = v - mean.astype(np.float32)[:, None]
        square = np.where(keep, dev, np.float32(0))
        np.square(square, out=square)
        var = square.sum(-1, dtype=np.float64) / np.maximum(n - 1, 1)
        std = np.where(n >= 2, np.sqrt(var), 0.0)
        np.abs(dev, out=dev)
        keep = ok & (dev <= (clip * std).astype(np.float32)[:, None])
    clipped = 1.0 - np.count_nonzero(keep, axis=-1) / np.maximum(np.count_nonzero(ok, axis=-1), 1)
    return np.where(clipped > MAX_CLIPPED, 0.0, std)


#: pixel offsets whose differences give the neighbour correlations of a 2 x 2 sum's spread
_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (1, -1))
#: offsets taken as uncorrelated: their differences give the noise's own variance
_FAR = ((0, 4), (4, 0))
#: rows of a panel the correlations are measured on: every ROW_STEP-th (cost, not accuracy)
ROW_STEP = 4


def _difference_variance(r: torch.Tensor, valid: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Per image (B,): clipped variance of ``r[y + dy, x + dx] - r[y, x]`` over valid pairs on
    every :data:`ROW_STEP`-th row ``y`` (a noise statistic needs no more: hundreds of thousands
    of pairs on a detector panel); 0 (unknown) where the panel is too small for the offset."""
    h, w = r.shape[-2:]
    if dy >= h or abs(dx) >= w:  # a panel's thin valid region, a strip of pixels: no pairs
        return torch.zeros(len(r), dtype=torch.float64, device=r.device)
    x0, x1 = max(0, -dx), w - max(0, dx)
    rows, shifted = slice(0, h - dy, ROW_STEP), slice(dy, h, ROW_STEP)  # views, not copies
    if r.device.type == "cpu" and not r.requires_grad:  # numpy: no copies of the strided rows
        import numpy as np

        rn, vn = r.detach()[:, 0].numpy(), valid[:, 0].numpy()
        okn = vn[:, rows, x0:x1] & vn[:, shifted, x0 + dx:x1 + dx]
        with np.errstate(invalid="ignore", over="ignore"):  # what invalid pixels hold
            dn = np.subtract(rn[:, shifted, x0 + dx:x1 + dx], rn[:, rows, x0:x1])
        np.copyto(dn, np.float32(0), where=~okn)
        return torch.from_numpy(_clipped_std_numpy(dn.reshape(len(dn), -1),
                                                   okn.reshape(len(okn), -1), CLIP, CLIP_ROUNDS,
                                                   zeroed=True)) ** 2
    a, b = r[:, 0, rows, x0:x1], r[:, 0, shifted, x0 + dx:x1 + dx]
    ok = valid[:, 0, rows, x0:x1] & valid[:, 0, shifted, x0 + dx:x1 + dx]
    d = torch.where(ok, b - a, torch.zeros_like(a))
    return _clipped_std(d.reshape(len(d), -1), ok.reshape(len(ok), -1)) ** 2


def decorrelation_factor(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per image of a (B, 1, H, W) normalised residual ``r``: how much more a half 2 x 2 sum
    spreads than one pixel, ``f**2 = 1 + rho_h + rho_v + (rho_d1 + rho_d2) / 2``, with each
    neighbour correlation ``rho = 1 - V(neighbour) / V(far)`` from the variances ``V`` of pixel
    differences (a difference cancels the smooth background the local one leaves, which a spread
    of sums would count as correlated noise), kept within :data:`DECORRELATION_RANGE`; 1 where a
    variance is unknown (see :func:`_clipped_std`).  Shape (B,)."""
    far = torch.stack([_difference_variance(r, valid, dy, dx) for dy, dx in _FAR]).mean(0)
    near = torch.stack([_difference_variance(r, valid, dy, dx) for dy, dx in _NEIGHBOURS])
    rho = 1.0 - near / far.clamp(min=1e-30)
    squared = 1.0 + rho[0] + rho[1] + (rho[2] + rho[3]) / 2
    known = (far > 0) & (near > 0).all(0)
    lo, hi = DECORRELATION_RANGE
    factor = torch.where(known, squared.clamp(min=0.0).sqrt(), torch.ones_like(squared))
    return factor.clamp(lo, hi).float()


def exact_counts(image: Any, ok: Any) -> tuple[int, float] | None:
    """``(total, quantum)`` of a 2-D float numpy ``image`` over its ``ok`` pixels if those are
    all whole, non-negative numbers, at least one above 0 (exact photon counts), else None; the
    quantum is a photon's worth, the largest step every count is a multiple of
    (:func:`count_quantum`: 1 on a counting detector)."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        values = np.where(ok, image, np.float32(0))
    if values.min() < 0 or not np.array_equal(values, np.rint(values)):
        return None  # NaN compares unequal: a non-finite ok pixel is no count either
    total = int(values.sum(dtype=np.float64))
    if total <= 0:
        return None
    if (values == 1).any():  # the smallest whole number above 0: a counting detector's frame
        return total, 1.0
    return total, count_quantum(values, float(np.where(values > 0, values,
                                                       np.float32(np.inf)).min()))


def count_quantum(values: Any, smallest: float) -> float:
    """The largest step that every one of ``values`` (whole, non-negative numbers: a numpy
    array or a tensor, masked pixels 0) is a multiple of, from their ``smallest`` above 0:
    Euclid's algorithm over the array, one pass a step (two on whole-number ADU, where the
    remainders' smallest is 1).

    Why not the smallest count itself: on an integrating detector whose whole-number ADU stand
    on a pedestal or offset (a CSPAD ASIC with a stale dark 300 ADU high, raw frames of a CCD
    with its bias) the smallest value is the background's floor, not a photon; taken for the
    quantum, its half-quantum dither (about 125 ADU there) drowned the ASIC's 10 ADU of noise and
    its spots (15 peaks -> 1 on a real CSPAD still).  The common step is 1 ADU there, whose
    dither is far below the noise, as for any integrating detector's whole numbers; counts
    stored at 30 ADU a photon keep 30."""
    quantum = smallest
    while True:
        rest = values % quantum  # exact on whole numbers (float64 for torch's floor-based one)
        left = rest[rest > 0]
        if len(left) == 0:
            return float(quantum)
        step = math.gcd(int(quantum), int(left.min()))
        if not 0 < step < quantum:  # each step shrinks on whole numbers; never loop on others
            return 1.0
        quantum = float(step)


def _device_counts(x: torch.Tensor, ok: torch.Tensor
                   ) -> list[tuple[float, tuple[int, int]] | None]:
    """``(quantum, origin)`` for each image of a (B, H, W) float32 ``x`` whose ``ok`` pixels
    are exact counts (:func:`exact_counts`), else ``None``; ``origin`` is the first row and the
    first column holding an ok pixel (where :func:`dither_noise` anchors its blocks).  On the
    tensors' own device, with one wait for the device in all; the same answers as
    :func:`_host_counts`.  Why not on the CPU: torch's reductions there took 82 ms for a
    Pilatus 6M frame, numpy's 35."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    values = torch.where(ok, x, zero)
    whole = (values == values.round()).flatten(1).all(1)  # NaN is not whole
    exact = whole & (values.amin((-2, -1)) >= 0) & (values.sum((-2, -1), dtype=torch.float64) > 0)
    quantum = torch.where(values > 0, values, zero + float("inf")).amin((-2, -1))
    first = [torch.where(ok.any(axis), torch.arange(ok.shape[-1 - (axis == -1)],
                                                    device=ok.device), ok.numel()).amin(-1)
             for axis in (-1, -2)]  # first ok row, first ok column
    found = torch.stack([exact.double(), quantum.double(), first[0].double(),
                         first[1].double()], 1).tolist()
    return [(count_quantum(values[i].double(), step) if step > 1 else step,
             _origin(int(oy), int(ox)))
            if is_exact else None
            for i, (is_exact, step, oy, ox) in enumerate(found)]


def _origin(first_row: int, first_col: int) -> tuple[int, int]:
    """Where the dither's blocks start: the first row and column holding an ok pixel, or the
    array's own edge past a masked margin of at most ``types.MASKED_EDGE`` (where the finding
    engine's valid region starts too: ``finding.peaks.valid_region``)."""
    return valid_start(first_row), valid_start(first_col)


def _host_counts(image: Any, ok: Any) -> tuple[float, tuple[int, int]] | None:
    """:func:`_device_counts` for one numpy image on the host."""
    counts = exact_counts(image, ok)
    if counts is None:
        return None
    return counts[1], _origin(int(ok.any(1).argmax()), int(ok.any(0).argmax()))


@functools.cache
def _dither_base(device: str = "cpu") -> torch.Tensor:
    """One :data:`DITHER_PERIOD`-square field of unit Gaussian noise, drawn once (numpy's
    generator: every device gets the same field), tiled 2 x 2 so that every
    :data:`DITHER_BLOCK`-square window of it is one slice, and kept on each device that asks: a
    fresh float32 draw for a Pilatus 6M frame costs 90 ms on one thread."""
    if device != "cpu":
        return _dither_base().to(device)  # the host's field: drawn once, the same values
    import numpy as np

    field = np.random.default_rng(DITHER_PERIOD).standard_normal(
        (DITHER_PERIOD, DITHER_PERIOD), dtype=np.float32)
    return torch.from_numpy(np.tile(field, (2, 2)))


def block_windows(totals: Any, iy: Any, ix: Any) -> tuple[Any, Any]:
    """Where each dither block's noise starts in the field (:func:`dither_noise`): rows and
    columns from the blocks' counts ``totals`` (int64, numpy or torch, ``(nby, nbx)``) and their
    places ``iy`` (a column of block rows) and ``ix`` (a row of block columns), so that blocks
    with the same count (empty ones) get different noise and one count more moves one block's
    noise."""
    period = DITHER_PERIOD
    key = (totals % (period * period) * _MIX[0] + iy * _MIX[1] + ix * _MIX[2]) % (period * period)
    return key // period, key % period


def dither_noise(ok: Any, values: Any, origin: tuple[int, int]) -> Any:
    """Unit Gaussian noise for one image (numpy arrays on the host, tensors on their device):
    zero before ``origin``; from there in :data:`DITHER_BLOCK`-square blocks, each a window of
    the field (:func:`_dither_base`) that the block's total count over its ``ok`` pixels of
    ``values`` picks (:func:`block_windows`).  The same values on every device.

    Why blocks: a mask (a DIALS mask, a beam stop) or one more photon moves the noise of the
    blocks it touches and no other (with one shift for the whole image, set by its total count,
    a masked quarter of a real Pilatus 6M frame moved the noise, and so the peaks, everywhere
    else); the frames of a run still get different noise where they hold photons (a fixed
    pattern would put the same faint bumps under every frame's photons).  Why anchored at the
    first ok row and column: a panel alone and the same panel inside a larger masked layout get
    the same noise on the same pixels (a masked margin of at most ``types.MASKED_EDGE`` keeps the
    array's edge, as a border mask moves no block then; the caller's ``origin``).  Cost on one
    thread for a Pilatus 6M frame of counts: about 20 ms more than one shifted field for the
    whole frame."""
    if isinstance(values, torch.Tensor):
        return _device_dither(ok, values, origin)
    return _host_dither(ok, values, origin)


def _device_dither(ok: torch.Tensor, values: torch.Tensor, origin: tuple[int, int]
                   ) -> torch.Tensor:
    """:func:`dither_noise` in torch, on ``values``' device."""
    k, (oy, ox) = DITHER_BLOCK, origin
    h, w = values.shape[-2] - oy, values.shape[-1] - ox
    nby, nbx = -(-h // k), -(-w // k)
    device = values.device
    counts = torch.where(ok, values, torch.zeros((), dtype=values.dtype, device=device))
    counts = F.pad(counts[oy:, ox:].double(), (0, nbx * k - w, 0, nby * k - h))
    totals = counts.view(nby, k, nbx, k).sum((1, 3)).round().long()
    rows, cols = block_windows(totals, torch.arange(nby, device=device).view(-1, 1),
                               torch.arange(nbx, device=device).view(1, -1))
    step = torch.arange(k, device=device)
    blocks = _dither_base(str(device))[(rows[..., None] + step).unsqueeze(-1),
                                       (cols[..., None] + step).unsqueeze(-2)]  # (nby, nbx, k, k)
    noise = torch.zeros(values.shape, dtype=torch.float32, device=device)
    noise[oy:, ox:] = blocks.permute(0, 2, 1, 3).reshape(nby * k, nbx * k)[:h, :w]
    return noise


def _host_dither(ok: Any, values: Any, origin: tuple[int, int]) -> Any:
    """:func:`dither_noise` in numpy (a gather through a strided view of the field).  The
    blocks' counts are summed in float64 from the image's own type (whole numbers: the same
    totals in any order) and each row of blocks is gathered straight into its place in the
    noise: 62 -> 19 ms for a Pilatus 6M frame on one thread, where a float64 copy, a padded
    copy, the gather and a reordering copy took their own passes."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    k, (oy, ox) = DITHER_BLOCK, origin
    h, w = values.shape[-2] - oy, values.shape[-1] - ox
    nby, nbx = -(-h // k), -(-w // k)
    counts = np.zeros((nby * k, nbx * k), values.dtype)
    np.copyto(counts[:h, :w], values[oy:, ox:], where=ok[oy:, ox:])
    totals = np.rint(counts.reshape(nby, k, nbx, k).sum((1, 3), dtype=np.float64)).astype(
        np.int64)
    rows, cols = block_windows(totals, np.arange(nby).reshape(-1, 1), np.arange(nbx))
    windows = sliding_window_view(_dither_base().numpy(), (k, k))
    noise = np.zeros((oy + nby * k, ox + nbx * k), np.float32)
    blocks = noise[oy:, ox:].reshape(nby, k, nbx, k)
    for row in range(nby):  # (nbx, k, k) windows into (k, nbx, k) rows of pixels
        blocks[row] = windows[rows[row], cols[row]].transpose(1, 0, 2)
    return noise[:values.shape[-2], :values.shape[-1]]


def dequantise_counts(x: torch.Tensor, valid: torch.Tensor,
                      sigma: float = COUNT_DITHER) -> torch.Tensor:
    """``x`` with Gaussian noise of ``sigma`` quanta on each image of exact photon counts
    (:func:`exact_counts`); other images unchanged (the same tensor when there are none).

    The noise (:func:`dither_noise`) is picked block by block by each block's own count: the
    same panel always gets the same input, alone or inside a larger masked layout, a mask moves
    the noise of the blocks it touches only, and the frames of a run different noise where they
    hold photons (a fixed pattern would put the same faint bumps under every frame's photons).
    Off the CPU everything stays on the tensors' device: on an H200 the host round trip of each
    counting frame held the whole normalisation to 35 frames/s of 2 Mpx
    (benchmarks/results/bench_gpu_h200.log).  A sparse probe of every
    :data:`_INTEGER_PROBE_STEP`-th pixel passes over most float images first."""
    probe = x.detach().flatten(1)[:, ::_INTEGER_PROBE_STEP].float()
    off_whole = valid.flatten(1)[:, ::_INTEGER_PROBE_STEP] & (
        (probe < 0) | (probe != probe.round()))  # NaN is off too
    maybe = torch.nonzero(~off_whole.any(1)).flatten().tolist()
    if not maybe:
        return x
    on_host = x.device.type == "cpu"
    images: torch.Tensor | list[torch.Tensor]
    if on_host:  # views of float32 images, no copy
        images = [x[i, 0].detach().float() for i in maybe]
        found = [_host_counts(image.numpy(), valid[i, 0].numpy())
                 for i, image in zip(maybe, images, strict=True)]
    else:
        images = x.detach()[maybe, 0].float()
        found = _device_counts(images, valid[maybe, 0])
    out: torch.Tensor | None = None
    for i, image, counts in zip(maybe, images, found, strict=True):
        if counts is None:
            continue
        quantum, origin = counts
        if out is None:
            out = x.float().clone()
        if on_host:
            noise = torch.from_numpy(dither_noise(valid[i, 0].numpy(), image.numpy(), origin))
        else:
            noise = dither_noise(valid[i, 0], image, origin)
        out[i, 0] += noise * torch.tensor(sigma * quantum, dtype=torch.float32)
    return x if out is None else out


@torch.no_grad()
def local_normalise(x: torch.Tensor, valid: torch.Tensor, block: int = DEFAULT_BLOCK,
                    noise_scale: str = "pixel") -> torch.Tensor:
    """``asinh((x - background) / noise)``, (B, 1, H, W) float32; invalid pixels become 0; with
    ``noise_scale="decorrelated"`` the residual is also divided by its image's
    :func:`decorrelation_factor`; exact photon counts are first :func:`dequantise_counts`-ed."""
    x = dequantise_counts(x, valid)
    background, noise = background_maps(x, valid, block,
                                        "pixel" if noise_scale == "decorrelated" else noise_scale)
    r = (x.float() - background) / noise
    ok = valid & finite(r)
    factor = decorrelation_factor(r, ok) if noise_scale == "decorrelated" else None
    # invalid and non-finite pixels to 0 before the asinh (which keeps 0 and is finite where
    # its input is), not after: fewer passes, the same input
    r = torch.where(ok, r, 0.0)
    if factor is not None:
        r /= factor.view(-1, 1, 1, 1)
    return fast_asinh(r)
