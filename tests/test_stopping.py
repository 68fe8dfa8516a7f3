"""peaknet_xtal/stopping.py: a stop held while a write finishes (``stops_held``)."""
from __future__ import annotations

import os
import signal

import pytest

from peaknet_xtal.stopping import Terminated, stops_held


def test_a_held_stop_waits_for_the_block_and_a_second_one_does_not():
    """The first SIGTERM or Ctrl-C inside waits until the block is done and is then raised as
    the stop it was; a second one, or one before ``hold()``, stops at once; the handlers before
    come back."""
    def unheld(signum, frame):
        raise AssertionError("a SIGTERM not held")  # Python's default ends the test session

    guard = signal.signal(signal.SIGTERM, unheld)
    try:
        _held_stops()
    finally:
        signal.signal(signal.SIGTERM, guard)


def _held_stops():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(Terminated):
        with stops_held():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("after the first")
    assert done == ["after the first"]
    with pytest.raises(KeyboardInterrupt) as second:
        with stops_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the second")
    assert type(second.value) is KeyboardInterrupt and done == ["after the first"]
    with pytest.raises(KeyboardInterrupt):
        with stops_held(now=False) as hold:
            os.kill(os.getpid(), signal.SIGINT)
            done.append("before hold")
            hold()
    assert done == ["after the first"]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_stop_signal_the_process_ignores_stays_ignored_while_held():
    """A job a shell script starts in the background ignores SIGINT (the Ctrl-C meant for the
    script's foreground): held, it was taken as a stop after the checkpoint."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stops_held():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    except KeyboardInterrupt:
        pytest.fail("an ignored SIGINT was taken as a stop")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_without_second_stops_every_stop_waits_for_the_block():
    """A report moved into place must never stop half-way: there a second Ctrl-C waits too,
    and the first one's stop is raised as the block leaves."""
    done = []
    with pytest.raises(KeyboardInterrupt) as stop:
        with stops_held(second_stops=False):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the block's end")
    assert done == ["the block's end"] and type(stop.value) is KeyboardInterrupt
