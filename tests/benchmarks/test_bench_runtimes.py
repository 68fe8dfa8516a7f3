"""benchmarks/bench_runtimes.py: OpenVINO is not a dependency, so without it the script says what
it needs in one line and exits 2 (with it, it measures; the README records a run)."""
from __future__ import annotations

import sys
from pathlib import Path

from peaknet_test_support import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_without_openvino_one_line_and_exit_2(monkeypatch, capsys):
    bench = load_script(ROOT / "benchmarks" / "bench_runtimes.py")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert bench.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install openvino" in err
