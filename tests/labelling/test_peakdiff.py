"""PeakDiff: hand-made matching cases, selection, the report, and the real 5-HT2B stream."""
from __future__ import annotations

import math

import numpy as np
import pytest

from peaknet_xtal.labelling.ingest import PRED_DTYPE, records_from_stream
from peaknet_xtal.labelling.peakdiff import (
    FrameDiff,
    Selection,
    peakdiff,
    summary_arrays,
    write_report,
)
from peaknet_xtal.types import peaks_from_columns

STREAM_5HT2B = "crystfel_streams/crystfel_tests_5HT2B_lcls_cspad_xgandalf.stream"


def _pred(panel, fs, ss):
    table = np.zeros(len(panel), dtype=PRED_DTYPE)
    table["panel"], table["fs"], table["ss"] = panel, fs, ss
    return table


def test_hand_made_frame():
    found = peaks_from_columns(panel=[0, 0, 1], fs=[10.0, 50.0, 20.0], ss=[10.0, 50.0, 20.0])
    predicted = _pred([0, 0, 0, 1], [11.0, 58.0, 90.0, 30.0], [10.0, 50.0, 90.0, 20.0])
    # (0,10,10)-(0,11,10) at 1 px matches; (0,50,50)-(0,58,50) is 8 px away; the panel-1 pair is
    # 10 px apart; nothing matches across panels
    diff = peakdiff(found, predicted, cutoff=5.0)
    assert (diff.n_found, diff.n_predicted, diff.n_matched) == (3, 4, 1)
    assert diff.precision == pytest.approx(1 / 3) and diff.recall == pytest.approx(1 / 4)
    assert diff.found_index.tolist() == [0] and diff.predicted_index.tolist() == [0]
    assert peakdiff(found, predicted, cutoff=10.0).n_matched == 3


def test_matching_is_one_to_one_and_panel_aware():
    found = peaks_from_columns(panel=[0, 0], fs=[10.0, 11.0], ss=[10.0, 10.0])
    one = _pred([0], [10.5], [10.0])
    assert peakdiff(found, one, 5.0).n_matched == 1
    # same coordinates on another panel never match
    assert peakdiff(found, _pred([1], [10.0], [10.0]), 5.0).n_matched == 0
    # the assignment prefers two matches over one closer match
    two = _pred([0, 0], [10.9, 14.0], [10.0, 10.0])
    assert peakdiff(found, two, 3.5).n_matched == 2


def test_empty_frames_have_nan_rates_and_are_rejected():
    none = peaks_from_columns(panel=np.zeros(0, int), fs=np.zeros(0), ss=np.zeros(0))
    diff = peakdiff(none, _pred([0], [1.0], [1.0]))
    assert diff.n_matched == 0 and math.isnan(diff.precision) and diff.recall == 0.0
    assert not Selection(min_found=0).accepts(diff)


def test_selection_reasons():
    diff = FrameDiff(20, 40, 18, np.arange(18), np.arange(18), np.zeros(18))
    assert Selection().accepts(diff)
    assert Selection(min_precision=0.95).reasons(diff) == ["precision 0.90 < 0.95"]
    assert Selection(max_found=10).reasons(diff) == ["20 found outside [10, 10]"]
    assert not Selection(min_recall=0.5).accepts(diff)
    assert Selection.from_config({"min_precision": 0.5, "cutoff": 3}).min_precision == 0.5


def test_rejection_lines_count_frames_per_rule_with_their_values():
    """The per-run account of why frames were turned away: one line per failed rule."""
    z = np.zeros(0)
    diffs = [FrameDiff(20, 40, 18, z, z, z),   # kept
             FrameDiff(25, 263, 17, z, z, z),  # precision 0.68
             FrameDiff(29, 102, 15, z, z, z),  # precision 0.52
             FrameDiff(0, 7, 0, z, z, z)]      # nothing found: no precision, too few peaks
    lines = Selection().rejection_lines(diffs)
    assert lines == [
        "1 frame: no found peak, so no precision, which never passes --min-precision",
        "2 frames: precision below 0.8 (--min-precision; theirs: 0.52 to 0.68)",
        "1 frame: found peaks outside [10, 100000] (--min-peaks/--max-peaks; theirs: 0)",
    ]
    assert Selection().rejection_lines(diffs[:1]) == []
    assert Selection().rejection_lines([]) == []


def test_report_png(tmp_path):
    rng = np.random.default_rng(0)
    diffs = [FrameDiff(int(n), int(m), int(k), np.zeros(0), np.zeros(0), np.zeros(0))
             for n, m, k in zip(rng.integers(5, 60, 40), rng.integers(20, 200, 40),
                                rng.integers(0, 5, 40), strict=False)]
    out = tmp_path / "r.png"
    write_report(out, diffs, Selection(min_precision=0.05))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_real_5ht2b_stream_every_indexed_chunk(real_data):
    """70 chunks, 32 crystals: every indexed chunk gets statistics (no images, so no fits)."""
    path = real_data / STREAM_5HT2B
    records = list(records_from_stream(path))
    assert len(records) == 32
    assert sum(r.n_crystals for r in records) == 32
    # 7,966 table rows (the data README's 7,998 counts the 32 column-header lines too)
    assert sum(len(r.predicted) for r in records) == 7966
    diffs = [peakdiff(r.found, r.predicted, 5.0) for r in records]
    cols = summary_arrays(diffs, Selection())
    assert np.all(cols["n_matched"] <= np.minimum(cols["n_found"], cols["n_predicted"]))
    assert np.all((cols["precision"] >= 0) & (cols["precision"] <= 1))
    assert cols["n_matched"].sum() > 0.5 * cols["n_found"].sum()  # indexing explains most peaks
    # first chunk, checked by hand: q1a0 peak at file (466.50, 134.06) -> panel-relative
    first = records[0]
    names = first.panel_names
    row = first.found[2]
    assert names[row["panel"]] == "q1a0"
    assert (row["fs"], row["ss"]) == pytest.approx((466.50 - 0.5 - 388, 134.06 - 0.5))
    # with a huge cutoff every panel matches min(found, predicted) of its peaks
    for rec in records[:5]:
        big = peakdiff(rec.found, rec.predicted, 1e6)
        expect = sum(min(np.sum(rec.found["panel"] == p), np.sum(rec.predicted["panel"] == p))
                     for p in np.unique(rec.found["panel"]))
        assert big.n_matched == expect
        assert peakdiff(rec.found, rec.predicted, 0.0).n_matched == 0
