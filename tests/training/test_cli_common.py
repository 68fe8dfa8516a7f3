"""peaknet-train and peaknet-distill share one command line: the YAML config is validated before
anything is trained, and the shipped example configs pass."""
from __future__ import annotations

from pathlib import Path

import pytest

from peaknet_xtal.cli import distill, train
from peaknet_xtal.config import resolve
from peaknet_xtal.training.distill import DISTILL_DEFAULTS, DISTILL_TYPES
from peaknet_xtal.training.supervised import SUPERVISED_DEFAULTS, SUPERVISED_TYPES

COMMANDS = {"train": (train.main, SUPERVISED_DEFAULTS, SUPERVISED_TYPES),
            "distill": (distill.main, DISTILL_DEFAULTS, DISTILL_TYPES)}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_config_typo_is_an_error_naming_file_and_key(command, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  lr: 0.001\n  warmup: 10\n")
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[command][0]([str(cfg), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and "'optim.warmup'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_wrong_type_is_an_error(command, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("schedule: {steps: many}\nmodel: {init: 3}\n")
    with pytest.raises(SystemExit):
        COMMANDS[command][0]([str(cfg), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "schedule.steps" in err and "model.init" in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_shipped_example_configs_validate(command):
    _, defaults, types = COMMANDS[command]
    examples = Path(__file__).resolve().parents[2] / "examples" / "configs"
    files = sorted(examples.glob(f"{command}*.yaml"))
    assert files
    for path in files:
        assert resolve(defaults, {}, path, types=types)["out"]
