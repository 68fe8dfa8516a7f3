"""Fast exact sampling of per-pixel noise for whole detector frames.

``numpy.random.Generator.poisson`` costs 40-100 ms for a 2.2-Mpx frame and ``standard_normal``
about 18 ms, more than the rest of the simulation together, so both are replaced here by exact
samplers built from one float32 uniform per pixel and numpy's vectorised float32 maths.

Poisson: background means are small (well under a photon per pixel), so sampling by inversion of
the Poisson CDF is cheap.  One full-frame pass decides zero counts (``u <= exp(-lam)``); only the
few pixels above it stay in play, and after each inversion step the set shrinks geometrically.
Pixels with large means (spot cores, bright background) that are not zero get numpy's sampler
conditioned on a non-zero count (by rejection), which keeps the result exact.

Gaussian (read noise): the Box-Muller transform on float32 uniforms; exact in distribution up to
float32 resolution (the most extreme value it can give is 5.8 sigma).
"""
from __future__ import annotations

import numpy as np

#: Means at or above this go to numpy's sampler, which is faster there (measured: inversion wins
#: below about 1 photon, numpy above).
INVERSION_LIMIT = 1.5


def poisson_frame(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson counts (float32) for a flat float32 array of non-negative means."""
    lam = np.asarray(lam, dtype=np.float32)
    index, values = poisson_sparse(rng, lam)
    counts = np.zeros(lam.shape, dtype=np.float32)
    counts[index] = values
    return counts


def poisson_sparse(rng: np.random.Generator, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Poisson counts of a flat float32 array of means as (flat indices, float32 counts > 0).

    Most background pixels read zero, so callers that add the counts to another buffer skip a
    dense zero-filled frame and a full pass over it.  Same random stream as :func:`poisson_frame`.
    """
    lam = np.asarray(lam, dtype=np.float32).ravel()
    u = rng.random(lam.shape, dtype=np.float32)
    term = np.negative(lam)
    term = np.exp(term, out=term)  # P(N = 0); the CDF starts there
    idx = np.flatnonzero(u > term)  # every other pixel reads zero
    la = lam[idx]
    out_index, out_counts = [], []
    big = la >= np.float32(INVERSION_LIMIT)
    if big.any():
        out_index.append(idx[big])
        out_counts.append(_poisson_nonzero(rng, la[big].astype(np.float64)))
        idx, la = idx[~big], la[~big]
    u, term = u[idx], term[idx]
    cdf = term.copy()
    j = 0
    while idx.size:
        j += 1
        term *= la / np.float32(j)
        cdf += term
        # Stop a pixel once u falls under its CDF (or float32 round-off has flattened the CDF).
        stay = (u > cdf) & (term > np.float32(1e-12))
        done = idx[~stay]
        out_index.append(done)
        out_counts.append(np.full(done.size, j, dtype=np.float32))
        idx, u, la, term, cdf = idx[stay], u[stay], la[stay], term[stay], cdf[stay]
    if not out_index:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_index), np.concatenate(out_counts)


def _poisson_nonzero(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Poisson draws conditioned on N >= 1 (rejection; P(0) < 0.23 above the inversion limit)."""
    out = rng.poisson(lam).astype(np.float32)
    redo = np.flatnonzero(out == 0)
    while redo.size:
        out[redo] = rng.poisson(lam[redo])
        redo = redo[out[redo] == 0]
    return out


def gaussian_frame(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """``n`` independent normal deviates (float32) with standard deviation ``sigma``.

    Box-Muller: radius ``sqrt(-2 ln u1)`` with ``u1`` in (0, 1], angle ``2 pi u2``; the cosine and
    sine halves are two independent normals, so ``n`` values need ``n`` uniforms.
    """
    half = (n + 1) // 2
    u = rng.random(2 * half, dtype=np.float32)
    radius = np.log(np.float32(1.0) - u[:half])  # 1 - u is in (0, 1]: no log(0)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    radius *= np.float32(sigma)
    angle = u[half:]
    angle *= np.float32(2.0 * np.pi)
    out = np.empty(2 * half, dtype=np.float32)
    np.multiply(radius, np.cos(angle), out=out[:half])
    np.multiply(radius, np.sin(angle), out=out[half:])
    return out[:n]
