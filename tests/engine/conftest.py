"""Fixtures of the engine tests: a small simulated run with a stream of its true predictions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simdata import SimRun, make_sim_run  # noqa: E402


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> SimRun:
    return make_sim_run(tmp_path_factory.mktemp("simrun"))
