"""benchmarks/bench_blanks.py: its counts on hand-made records (false peaks per blank, blanks and
hits called hits, F1 on the hits), the saved records' round trip and where a false peak is said to
come from; and, slow, one tiny simulated run end to end with the shipped model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peaknet_test_support import load_script

from peaknet_xtal.types import peaks_from_columns

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_script(ROOT / "benchmarks" / "bench_blanks.py")


def record(bench, index, hit, snrs, on_truth=None, matched=None, strong=0):
    peaks = peaks_from_columns(panel=np.zeros(len(snrs), np.int32),
                               fs=np.arange(len(snrs), dtype=float) * 10,
                               ss=np.zeros(len(snrs)), snr=np.asarray(snrs, float),
                               prob=np.full(len(snrs), 0.6), npix=np.ones(len(snrs), np.int32))
    n = len(snrs)
    return bench.FrameRecord(
        detector="d", index=index, seed=index, hit=hit, strong=strong, peaks=peaks,
        on_truth=np.asarray(on_truth if on_truth is not None else [False] * n, bool),
        matched_strong=np.asarray(matched if matched is not None else [False] * n, bool),
        source=np.full(n, "other", "U8") if not hit else np.zeros(0, "U8"))


def test_summary_counts_by_hand(bench):
    records = [
        record(bench, 0, False, [3.5, 10.0, 2.0]),  # 2 false peaks at min_snr 3, 1 at 5
        record(bench, 1, False, []),
        record(bench, 2, True, [4.0, 8.0, 9.0, 2.5], on_truth=[True, True, False, True],
               matched=[True, True, False, False], strong=4),
    ]
    # the frame-level faint-peak rule off (faint_support 0), to count the SNR cut alone
    s = bench.summarise(records, min_snr=3.0, min_peaks=2, indexable=4, faint_support=0)
    assert s["false_per_blank"] == 1.0 and s["false_max"] == 2
    assert (s["blank_hits"], s["hits_called"], s["indexable_called"]) == (1, 1, 1)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 4)
    strict = bench.summarise(records, min_snr=5.0, min_peaks=2, indexable=5, faint_support=0)
    assert strict["false_per_blank"] == 0.5 and strict["blank_hits"] == 0
    assert strict["hits_called"] == 1 and strict["indexable"] == 0
    assert bench.summarise(records, 3.0, 2, 4, skip=1)["blanks"] == 1  # the first frame skipped
    # the rule as the engine runs it: the blank's SNR-3.5 peak is faint by faint_snr 4 and has
    # one tall peak beside it; the hit's SNR-4 peak is tall by that test
    rule = bench.summarise(records, 3.0, 2, 4, faint_support=2, faint_snr=4.0)
    assert rule["false_per_blank"] == 0.5 and rule["precision"] == pytest.approx(2 / 3)
    assert bench.summarise(records, 3.0, 2, 4, faint_support=2,
                           faint_snr=0.0)["false_per_blank"] == 1.0


def test_height_cut_counts_as_the_finding_applies_it(bench):
    """A peak whose brightest pixel is under min_height background sigmas is not counted;
    a peak on a noiseless background (sigma 0) always passes, as in finding.peaks."""
    blank = record(bench, 0, False, [10.0, 10.0, 10.0])
    blank.peaks["max_value"] = [20.0, 40.0, 1.0]
    blank.peaks["background_sigma"] = [5.0, 5.0, 0.0]  # heights 4, 8 and undefined
    # the frame-level faint-peak rule off, to see the height cut alone (its own test: the
    # selection script's)
    assert bench.summarise([blank], 3.0, 2, 4, min_height=5.0,
                           faint_support=0)["false_per_blank"] == 2.0
    assert bench.summarise([blank], 3.0, 2, 4, min_height=0.0,
                           faint_support=0)["false_per_blank"] == 3.0
    from peaknet_xtal.finding.settings import DEFAULTS

    assert (bench.summarise([blank], 3.0, 2, 4)["false_per_blank"]
            == bench.summarise([blank], 3.0, 2, 4, min_height=DEFAULTS.min_height)[
                "false_per_blank"])


def test_records_survive_the_npz_round_trip(bench, tmp_path):
    records = {"d": [record(bench, 0, False, [3.5, 1.0]),
                     record(bench, 1, True, [7.0], on_truth=[True], matched=[True], strong=3)]}
    bench.save_records(tmp_path / "r.npz", records)
    back = bench.load_records(tmp_path / "r.npz")["d"]
    assert [len(r.peaks) for r in back] == [2, 1] and [r.hit for r in back] == [False, True]
    assert back[1].matched_strong.tolist() == [True] and back[0].source.tolist() == ["other"] * 2
    assert back[0].peaks["snr"].tolist() == [3.5, 1.0]


def test_false_peaks_are_traced_to_hot_pixels_streaks_and_zingers(bench):
    peaks = peaks_from_columns(panel=np.zeros(4, np.int32), fs=np.array([5.0, 20.0, 40.0, 60.0]),
                               ss=np.array([5.0, 20.0, 40.0, 60.0]))
    streak = np.zeros((80, 80), bool)
    streak[20, :] = True
    zinger = np.zeros((80, 80), bool)
    zinger[41, 39] = True
    info = {"hot": [(0, 6, 5)], "streak": (0, streak), "zingers": {0: zinger}}
    assert bench.classify(peaks, info).tolist() == ["hot", "streak", "zinger", "other"]


def test_sources_leave_out_the_learning_frames_and_set_false_beside_true_peaks(bench, capsys):
    """After ``skip`` frames only; the blanks' false peaks and the hits' peaks on a strong
    reflection binned by probability (all 0.6 here) and SNR, as the finding keeps them: every
    peak stands 5 sigmas high, so the default faint-peak rule drops the SNR-3.2 ones alone
    (under faint_snr, on frames with fewer than faint_support peaks tall by both tests)."""
    early = record(bench, 0, False, [3.2, 3.7])  # a learning frame: left out
    late = record(bench, 5, False, [3.2, 9.0])
    hit = record(bench, 6, True, [3.2, 4.5, 12.0], on_truth=[True] * 3,
                 matched=[True, True, False], strong=3)
    for r in (early, late, hit):
        r.peaks["max_value"], r.peaks["background_sigma"] = 5.0, 1.0
    bench.print_sources({"d": [early, late, hit]}, 3.0, 0.0, skip=5)
    out = capsys.readouterr().out
    assert "without each run's first 5 frames" in out and "d: 1 on 1 blanks" in out

    def row(title):
        lines = out.splitlines()
        start = next(i for i, line in enumerate(lines) if title in line)
        return next(line for line in lines[start + 2:] if line.strip().startswith("0.60-0.70"))

    from peaknet_xtal.finding.settings import DEFAULTS

    assert DEFAULTS.faint_snr > 3.2 and DEFAULTS.faint_support > 2
    assert row("blanks' false peaks (1)").split()[1:] == ["0", "0", "0", "0", "0", "1"]
    assert row("hits' true strong peaks (1)").split()[1:] == ["0", "0", "1", "0", "0", "0"]


def test_photon_counting_runs_hold_whole_counts(bench, real_data):
    """The photon-counting detectors' frames are exact counts (no read noise, no pedestal, the
    artefacts counted too); an integrating detector's are not."""
    for name, whole in (("eiger16m-bin2", True), ("rayonix", False)):
        assert (name in bench.COUNTING) is whole
        frame, _, _ = next(bench.run_frames(name, "selection", 1, 0))
        values = np.concatenate([p[m] for p, m in zip(frame.panels, frame.masks, strict=True)])
        assert bool(np.all(values == np.rint(values)) and values.min() >= 0) is whole
    # --noisy-counting: the same frame with read noise, as the training bank's frames have
    noisy, _, _ = next(bench.run_frames("eiger16m-bin2", "selection", 1, 0, exact_counts=False))
    exact, _, _ = next(bench.run_frames("eiger16m-bin2", "selection", 1, 0))
    difference = np.concatenate([a[m] - b[m] for a, b, m in
                                 zip(noisy.panels, exact.panels, exact.masks, strict=True)])
    assert 0 < np.abs(difference).mean() < 1  # photons: noise on the same counts


