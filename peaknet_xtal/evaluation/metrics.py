"""Accuracy of a peak finder: matching against truth, precision/recall/F1, and the PeakNet rates.

Matching is one-to-one (Hungarian, ``scipy.optimize.linear_sum_assignment``) between peaks on the
same panel closer than a pixel cutoff, so a finder cannot score twice by splitting one spot.

Pipeline rates as the PeakNet paper defines them:

- hit rate = frames called hits / all frames;
- indexing rate = indexed frames / hit frames;
- indexing yield = hit rate x indexing rate (= indexed frames / all frames).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def match_peaks(a_panel: np.ndarray, a_fs: np.ndarray, a_ss: np.ndarray,
                b_panel: np.ndarray, b_fs: np.ndarray, b_ss: np.ndarray,
                cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches between peak lists ``a`` and ``b`` on the same panel within ``cutoff`` px.

    Returns ``(ia, ib, distances)``: indices into ``a`` and ``b`` of matched pairs, sorted by
    ``ia``, and their distances.  The total matched distance is minimal among maximum matchings.
    """
    a_panel, b_panel = np.asarray(a_panel, dtype=np.int64), np.asarray(b_panel, dtype=np.int64)
    a_fs, a_ss = np.asarray(a_fs, dtype=float), np.asarray(a_ss, dtype=float)
    b_fs, b_ss = np.asarray(b_fs, dtype=float), np.asarray(b_ss, dtype=float)
    ia_all, ib_all, d_all = [], [], []
    for panel in np.intersect1d(a_panel, b_panel):
        ia = np.flatnonzero(a_panel == panel)
        ib = np.flatnonzero(b_panel == panel)
        dist = np.hypot(a_fs[ia, None] - b_fs[None, ib], a_ss[ia, None] - b_ss[None, ib])
        close = dist <= cutoff
        rows = np.flatnonzero(close.any(axis=1))
        cols = np.flatnonzero(close.any(axis=0))
        if not len(rows):
            continue
        sub = dist[np.ix_(rows, cols)]
        # Pairs beyond the cutoff cost more than any set of allowed pairs could save, so the
        # assignment maximises the number of allowed matches first, then minimises distance.
        big = cutoff * (min(len(rows), len(cols)) + 1) + 1.0
        cost = np.where(sub <= cutoff, sub, big)
        r, c = linear_sum_assignment(cost)
        ok = sub[r, c] <= cutoff
        ia_all.append(ia[rows[r[ok]]])
        ib_all.append(ib[cols[c[ok]]])
        d_all.append(sub[r[ok], c[ok]])
    if not ia_all:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0)
    ia, ib, d = np.concatenate(ia_all), np.concatenate(ib_all), np.concatenate(d_all)
    order = np.argsort(ia, kind="stable")
    return ia[order], ib[order], d[order]


@dataclass
class PeakScore:
    """Counts and derived scores of one frame (or summed over many).

    ``n_correct`` (when known) counts found peaks that lie on *any* true reflection, weak ones
    included: finding a real but weak reflection is no false positive, while recall is still
    measured over the strong reflections a finder must not miss.
    """

    n_found: int
    n_true: int
    n_matched: int
    median_error_px: float  # median distance of matched pairs (NaN without matches)
    n_correct: int | None = None

    @property
    def precision(self) -> float:
        correct = self.n_matched if self.n_correct is None else self.n_correct
        return correct / self.n_found if self.n_found else float("nan")

    @property
    def recall(self) -> float:
        return self.n_matched / self.n_true if self.n_true else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        if self.n_found == 0 and self.n_true == 0:
            return float("nan")
        p, r = (0.0 if p != p else p), (0.0 if r != r else r)
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out.update(precision=self.precision, recall=self.recall, f1=self.f1)
        return out


def score_frame(found: np.ndarray, truth: np.ndarray, cutoff: float = 3.0,
                also_true: np.ndarray | None = None) -> tuple[PeakScore, np.ndarray]:
    """Score a peak table (``panel``, ``fs``, ``ss`` fields) against true peaks; also the distances.

    ``also_true``: every true reflection (weak ones too) for precision; see :class:`PeakScore`.
    """
    ia, ib, dist = match_peaks(found["panel"], found["fs"], found["ss"],
                               truth["panel"], truth["fs"], truth["ss"], cutoff)
    median = float(np.median(dist)) if len(dist) else float("nan")
    correct = None
    if also_true is not None:
        ic, _, _ = match_peaks(found["panel"], found["fs"], found["ss"],
                               also_true["panel"], also_true["fs"], also_true["ss"], cutoff)
        correct = len(ic)
    return PeakScore(len(found), len(truth), len(ia), median, correct), dist


