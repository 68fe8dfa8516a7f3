"""examples/demo.py (``bin/peaknet-demo``): a rerun scores only the frames it just made, and
arguments that cannot work are refused in one line before anything is written.

The simulator and peaknet2cxi are replaced by recorders here: what is under test is what the
demo does with its output folder around them, not the model (minutes on two cores).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from peaknet_test_support import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def demo(monkeypatch):
    """The demo with ``simulate`` faked (an empty sim folder) and peaknet2cxi recording what
    the peaks folder held when it was started; it then fails, which the demo must pass on."""
    import peaknet_xtal.cli.peaknet2cxi as peaknet2cxi

    module = load_script(ROOT / "examples" / "demo.py", "peaknet_demo_under_test")
    seen: list[list[str]] = []

    def simulate(out: Path, frames: int) -> Path:
        (out / "sim").mkdir(parents=True, exist_ok=True)
        (out / "sim" / "sim.cxi").write_bytes(b"")
        return out / "sim" / "sim.cxi"

    def run_peaknet2cxi(argv: list[str]) -> int:
        peaks = Path(argv[argv.index("-o") + 1])
        seen.append(sorted(p.name for p in peaks.iterdir()) if peaks.exists() else [])
        return 1

    monkeypatch.setattr(module, "simulate", simulate)
    monkeypatch.setattr(peaknet2cxi, "main", run_peaknet2cxi)
    module.seen = seen
    return module


def test_a_rerun_starts_the_peaks_afresh(demo, tmp_path):
    """The user's run: the default 6 frames, then --frames 3.  peaknet2cxi resumes by (file,
    event), so the earlier run's tables of frames 3-5 were kept and scored as this run's."""
    out = tmp_path / "demo"
    peaks = out / "peaks"
    peaks.mkdir(parents=True)
    for name in ("peaknet2cxi.config.json", "peaks-00000.cxi", "peaknet2cxi.json"):
        (peaks / name).write_text("from the earlier run")
    (out / "notes.txt").write_text("the user's")
    assert demo.main(["--out", str(out), "--frames", "3"]) == 1  # peaknet2cxi's failure
    assert demo.seen == [[]]
    assert (out / "notes.txt").read_text() == "the user's"


def test_a_peaks_folder_the_demo_did_not_write_is_left_alone(demo, tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "peaks").mkdir(parents=True)
    (out / "peaks" / "mine.cxi").write_text("not the demo's")
    assert demo.main(["--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("peaknet-demo: error: ") and "not written by peaknet2cxi" in line
    assert (out / "peaks" / "mine.cxi").exists() and demo.seen == []


@pytest.mark.parametrize(("args", "words"), [
    (["--frames", "0"], "--frames must be at least 1 (got 0)"),
    (["--frames", "-2"], "--frames must be at least 1 (got -2)"),
    (["--out", "README.md"], "--out README.md is a file: give a folder (default demo_output)"),
])
def test_arguments_that_cannot_work_are_one_line(demo, args, words, tmp_path, capsys,
                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# a project")
    assert demo.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"peaknet-demo: error: {words}"
    assert not (tmp_path / "demo_output").exists() and demo.seen == []


def test_options_are_not_guessed_from_a_prefix(demo, capsys):
    """``--frame 3`` is no option: taken for --frames it would hide a typo of another one."""
    with pytest.raises(SystemExit) as stop:
        demo.main(["--frame", "3"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --frame 3" in capsys.readouterr().err


def test_the_demo_detector_is_a_cspad_layout_needing_no_outside_file(tmp_path):
    """The demo read its CSPAD geometry from ``../shared``, so on a clone without it the README's
    first command failed at its first step; it now writes its own layout: 64 ASICs of 194 x 185
    pixels in the psana/Cheetah slab, none overlapping another, the beam between them."""
    from peaknet_xtal.formats.geometry import read_geometry

    module = load_script(ROOT / "examples" / "demo.py", "peaknet_demo_geometry")
    assert "shared" not in str(getattr(module, "GEOMETRY", ""))
    path = tmp_path / "cspad.geom"
    path.write_text(module.cspad_geometry_text())
    geometry = read_geometry(path)
    assert len(geometry.panels) == 64
    assert {p.shape for p in geometry.panels} == {(185, 194)}
    assert max(p.max_ss for p in geometry.panels) + 1 == 1480
    assert max(p.max_fs for p in geometry.panels) + 1 == 1552
    slab = np.zeros((1480, 1552), int)
    for p in geometry.panels:
        slab[p.min_ss:p.max_ss + 1, p.min_fs:p.max_fs + 1] += 1
    assert (slab == 1).all()  # every data pixel belongs to exactly one panel
    boxes = [(p.corner_x, p.corner_x + p.width, p.corner_y, p.corner_y + p.height)
             for p in geometry.panels]
    for i, a in enumerate(boxes):
        assert not (a[0] < 0 < a[1] and a[2] < 0 < a[3])  # the beam hits no panel
        for b in boxes[i + 1:]:
            assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]