def test_strong_reflections_a_strong_background_drowns_are_not_counted_as_strong(bench,
                                                                                  real_data):
    """On a strong-background hit the simulation's faint strong reflections are drowned (not
    counted in recall), the bright ones stay; frames without one lose none."""
    drowned_somewhere = False
    for _frame, truth, info in bench.run_frames("rayonix", "selection", 0, 2):
        refl, drowned = truth.reflections, info["drowned"]
        assert drowned.shape == (len(refl),)
        if "strong-bg" not in info["notes"]:
            assert not drowned.any()
            continue
        strong = refl["strong"]
        if (drowned & strong).any():
            drowned_somewhere = True
            assert (~drowned & strong).any()
            assert (np.median(refl["photons"][drowned & strong])
                    < np.median(refl["photons"][~drowned & strong]))
    assert drowned_somewhere  # these two seeds' frames include a bright background


@pytest.mark.slow
def test_one_tiny_simulated_run_end_to_end(bench, real_data, capsys):
    """One blank and one hit on CSPAD with the shipped model: the numbers are printed."""
    assert bench.main(["--set", "selection", "--frames", "1", "--detectors", "cspad",
                       "--skip", "0"]) == 0
    out = capsys.readouterr().out
    assert "seeds 5,000,000,000" in out and "cspad" in out and "false/blank" in out


