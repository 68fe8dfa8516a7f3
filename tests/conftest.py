"""Shared fixtures.

``../shared/data/real`` (beside the checkout) holds the real data sets.  In a user's checkout it may
be absent, and tests that need it skip with that reason; in CI (``CI=true``) it is always present,
so its absence there is an error, never a skip.  The same rule holds for DIALS.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_REAL = ROOT.parent / "shared" / "data" / "real"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: Test devices (``peaknet_test_support``): importable here and, through PYTHONPATH, in the worker
#: processes a test starts (Ray), since they are not part of the package.
SUPPORT = Path(__file__).resolve().parent / "support"
sys.path.insert(0, str(SUPPORT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(SUPPORT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI must run this test)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real``: real detector files, streams and geometries."""
    if not SHARED_REAL.is_dir():
        _missing(f"shared real data not found at {SHARED_REAL}")
    return SHARED_REAL


@pytest.fixture(scope="session")
def geometry_files(real_data: Path) -> list[Path]:
    return sorted((real_data / "crystfel_geometry").glob("*.geom"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def dials_available() -> bool:
    try:
        import dials  # noqa: F401
        import dxtbx  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def dials_env() -> dict[str, str]:
    """Environment for running ``dials.*`` commands as subprocesses of this interpreter's venv."""
    if not dials_available():
        _missing("DIALS (dxtbx/cctbx) is not importable; run bin/setup-env")
    env = dict(os.environ)
    env.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")
    return env


def _load_simdata() -> ModuleType:
    """``tests/labelling/simdata.py``, loaded by path: plain helpers shared by these fixtures and by
    ``benchmarks/bench_pvoigt_fit.py`` (test modules cannot import each other under
    ``--import-mode=importlib``, and a benchmark cannot use fixtures)."""
    from peaknet_test_support import load_script

    return load_script(Path(__file__).parent / "labelling" / "simdata.py",
                       "_peaknet_tests_simdata")


simdata = _load_simdata()


@pytest.fixture(scope="session")
def make_geometry_text() -> Callable[..., str]:
    """Builds the small stacked-panel geometries the tests write (``simdata.geometry_text``), so
    each test states only the numbers it depends on."""
    return simdata.geometry_text


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Six simulated two-panel frames and their truth stream (``simdata.SimRun``), shared by the
    engine tests and stream2labels (a test module may override it with its own ``sim_run``)."""
    return simdata.make_sim_run(tmp_path_factory.mktemp("simrun"))


@pytest.fixture
def one_torch_thread() -> Any:
    """One torch thread for a test: on a busy machine two threads of small ops wait on each
    other.  The previous count comes back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``install_plugin(name, code)``: a distribution ``name`` whose ``peaknet_xtal`` entry point
    is the module ``code`` (dedented), on ``sys.path`` with the registry rebuilt to load it, as
    a third-party plugin installed with pip is; undone afterwards.  Code that fails to import
    makes a plugin the registry skips and names again where its names are asked for."""
    import importlib
    import textwrap

    from peaknet_xtal import registry

    modules: list[str] = []

    def install(name: str, code: str) -> None:
        module = f"{name}_peaknet"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(code))
        info = tmp_path / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-dist\n"
                                       "Version: 0.1\n")
        (info / "entry_points.txt").write_text(f"[peaknet_xtal]\n{name} = {module}\n")
        modules.append(module)
        importlib.invalidate_caches()
        registry.plugin_manager.cache_clear()

    monkeypatch.syspath_prepend(str(tmp_path))
    yield install
    for module in modules:
        sys.modules.pop(module, None)
    monkeypatch.undo()
    registry.plugin_manager.cache_clear()
