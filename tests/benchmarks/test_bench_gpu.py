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
    assert {r["path"] for r in rows} == {"model", "engine"}
    assert {r["batch"] for r in rows} == {1, 2}
    assert all(r["frames_per_s"] > 0 for r in rows)
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    assert fp32 and all(r["agrees"] is None for r in fp32)
    assert all(isinstance(r["agrees"], bool) for r in rows if r["precision"] != "fp32")


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
    ray = [r for r in rows if r["path"] == "ray"]
    assert len(ray) == 1 and ray[0]["frames_per_s"] > 0
