"""The driver's side of the stages' warnings (:mod:`peaknet_xtal.pipeline.worker_logs`), and how
a run treats an input it cannot read, without Ray (the real-Ray runs are in test_driver.py)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from peaknet_test_support import LocalMaxFinder

from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.cxi import CXISource, CXIWriter
from peaknet_xtal.pipeline import PipelineError, run_pipeline
from peaknet_xtal.pipeline.actors import SourceFeeder, _forwarding
from peaknet_xtal.pipeline.driver import _input_error
from peaknet_xtal.pipeline.worker_logs import LogRelay, WarningReplay

NAME = "peaknet_xtal.finding.sanitise"


def relayed(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.pathname == "(stage process)"]


def test_a_relayed_warning_is_shown_once_under_its_own_logger(caplog):
    """Each worker that meets a file's problem says so; the user reads it once, as from one
    process: same logger, same level, same words."""
    replay = WarningReplay()
    record = (NAME, logging.WARNING, "a.cxi //0: masked 3 non-finite pixels (100% sure)")
    with caplog.at_level(logging.WARNING):
        assert replay.replay([record, record]) == 1
        assert replay.replay([record]) == 0  # another worker, later
    assert relayed(caplog) == [record[2]]
    assert caplog.records[0].name == NAME and caplog.records[0].levelno == logging.WARNING


def test_a_warning_the_driver_gave_itself_is_not_repeated(caplog):
    """The run's gain, measured by the driver before the workers start, warns there; the
    workers' engines meet the same and would say it again."""
    message = "detector gain: declared gain 1 (the background does not show one) in q.cxi"
    with caplog.at_level(logging.WARNING):
        logging.getLogger("peaknet_xtal.finding.gain").warning(message)
        replay = WarningReplay()
        assert replay.replay([("peaknet_xtal.finding.gain", logging.WARNING, message)]) == 0
    assert relayed(caplog) == []


def test_a_full_relay_counts_what_it_could_not_keep_and_the_driver_says_so(caplog):
    relay = LogRelay(capacity=2)
    for i in range(5):
        relay.add((NAME, logging.WARNING, f"frame {i}"))
    records, dropped = relay.drain()
    assert [m for _, _, m in records] == ["frame 0", "frame 1"] and dropped == 3
    assert relay.drain() == ([], 0)
    with caplog.at_level(logging.WARNING):
        WarningReplay().replay(records, dropped)
    assert any("3 more warnings" in r.getMessage() for r in caplog.records)


def test_a_forwarding_stage_is_still_its_class(tmp_path: Path):
    """The Ray actor class that relays its process's warnings takes the stage's own arguments
    and is one of its kind (the driver and tests look its methods up by name)."""
    cls = _forwarding(SourceFeeder)
    stage = cls({"path": str(tmp_path / "a.h5")}, [("x", "//0")], 4, _log_relay=None)
    assert isinstance(stage, SourceFeeder) and cls.__name__ == "SourceFeeder"
    assert stage.chunk == 4 and stage.skip == {("x", "//0")}


def test_an_input_error_names_the_input():
    error = FormatError("/d/b.cxi", "pixel values must be numbers", dataset="/data")
    assert _input_error("/d/b.cxi", error) == str(error)
    assert _input_error("/d/c.h5", OSError("disk gone")) == "/d/c.h5: OSError: disk gone"


def test_threads_pipeline_writes_the_other_inputs_then_fails_naming_the_bad_one(
        tmp_path: Path, stacks):
    good = stacks.write(tmp_path / "a.h5", 30)
    bad = tmp_path / "b.h5"
    with h5py.File(bad, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", data=np.ones((2, 32, 48), np.complex64))
    cfg = {"inputs": [{"path": str(p), "kind": CXISource} for p in (bad, good)],
           "output": str(tmp_path / "out" / "run.cxi"), "writer": CXIWriter,
           "writer_options": {"frames_per_file": 16}, "backend": "threads",
           "frame_finder": LocalMaxFinder, "frame_finder_options": {"threshold": 100.0},
           "workers": 2, "batch_size": 5, "queue_capacity": 12, "result_queue_capacity": 8,
           "source_chunk": 4, "progress": False, "monitor_interval": 0.1}
    with pytest.raises(PipelineError, match=r"^" + re.escape(str(bad)) + r".*numbers"):
        run_pipeline(cfg)
    keys = stacks.written(tmp_path / "out")
    assert set(keys) == stacks.expected(good, 30) and set(keys.values()) == {1}
