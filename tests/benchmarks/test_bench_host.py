"""benchmarks/bench_host.py: every host step of a frame is timed beside the model, on a tiny run
with the shipped model, and the totals follow from the steps."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from peaknet_test_support import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_host_steps_beside_the_model(real_data, capsys):
    bench = load_script(ROOT / "benchmarks" / "bench_host.py")
    assert bench.main(["--frames", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^  (\S.*?)\s{2,}([\d.]+)\s+[\d.]+$", out, re.M))
    steps = ["model (baseline)", "sanitise", "gain look", "peaks", "spike maps",
             "defect filter", "CXI linked", "CXI copied"]
    assert list(rows) == steps and all(float(rows[s]) > 0 for s in steps)
    settled = sum(float(rows[s]) for s in ("sanitise", "peaks", "spike maps", "defect filter"))
    linked = re.search(r"CXI linked: ([\d.]+) ms a frame = ([\d.]+) frames/s", out)
    assert linked and float(linked[1]) == pytest.approx(settled + float(rows["CXI linked"]),
                                                        abs=0.15)
    assert float(linked[2]) == pytest.approx(1000 / float(linked[1]), rel=0.02)


def test_frames_and_detector_are_checked():
    bench = load_script(ROOT / "benchmarks" / "bench_host.py")
    for argv in (["--frames", "1"], ["--detector", "nonesuch"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
