"""The GPU benchmark's dry run (CPU, tiny frames): CI runs the script end to end, so it cannot rot
on machines without a GPU, and it says what a real run would measure."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from peaknet_test_support import load_script as load_script_at

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    return load_script_at(ROOT / "benchmarks" / "bench_gpu.py")


def test_dry_run_measures_both_models_and_states_the_plan(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "rows.json"
    assert bench.main(["--dry-run", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan: device cpu")
    assert "sizes (Mpx) [0.004096] -> sides [64]" in text
    assert f"{bench.REFERENCE_PER_L40S} frames/s per L40S" in text
    assert "1000 fr/s target" in text or "target 1000 fr/s" in text
    rows = json.loads(out.read_text())
    assert {r["model"] for r in rows} == {"default", bench.PAPER_MODEL}
    # no Ray in a plain dry run; the stages alone for both models, end to end for the trained
    assert {r["path"] for r in rows} == {"model", "network", "normalise", "engine"}
    assert {r["batch"] for r in rows} == {1, 2}
    assert all(r["frames_per_s"] > 0 for r in rows)
    engine = [r for r in rows if r["path"] == "engine"]
    # end to end once per precision for the default model, at a batch the sweep measured; the
    # paper-size model has no trained weights here, so its peaks would say nothing
    assert sorted(r["precision"] for r in engine) == sorted(
        {r["precision"] for r in rows}) and {r["model"] for r in engine} == {"default"}
    assert all(any(m["path"] == "model" and m["batch"] == r["batch"] for m in rows)
               for r in engine)
    # reduced precisions are judged by their peaks against float32's, float32 is the reference
    assert all(r["agrees"] is None for r in rows if r["precision"] == "fp32"
               or r["path"] != "engine")
    assert all(isinstance(r["agrees"], bool) for r in engine if r["precision"] != "fp32")


def test_a_spent_time_budget_starts_nothing_and_still_reports(tmp_path, capsys):
    """Borrowed GPU time: past ``--budget-s`` no measurement starts, and the run still ends
    with its summary and its (empty) rows file."""
    bench = load_script()
    out = tmp_path / "rows.json"
    assert bench.main(["--dry-run", "--budget-s", "1e-9", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped (time budget" in text and "not measured in this run" in text
    assert json.loads(out.read_text()) == []


def test_side_for_detector_sizes():
    bench = load_script()
    assert [bench.side_for(m) for m in (1, 2, 4, 16)] == [1024, 1440, 2016, 4000]


@pytest.mark.ray
@pytest.mark.slow
def test_dry_run_through_the_ray_pipeline(tmp_path):
    """The Ray path ships the script's predictor factory to a worker by value and measures it."""
    bench = load_script()
    out = tmp_path / "rows.json"
    assert bench.main(["--dry-run", "--ray-in-dry-run", "--models", "default", "--precisions",
                       "fp32", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    ray = [r for r in rows if r["path"].startswith("ray")]
    assert len(ray) == 1 and ray[0]["frames_per_s"] > 0


def test_the_target_is_judged_on_end_to_end_rates_only(capsys):
    """The network alone or the normalisation alone is no frame rate a user gets."""
    bench = load_script()
    nan = float("nan")
    rows = [bench.Row("default", 2.0, 1440, "network", "bf16", 16, 212.0, nan),
            bench.Row("default", 2.0, 1440, "model", "fp32", 4, 53.0, 705.0),
            bench.Row("default", 2.0, 1440, "engine", "fp32", 4, 8.4, nan),
            bench.Row("default", 2.0, 1440, "ray x12", "fp32", 4, 15.4, nan),
            bench.Row("default", 2.0, 1440, "engine", "bf16", 4, 30.0, nan, agrees=False)]
    bench.summarise(rows, 1.0)
    assert "2-Mpx default model end to end: 15.4 fr/s (ray x12) = 0.015 of the" in (
        capsys.readouterr().out)