@pytest.mark.slow
def test_variants_with_and_without_the_sharp_core_test_run_their_own_filters(bench, real_data):
    """A variant's ``cores`` picks a defect filter of its own for the same peaks; the peak
    settings of the variant are applied as given."""
    records = bench.measure("cspad", "selection", 1, 1, variants={
        "off": {"cores": False}, "on": {"cores": True}, "strict": {"min_snr": 50.0}})
    assert [len(records[k]) for k in ("off", "on", "strict")] == [2, 2, 2]
    for off, on, strict in zip(records["off"], records["on"], records["strict"], strict=True):
        assert off.seed == on.seed == strict.seed
        assert len(on.peaks) <= len(off.peaks)  # the test only takes peaks away
        assert (strict.peaks["snr"] >= 50.0).all()


@pytest.mark.slow
def test_the_run_s_first_frames_are_counted_ahead_as_the_engine_counts_them(bench, real_data,
                                                                            monkeypatch):
    """The run's unmasked hot pixels (the same pixels every frame) are known before its first
    frame is filtered: no peak of the first frames sits on one.  Without reading ahead (the
    filter's ``count_ahead`` a no-op) the first frame keeps them: the test can fail."""
    def hot_on_first(records):
        return sum(int((r.source == "hot").sum()) for r in records if r.index == 0 and not r.hit)

    def first_blank_first():  # a seed whose run starts with a blank
        for frames in range(4, 9):  # with the hit, at least the five frames the filter reads
            (records,) = bench.measure("cspad", "selection", frames, 1).values()
            if not records[0].hit:
                return frames, records
        pytest.skip("no run of these seeds starts with a blank")

    frames, records = first_blank_first()
    assert hot_on_first(records) == 0
    from peaknet_xtal.finding.defects import DefectFilter

    monkeypatch.setattr(DefectFilter, "count_ahead", lambda self, *args: None)
    (unread,) = bench.measure("cspad", "selection", frames, 1).values()
    assert hot_on_first(unread) > 0


def test_flickering_pixels_light_in_about_half_the_frames_and_change_nothing_else(bench,
                                                                                  real_data):
    """``--flickering N``: N more hot pixels, each lit in about half the frames, counted as hot
    by the false-peak sources; the frames are otherwise those of the run without them (their
    places and when they are lit come from generators of their own)."""
    plain = list(bench.run_frames("epix10k2m", "selection", 6, 0))
    flick = list(bench.run_frames("epix10k2m", "selection", 6, 0, flickering=5))
    (_, _, info), = flick[:1]
    extra = info["hot"][len(plain[0][2]["hot"]):]
    assert len(extra) == 5 and info["hot"][:-5] == plain[0][2]["hot"]
    lit = np.zeros((len(flick), 5), bool)
    for k, ((a, _, _), (b, _, _)) in enumerate(zip(plain, flick, strict=True)):
        for j, (p, y, x) in enumerate(extra):
            lit[k, j] = b.panels[p][y, x] > a.panels[p][y, x]
        changed = [np.argwhere(pa != pb) for pa, pb in zip(a.panels, b.panels, strict=True)]
        assert sum(len(c) for c in changed) == lit[k].sum()  # the lit pixels, nothing else
    assert 0 < lit.mean() < 1
