"""benchmarks/bench_memory.py on a tiny detector: each setting runs in its own process, finds
the planted spots, and is set against the whole panels of the same run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiles_and_whole_panels_measured_in_fresh_processes(bench, monkeypatch, capsys):
    monkeypatch.setitem(bench.DETECTORS, "tiny", (1, 300, 280))
    bench.main(["--detectors", "tiny", "--tiles", "128", "--frames", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny")]
    assert [row[1:3] for row in rows] == [["whole", "panels"], ["tile", "128"]]
    for row in rows:
        rss = float(row[4])
        assert 100 < rss < 8000  # a process with torch and the model loaded
        found = int(row[-1].strip("[]"))
        assert 50 <= found <= 70  # the 60 planted spots (a few may touch)
    assert "tiny, tile 128 / whole panels: memory" in out
