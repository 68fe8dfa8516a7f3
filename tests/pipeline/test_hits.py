"""The Ray pipeline's workers call hits by the shared rule (finding.settings DEFAULTS.min_peaks)
when nobody sets one: the engine they build takes the library's default, and the CXI 'hit'
column it writes follows it.  Run on the threads backend (the same stage classes and driver as
Ray, in seconds) with a stand-in segmenter, on a tiny stack of frames with known spot counts."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import BrightPredictor, spot_panel

from peaknet_xtal.finding.settings import DEFAULTS
from peaknet_xtal.formats.cxi import KEY_GROUP, CXISource, CXIWriter, read_cxi_peaks
from peaknet_xtal.pipeline import run_pipeline
from peaknet_xtal.pipeline.driver import resolve_config

RULE = DEFAULTS.min_peaks


def test_pipeline_workers_flag_hits_by_the_default_rule(tmp_path: Path):
    counts = [RULE, 1, RULE - 1, RULE + 2, 0, RULE]
    path = tmp_path / "spots.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data",
                          data=np.stack([spot_panel(n, seed=k) for k, n in enumerate(counts)]))
    out = tmp_path / "out" / "run.cxi"
    run_pipeline({"inputs": [{"path": str(path), "kind": CXISource}], "output": str(out),
                  "writer": CXIWriter, "writer_options": {"frames_per_file": 16},
                  "backend": "threads", "frame_finder": "engine",
                  "frame_finder_options": {"predictor": BrightPredictor(),
                                           "adu_per_photon": 1.0},
                  "workers": 2, "batch_size": 2, "progress": False, "monitor_interval": 0.1})
    flags: dict[str, bool] = {}
    peaks: dict[str, int] = {}
    for cxi in sorted(out.parent.glob("*.cxi")):
        table = read_cxi_peaks(cxi)
        with h5py.File(cxi, "r") as h5:
            hit = h5[f"{KEY_GROUP}/hit"][()]
        for row, (_, event) in enumerate(table.keys):
            flags[event] = bool(hit[row])
            peaks[event] = int(table.n_peaks[row])
    assert peaks == {f"//{k}": n for k, n in enumerate(counts)}
    assert flags == {f"//{k}": n >= RULE for k, n in enumerate(counts)}


def test_a_bad_hit_rule_is_refused_before_any_worker_starts(tmp_path: Path):
    with pytest.raises(ValueError, match="min_peaks"):
        resolve_config({"inputs": [str(tmp_path / "x.h5")],
                        "frame_finder_options": {"min_peaks": -2}})
