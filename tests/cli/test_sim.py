"""peaknet-sim's command line: its configuration is validated before anything is simulated."""
from __future__ import annotations

import pytest

from peaknet_xtal.cli.sim import main


def test_config_file_typo_is_an_error_naming_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("seeed: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["-g", "x.geom", "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "sim.yaml" in err and "'seeed'" in err and "'seed'" in err
    assert not (tmp_path / "out").exists()


def test_wrong_type_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("n: ten\n")
    with pytest.raises(SystemExit):
        main(["-g", "x.geom", "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert "sim.yaml: n:" in capsys.readouterr().err
