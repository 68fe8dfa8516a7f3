"""The one Ray session helper: a local Ray for a block, a caller's reused, workers set up."""
from __future__ import annotations

import pytest

from peaknet_xtal.pipeline.ray_session import WORKER_ENV, ray_session

pytestmark = pytest.mark.ray


def test_local_session_starts_configures_and_stops():
    import ray

    assert not ray.is_initialized()
    with ray_session(num_cpus=2) as session:
        assert session is ray and ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 2

        @ray.remote
        def worker_env() -> dict[str, str | None]:
            import os

            return {name: os.environ.get(name) for name in WORKER_ENV}

        assert ray.get(worker_env.remote()) == WORKER_ENV
        with ray_session(num_cpus=1) as inner:  # nested: reused, not restarted or stopped
            assert inner.cluster_resources()["CPU"] == 2
        assert ray.is_initialized()
    assert not ray.is_initialized()


def test_session_is_shut_down_when_the_block_fails():
    import ray

    with pytest.raises(RuntimeError, match="boom"), ray_session(num_cpus=1):
        raise RuntimeError("boom")
    assert not ray.is_initialized()


def test_an_address_nothing_answers_at_is_refused_at_once():
    """Ray retried an unreachable cluster for minutes, a log line a second, with no error of its
    own; now one error naming the address, before Ray is asked."""
    import socket
    import time

    from peaknet_xtal.pipeline.ray_session import check_reachable, ray_session

    with socket.socket() as listening:  # a port something answers at
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        with ray_session(address=f"127.0.0.1:{port}"):
            pass
    assert time.monotonic() - start < 15
    check_reachable("auto")  # Ray's own discovery: left to Ray


def test_a_local_session_ignores_a_cluster_named_in_the_environment(monkeypatch):
    """RAY_ADDRESS (or a `ray start` head on the node) made the local session join that
    cluster and then refuse its own CPU count ("When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided"): a local session starts a Ray of its own."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing there
    with ray_session(num_cpus=1):
        assert ray.cluster_resources()["CPU"] == 1
    assert not ray.is_initialized()


def test_a_sigterm_while_ray_starts_is_the_callers_stop():
    """Ray's SIGTERM handler, active while ray.init runs, exits with status 15 and says
    nothing; a SIGTERM then is the caller's stop, raised by the caller's own handler (a
    peaknet2cxi run: exit 143 and its one line), and the handler stays the caller's."""
    import signal

    from peaknet_xtal.pipeline.ray_session import _keeping_sigterm_handler

    class Stopped(Exception):
        pass

    def mine(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Stopped), _keeping_sigterm_handler():
            signal.signal(signal.SIGTERM, lambda *_: None)  # as ray.init installs its own
            raise SystemExit(signal.SIGTERM)  # what Ray's handler does
        assert signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(SystemExit), _keeping_sigterm_handler():
            raise SystemExit(2)  # any other exit is left alone
    finally:
        signal.signal(signal.SIGTERM, previous)
