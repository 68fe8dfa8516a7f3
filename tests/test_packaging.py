"""The package metadata matches the source tree, so a regular (non-editable) install is complete."""
from __future__ import annotations

import configparser
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_package_directory_is_declared():
    cfg = _setup_cfg()
    declared = set(cfg["options"]["packages"].split())
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "peaknet_xtal").rglob("__init__.py")}
    data_only = set(cfg["options.package_data"]) - {"peaknet_xtal"}
    for name in data_only:  # a folder of data files, which Python imports as a namespace
        folder = ROOT.joinpath(*name.split("."))
        assert folder.is_dir() and not (folder / "__init__.py").exists(), name
    found |= data_only
    found |= {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}
    assert found == declared
    for name in declared - {n for n in declared if n.startswith("peaknet_xtal")}:
        assert mapping[name] == f"plugins/{name}", "plugins need their own import name"


def test_console_scripts_point_at_main_functions():
    import importlib

    cfg = _setup_cfg()
    scripts = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    assert len(scripts) >= 7
    for line in scripts:
        name, target = (part.strip() for part in line.split("="))
        module, func = target.split(":")
        assert func == "main", name
        assert callable(getattr(importlib.import_module(module), func)), name
        assert importlib.import_module(module).__doc__, f"{name} needs a docstring as its help"


def test_py_typed_ships():
    assert (ROOT / "peaknet_xtal" / "py.typed").exists()
    assert "py.typed" in _setup_cfg()["options.package_data"]["peaknet_xtal"]


def _tracked_files() -> list[str]:
    """The repository's tracked files (``git ls-files``), or a skip where this is no checkout."""
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an unpacked source distribution): nothing to compare "
                    "its files with")
    return [name for name in listed if name]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, set[str]]:
    """The sdist and the wheel, built as a packager builds them (setuptools' PEP 517 backend)
    from a copy of the tracked files: their member names."""
    import shutil

    tracked = _tracked_files()
    tree = tmp_path_factory.mktemp("source")
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    dist = tmp_path_factory.mktemp("dist")
    code = ("import sys; from setuptools import build_meta as b; "
            f"s = b.build_sdist({str(dist)!r}); w = b.build_wheel({str(dist)!r}); print(s, w)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "absent from setuptools' `packages`" not in run.stderr, "a folder is left undeclared"
    sdist_name, wheel_name = run.stdout.split()[-2:]
    with tarfile.open(dist / sdist_name) as sdist:
        top = sdist_name.removesuffix(".tar.gz") + "/"
        sdist_files = {m.name.removeprefix(top) for m in sdist.getmembers() if m.isfile()}
    with zipfile.ZipFile(dist / wheel_name) as wheel:
        wheel_files = set(wheel.namelist())
    return {"tracked": set(tracked), "sdist": sdist_files, "wheel": wheel_files}


def test_the_sdist_holds_every_tracked_file(built):
    """The sdist held nine of the top-level test files but not conftest.py, the fixtures or
    the support modules (setuptools' default picks ``tests/test*.py``), so its test suite ran
    with errors ("fixture 'real_data' not found"), and no licence text (a packaging trial)."""
    assert built["tracked"] <= built["sdist"], sorted(built["tracked"] - built["sdist"])[:10]
    extra = {n for n in built["sdist"] - built["tracked"]
             if n != "PKG-INFO" and not n.startswith("peaknet_xtal.egg-info/")}
    assert not extra, sorted(extra)[:10]
    assert "LICENSE" in built["sdist"]


def test_the_wheel_holds_the_packages_their_data_and_the_licence(built):
    """What a regular install needs at run time: every module of the package and the plugins,
    the shipped weights, ``py.typed``, and the licence text BSD-3-Clause asks to go along."""
    wheel = built["wheel"]
    for name in built["tracked"]:
        top = name.split("/")[0]
        if top == "peaknet_xtal":
            assert name in wheel, name
        elif top == "plugins" and name.endswith(".py"):
            assert name.removeprefix("plugins/") in wheel, name
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE")
               for n in wheel), sorted(n for n in wheel if ".dist-info/" in n)
    assert not [n for n in wheel if n.endswith(".pyc") or "__pycache__" in n]
