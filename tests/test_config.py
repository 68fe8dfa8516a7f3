from __future__ import annotations

import json

import pytest

from peaknet_xtal import config
from peaknet_xtal.errors import FormatError

DEFAULTS = {"threshold": 0.5, "optim": {"lr": 1e-3, "wd": 0.05}, "device": "auto"}


def parse(argv):
    parser = config.cli_parser("doc")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--optim.lr", dest="optim.lr", type=float)
    return parser.parse_args(argv)


def test_defaults_apply_when_nothing_is_given():
    assert config.resolve(DEFAULTS, parse([])) == DEFAULTS


def test_command_line_beats_config_file_beats_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("threshold: 0.7\noptim:\n  lr: 0.01\ndevice: cpu\n")
    resolved = config.resolve(DEFAULTS, parse(["--config", str(cfg), "--optim.lr", "0.5"]))
    assert resolved["threshold"] == 0.7  # file over default
    assert resolved["optim"] == {"lr": 0.5, "wd": 0.05}  # command line over file, nested merge
    assert resolved["device"] == "cpu"


def test_bad_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("threshold: [1, 2\n")
    with pytest.raises(FormatError, match="bad.yaml"):
        config.resolve(DEFAULTS, parse(["--config", str(bad)]))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(FormatError, match="mapping"):
        config.load_config_file(listy)


def test_record_saves_the_resolved_configuration(tmp_path):
    out = tmp_path / "sub" / "config.json"
    config.record({"a": 1}, out, "peaknet-test", ["--a", "1"])
    saved = json.loads(out.read_text())
    assert saved == {"command": "peaknet-test", "argv": ["--a", "1"], "config": {"a": 1}}
