"""Resuming from a run folder never runs code from it.

A run folder may come from anywhere (a colleague's copy, a shared disk).  ``checkpoints/latest``
must name a checkpoint inside the folder, and ``state.pt`` is read with the weights-only
unpickler; the tests craft the attacks that worked before (a pointer to an absolute path, a
symlink out, a pickle that writes a marker file when loaded) and check that each is refused with
an error naming the file, and that the marker never appears.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from peaknet_xtal.cli.train import main as train_main
from peaknet_xtal.errors import FormatError
from peaknet_xtal.model import create_model
from peaknet_xtal.training.checkpoint import (
    latest_checkpoint,
    load_state,
    load_weights,
    save_checkpoint,
)

torch.set_num_threads(1)


class Marker:
    """Loading this with plain pickle writes ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _checkpoint(root: Path, step: int = 2) -> Path:
    model = create_model("yocto", neck_blocks=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(root, step, model, {"optimizer": optimizer.state_dict(),
                                               "scheduler": scheduler.state_dict(),
                                               "rng": [torch.get_rng_state()], "world_size": 1})


def test_a_genuine_checkpoint_loads(tmp_path):
    final = _checkpoint(tmp_path / "checkpoints")
    assert latest_checkpoint(tmp_path / "checkpoints") == final
    assert load_state(final)["step"] == 2
    assert load_weights(final)


def test_latest_pointing_outside_the_run_is_refused(tmp_path):
    elsewhere = _checkpoint(tmp_path / "elsewhere")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text(str(elsewhere) + "\n")
    with pytest.raises(FormatError, match="latest"):
        latest_checkpoint(checkpoints)
    (checkpoints / "latest").write_text("../../elsewhere/step_000002\n")
    with pytest.raises(FormatError, match="step_NNNNNN"):
        latest_checkpoint(checkpoints)


def test_a_symlink_leading_out_is_refused(tmp_path):
    elsewhere = _checkpoint(tmp_path / "elsewhere")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(elsewhere, checkpoints / "step_000002")
    (checkpoints / "latest").write_text("step_000002\n")
    with pytest.raises(FormatError, match="outside the checkpoint folder"):
        latest_checkpoint(checkpoints)


def test_a_malicious_state_does_not_run(tmp_path):
    final = _checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "MARKER"
    torch.save({"optimizer": Marker(marker), "scheduler": {}, "rng": [], "step": 2},
               final / "state.pt")
    with pytest.raises(FormatError, match="state.pt"):
        load_state(final)
    assert not marker.exists()


def test_peaknet_train_refuses_a_crafted_run_folder(tmp_path, label_file, capsys):
    """The whole command: a crafted run folder gives one error line and runs nothing."""
    import yaml

    run = tmp_path / "run"
    final = _checkpoint(run / "checkpoints")
    marker = tmp_path / "MARKER"
    torch.save(Marker(marker), final / "state.pt")
    config = {"out": str(run), "threads": 1, "model": {"name": "yocto",
                                                        "overrides": {"neck_blocks": 1}},
              "data": {"source": "labels", "paths": [str(label_file)], "crop": 32},
              "optim": {"batch_size": 2, "accum": 1}, "schedule": {"steps": 4, "warmup": 1},
              "checkpoint": {"every": 2}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert train_main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "state.pt" in err and "Traceback" not in err
    assert not marker.exists()
