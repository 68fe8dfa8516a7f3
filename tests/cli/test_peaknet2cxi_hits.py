"""peaknet2cxi calls hits by the shared rule (finding.settings DEFAULTS.min_peaks): its CXI 'hit'
column, --hits-only, the stream's 'hit' flags and the summary's hit count all follow it, and a bad
--min-peaks is refused by name.

A tiny one-panel CXI stack made here holds frames with a known number of 3x3 spots; a stand-in
segmenter (pixels above a level) makes the peak counts exact."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import BrightPredictor, spot_panel

from peaknet_xtal.cli.peaknet2cxi import main, run
from peaknet_xtal.finding.settings import DEFAULTS
from peaknet_xtal.formats.cxi import KEY_GROUP, read_cxi_peaks
from peaknet_xtal.formats.stream import read_stream

RULE = DEFAULTS.min_peaks
COUNTS = [0, RULE - 1, RULE, RULE + 5, 2]  # peaks per frame: frames 2 and 3 are the hits


@pytest.fixture()
def stack(tmp_path: Path, make_geometry_text) -> tuple[Path, Path]:
    data = np.stack([spot_panel(n, seed=k) for k, n in enumerate(COUNTS)])
    path = tmp_path / "spots.cxi"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", data=data)
    geom = tmp_path / "one.geom"
    geom.write_text(make_geometry_text(["p0"], data.shape[2], data.shape[1], [(-48.0, -48.0)],
                                       adu_per_photon="1"))
    return path, geom


def _config(stack: tuple[Path, Path], out: Path, **extra) -> dict:
    return {"inputs": [str(stack[0])], "geometry": str(stack[1]), "output": str(out),
            "predictor": BrightPredictor(), "progress": False, **extra}


def test_default_rule_sets_cxi_hits_stream_flags_and_summary(stack, tmp_path):
    summary = run(_config(stack, tmp_path / "all", stream=str(tmp_path / "all.stream")))
    table = read_cxi_peaks(summary["cxi_files"][0])
    assert table.n_peaks.tolist() == COUNTS
    with h5py.File(summary["cxi_files"][0], "r") as h5:
        hits = [bool(v) for v in h5[f"{KEY_GROUP}/hit"][()]]
    expected = [n >= RULE for n in COUNTS]
    assert hits == expected
    assert summary["hits"] == sum(expected) and summary["min_peaks"] == RULE
    flags = [c.hit for c in read_stream(tmp_path / "all.stream").chunks]
    assert flags == expected
    written = json.loads((tmp_path / "all" / "peaknet2cxi.json").read_text())
    assert written["hits"] == sum(expected) and written["config"]["min_peaks"] == RULE


def test_hits_only_keeps_the_frames_the_default_rule_calls_hits(stack, tmp_path):
    summary = run(_config(stack, tmp_path / "hits", hits_only=True))
    keys = read_cxi_peaks(summary["cxi_files"][0]).keys
    assert [event for _, event in keys] == [f"//{k}" for k, n in enumerate(COUNTS) if n >= RULE]
    assert summary["this_run"]["frames"] == len(COUNTS) and summary["hits"] == len(keys)


def test_min_peaks_is_configurable(stack, tmp_path):
    summary = run(_config(stack, tmp_path / "loose", min_peaks=1))
    assert summary["hits"] == sum(n >= 1 for n in COUNTS) and summary["min_peaks"] == 1


@pytest.mark.parametrize("value", ["-1", "2.5", "many"])
def test_a_bad_min_peaks_is_refused_by_name(stack, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        main([str(stack[0]), "-g", str(stack[1]), "-o", str(tmp_path / "x"),
              "--min-peaks", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "min_peaks" in err or "--min-peaks" in err
    assert not (tmp_path / "x").exists()


def test_a_negative_min_peaks_in_a_config_file_is_refused_by_name(stack, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"min_peaks": -3}))
    with pytest.raises(SystemExit) as exc:
        main([str(stack[0]), "-g", str(stack[1]), "-o", str(tmp_path / "x"),
              "--config", str(config)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "min_peaks" in err and str(config) in err