def score_frames(pairs: Iterable[tuple[np.ndarray, ...]], cutoff: float = 3.0
                 ) -> dict[str, Any]:
    """Per-frame and overall (micro-averaged) scores of ``(found, truth[, also_true])`` tuples."""
    frames, distances = [], []
    for found, truth, *rest in pairs:
        score, dist = score_frame(found, truth, cutoff, rest[0] if rest else None)
        frames.append(score)
        distances.append(dist)
    all_dist = np.concatenate(distances) if distances else np.zeros(0)
    corrects = [s.n_correct for s in frames]
    overall = PeakScore(sum(s.n_found for s in frames), sum(s.n_true for s in frames),
                        sum(s.n_matched for s in frames),
                        float(np.median(all_dist)) if len(all_dist) else float("nan"),
                        None if any(c is None for c in corrects) or not frames
                        else int(sum(c or 0 for c in corrects)))
    return {"overall": overall, "frames": frames}


def _frame_counts(frames: Sequence[PeakScore]) -> np.ndarray:
    """(frames, 4): found, true, matched and correct counts per frame."""
    return np.array([[s.n_found, s.n_true, s.n_matched,
                      s.n_matched if s.n_correct is None else s.n_correct] for s in frames],
                    float).reshape(-1, 4)


def _resampled_f1(counts: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """Micro-averaged F1 of each resample (a row of frame indices in ``picks``)."""
    found, true, matched, correct = (counts[picks].sum(axis=1)).T
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(found > 0, correct / found, 0.0)
        recall = np.where(true > 0, matched / true, 0.0)
        return np.where(precision + recall > 0, 2 * precision * recall / (precision + recall),
                        0.0)


def bootstrap_f1(frames: Sequence[PeakScore], resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the micro-averaged F1, resampling whole frames.

    Frames, not peaks, are the independent units: peaks of one frame share its crystal, its
    background and its detector state, so resampling peaks would make the interval too narrow.
    """
    if not frames:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(frames), size=(resamples, len(frames)))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(_resampled_f1(_frame_counts(frames), picks), [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_f1_difference(first: Sequence[PeakScore], second: Sequence[PeakScore],
                            resamples: int = 2000, seed: int = 0, level: float = 0.95
                            ) -> tuple[float, float]:
    """Percentile bootstrap interval of F1(first) - F1(second) for two finders scored on the
    same frames, in the same order: each resample draws frames once for both (paired), so the
    frame-to-frame spread both share cancels and a small but steady difference shows."""
    if len(first) != len(second):
        raise ValueError(f"paired frames needed: {len(first)} against {len(second)}")
    if not first:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(first), size=(resamples, len(first)))
    diff = (_resampled_f1(_frame_counts(first), picks)
            - _resampled_f1(_frame_counts(second), picks))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(diff, [tail, 100 - tail])
    return float(lo), float(hi)


def pipeline_rates(hits: Sequence[bool], indexed: Sequence[bool]) -> dict[str, float]:
    """Hit rate, indexing rate and indexing yield as the PeakNet paper defines them.

    ``indexed[i]`` counts only for frames that are hits (an indexed non-hit is a caller error).
    """
    hits_a = np.asarray(hits, dtype=bool)
    indexed_a = np.asarray(indexed, dtype=bool)
    if hits_a.shape != indexed_a.shape:
        raise ValueError(f"hits ({hits_a.shape}) and indexed ({indexed_a.shape}) differ in length")
    if np.any(indexed_a & ~hits_a):
        raise ValueError("a frame is indexed but not a hit")
    n = len(hits_a)
    n_hits = int(hits_a.sum())
    n_indexed = int(indexed_a.sum())
    hit_rate = n_hits / n if n else float("nan")
    indexing_rate = n_indexed / n_hits if n_hits else float("nan")
    return {"frames": n, "hits": n_hits, "indexed": n_indexed, "hit_rate": hit_rate,
            "indexing_rate": indexing_rate,
            "indexing_yield": hit_rate * indexing_rate if n_hits else 0.0 if n else float("nan")}
