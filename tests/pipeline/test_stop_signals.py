"""Stopping the pipeline: SIGTERM (a batch scheduler's stop) as Ctrl-C, a Ctrl-C that comes after
the last frame (while the defect mask is written) still reported, and Ray's own SIGTERM handler
not replacing the caller's.  On threads (``backend="threads"``), with the plain local-maximum
finder: the signal handling is the driver's, whatever hosts the stages."""
from __future__ import annotations

import os
import signal
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
from peaknet_test_support import LocalMaxFinder

from peaknet_xtal.formats.cxi import CXISource, CXIWriter
from peaknet_xtal.pipeline import run_pipeline
from peaknet_xtal.pipeline.driver import Driver


class _Unhandled(Exception):
    """SIGTERM reached the test's own handler: the code under test did not handle it."""


@pytest.fixture
def sigterm_guard():
    """A SIGTERM nobody handles must fail the test, not kill the test run: the test's own
    handler raises :class:`_Unhandled`, and comes back as it was afterwards."""
    def unhandled(signum, frame):
        raise _Unhandled("SIGTERM reached the test's own handler")

    before = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, before)


def _config(tmp_path: Path, inputs: list, finder: type = LocalMaxFinder, **extra) -> dict:
    return {"inputs": [{"path": str(p), "kind": CXISource} for p in inputs],
            "output": str(tmp_path / "out" / "run.cxi"), "writer": CXIWriter,
            "writer_options": {"frames_per_file": 4}, "backend": "threads",
            "frame_finder": finder, "frame_finder_options": {"threshold": 100.0},
            "workers": 1, "batch_size": 2, "queue_capacity": 4, "result_queue_capacity": 4,
            "source_chunk": 2, "progress": False, "monitor_interval": 0.05, **extra}


class _Reference:
    """Stands in for a Ray object reference: something with a finaliser."""


class _TerminatingFinder(LocalMaxFinder):
    """Sends this process SIGTERM when it meets frame //3, as a scheduler would mid-run."""

    def find_frames(self, frames):
        for result in super().find_frames(frames):
            if result.frame.event == "//3":
                os.kill(os.getpid(), signal.SIGTERM)
            yield result


def test_sigterm_stops_the_pipeline_as_ctrl_c_does(tmp_path, stacks, sigterm_guard):
    """The first SIGTERM asks for a stop, as a first Ctrl-C does: the frames done are written,
    the rest dropped, and the summary says the run was interrupted, by SIGTERM; the caller's
    handler is back afterwards."""
    path = stacks.write(tmp_path / "a.h5", 40)
    summary = run_pipeline(_config(tmp_path, [path], _TerminatingFinder))
    assert summary["interrupted"] is True and summary["stop_signal"] == "SIGTERM"
    written = stacks.written(tmp_path / "out")
    assert 4 <= sum(written.values()) < 40 and set(written.values()) == {1}
    assert not list((tmp_path / "out").glob(".*.part"))  # nothing half-written left behind
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


class _DoubleCtrlC(LocalMaxFinder):
    """Presses Ctrl-C twice, 0.2 s apart, when it meets frame //3: both before the driver's
    loop (which looks once an interval) has turned the first into the stop."""

    def find_frames(self, frames):
        for result in super().find_frames(frames):
            time.sleep(0.05)  # the run is still going when the second one comes
            if result.frame.event == "//3":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the first one handled: the flag set
                os.kill(os.getpid(), signal.SIGINT)
            yield result


def test_two_quick_ctrl_c_stop_at_once(tmp_path, stacks):
    """The second of two Ctrl-C stops at once, however soon it follows the first: it acted as
    the first (the run went on finding every leased frame) where the loop had not yet seen the
    first one's flag."""
    path = stacks.write(tmp_path / "a.h5", 40)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_config(tmp_path, [path], _DoubleCtrlC, monitor_interval=3.0))


