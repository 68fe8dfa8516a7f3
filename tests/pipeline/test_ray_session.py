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
