"""The package metadata matches the source tree, so a regular (non-editable) install is complete."""
from __future__ import annotations

import configparser
from pathlib import Path

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