def test_a_second_sigterm_stops_at_once(sigterm_guard):
    from peaknet_xtal.pipeline.driver import sigint_requests_stop
    from peaknet_xtal.stopping import Terminated

    driver = Driver({}, None)
    with sigint_requests_stop(driver):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        assert driver.stop_requested and driver.stop_signal == signal.SIGTERM
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


def test_a_ctrl_c_while_the_defect_mask_is_written_ends_the_run_interrupted(
        tmp_path, stacks, monkeypatch):
    """The trial's late Ctrl-C: it came while the run wrote its defect mask, Python's default
    handler raised it inside a finaliser (a Ray object reference freed), where it was printed as
    "Exception ignored" and lost, and the run ended as finished.  The stop flag's handler now
    covers that too: the run says it was interrupted."""
    def freed_while_interrupted() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs here, inside the finaliser
            pass

    real_save = Driver.save_defects
    pressed: list[bool] = []

    def save_defects(self):
        if not pressed:  # one Ctrl-C (the run writes the mask once; a later call is a no-op)
            pressed.append(True)
            holder = _Reference()
            weakref.finalize(holder, freed_while_interrupted)
            del holder  # its finaliser runs now, as a freed Ray reference's does
        return real_save(self)

    monkeypatch.setattr(Driver, "save_defects", save_defects)
    path = stacks.write(tmp_path / "a.h5", 6)
    summary = run_pipeline(_config(tmp_path, [path]))
    assert summary["interrupted"] is True and summary["stop_signal"] == "SIGINT"
    assert sum(stacks.written(tmp_path / "out").values()) == 6  # every frame was done


def test_ray_init_does_not_replace_the_callers_sigterm_handler(monkeypatch, sigterm_guard):
    """``ray.init`` sets its own SIGTERM handler (``sys.exit(15)``): a command's own handler
    (peaknet2cxi's: SIGTERM as Ctrl-C) must survive it, or SIGTERM ends the run with a bare
    status 15 and no record."""
    from peaknet_xtal.pipeline.ray_session import ray_session

    def init(**_):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init,
                                 shutdown=lambda: None)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with ray_session(num_cpus=1):
        assert signal.getsignal(signal.SIGTERM) is sigterm_guard


class _GoneBackend:
    """Ray after a scheduler's SIGTERM reached its own processes: no stage's end is ever
    reported, and the cluster is not alive."""

    def wait(self, futures, timeout):
        time.sleep(min(timeout, 0.01))
        return []

    def alive(self):
        return False


class _GoneQueue:
    """A queue whose process the stop ended: a call fails, as Ray's do for a dead actor."""

    def abort(self):
        raise RuntimeError("The actor is unavailable: Connection refused")

    stats = close = release = abort


def test_a_stop_that_ended_rays_own_processes_does_not_wait_for_ever():
    """A scheduler's SIGTERM reaches Ray's own processes too: no stage's end is then ever
    reported, and Ray ends the process a minute later, before the run's record is written.
    Once the stop is asked for and the cluster is gone, the driver stops waiting (and asks
    the gone queues nothing more): the run ends at once, saying which stages could not
    finish."""
    import threading

    from peaknet_xtal.pipeline.driver import resolve_config
    from peaknet_xtal.pipeline.monitor import PipelineMonitor

    driver = Driver(resolve_config({"inputs": ["a.h5"], "progress": False}), _GoneBackend())
    driver.frames, driver.results = _GoneQueue(), [_GoneQueue()]
    driver.running = {object(): ("worker", "w0", None), object(): ("writer", "writer0", None)}
    driver.stop_requested, driver.stop_signal = True, signal.SIGTERM
    monitor = PipelineMonitor(None, progress=False, interval=0.01)
    looping = threading.Thread(target=driver.loop, args=(monitor,), daemon=True)
    looping.start()
    looping.join(timeout=10)
    assert not looping.is_alive(), "the driver still waits on stages that cannot finish"
    assert driver.interrupted and not driver.running
    assert any("cannot finish" in f and "w0" in f and "writer0" in f for f in driver.failures)
