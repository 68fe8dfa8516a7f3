"""peaknet-train's command line: the YAML config is validated before anything is trained."""
from __future__ import annotations

from pathlib import Path

import pytest

from peaknet_xtal.cli.train import main
from peaknet_xtal.config import resolve
from peaknet_xtal.training.supervised import SUPERVISED_DEFAULTS, SUPERVISED_TYPES


def test_config_typo_is_an_error_naming_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  lr: 0.001\n  warmup: 10\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(cfg), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and "'optim.warmup'" in err
    assert not (tmp_path / "out").exists()


def test_wrong_type_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("schedule: {steps: many}\nmodel: {init: 3}\n")
    with pytest.raises(SystemExit):
        main([str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "schedule.steps" in err and "model.init" in err


def test_shipped_example_configs_validate():
    examples = Path(__file__).resolve().parents[2] / "examples" / "configs"
    files = sorted(examples.glob("train*.yaml"))
    assert files
    for path in files:
        assert resolve(SUPERVISED_DEFAULTS, {}, path, types=SUPERVISED_TYPES)["out"]
