"""A run whose loss, gradient or weights go NaN or infinite stops there: an error naming the step
and the learning rate, its earlier checkpoints kept, no final model, a history of strict JSON.

It once finished "successfully" with ``loss nan``: a model.safetensors of 13.4M non-finite
values (which finds nothing on any frame) and history lines with bare ``NaN`` tokens.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from peaknet_xtal.training.checkpoint import latest_checkpoint
from peaknet_xtal.training.supervised import focal_batch_loss, train
from peaknet_xtal.training.trainer import TrainingDiverged, _finite_weights, _log_step

torch.set_num_threads(1)


def _config(out: Path, label_file: Path, **extra: Any) -> dict:
    config = {
        "out": str(out), "threads": 1,
        "model": {"name": "yocto", "overrides": {"neck_blocks": 1}},
        "data": {"source": "labels", "paths": [str(label_file)], "crop": 32},
        "optim": {"batch_size": 2, "lr": 3e-3},
        "schedule": {"steps": 4, "warmup": 1},
        "checkpoint": {"every": 1},
        "log_every": 1,
    }
    config.update(extra)
    return config


def _strict(line: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def test_a_nan_loss_stops_the_run_keeping_the_checkpoints_before_it(
        tmp_path: Path, label_file: Path, monkeypatch) -> None:
    calls = {"n": 0}

    def nan_at_step_3(logits: Any, batch: dict[str, Any], alpha: tuple[float, ...],
                      gamma: float) -> tuple[Any, Any]:
        calls["n"] += 1
        total, count = focal_batch_loss(logits, batch, alpha, gamma)
        return (total * float("nan") if calls["n"] == 3 else total), count

    monkeypatch.setattr("peaknet_xtal.training.supervised.focal_batch_loss", nan_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as caught:
        train(_config(out, label_file))
    message = str(caught.value)
    assert "training diverged at step 3 of 4: the loss is nan" in message
    assert "learning rate" in message and "Lower optim.lr (now 0.003)" in message
    assert str(out / "checkpoints" / "step_000002") in message and "\n" not in message
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_000002"
    assert not (out / "checkpoints" / "step_000003").exists()
    assert not (out / "model.safetensors").exists()
    weights = load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors"))
    assert _finite_weights(weights.values())
    lines = [_strict(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3]
    assert lines[-1]["loss"] is None and lines[-1]["grad_norm"] is None
    assert all(math.isfinite(e["loss"]) for e in lines[:-1])


def test_weights_made_infinite_by_the_update_stop_the_run_before_any_is_saved(
        tmp_path: Path, label_file: Path) -> None:
    """An infinite learning rate from a Python caller (the command line refuses it): the first
    update leaves the weights NaN while its loss and gradient were finite."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="training diverged at step 1 of 4: the weights "
                                               "hold NaN or infinite values after the update.*"
                                               "no checkpoint had been written yet"):
        train(_config(out, label_file, optim={"batch_size": 2, "lr": math.inf}))
    assert latest_checkpoint(out / "checkpoints") is None
    assert not (out / "model.safetensors").exists()


def test_history_lines_are_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    _log_step(path, {"step": 1, "loss": float("nan"), "grad_norm": math.inf, "lr": 1e-3})
    assert _strict(path.read_text()) == {"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}


def test_finite_weights() -> None:
    assert _finite_weights([torch.ones(3), torch.arange(4)])
    assert not _finite_weights([torch.ones(3), torch.tensor([1.0, math.inf])])
    assert not _finite_weights([torch.tensor([math.nan])])
    assert _finite_weights([])


def test_a_checkpoint_of_non_finite_weights_is_not_resumed(tmp_path: Path,
                                                           label_file: Path) -> None:
    """A run folder from before runs stopped at the first NaN: resuming its checkpoint would
    install a model of NaN under the final name."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from peaknet_xtal.errors import FormatError

    out = tmp_path / "run"
    train(_config(out, label_file, stop_after=2))
    weights_path = out / "checkpoints" / "step_000002" / "model.safetensors"
    with safe_open(str(weights_path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
    weights = load_file(str(weights_path))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], math.nan)
    save_file(weights, str(weights_path), metadata=metadata)
    with pytest.raises(FormatError, match="step_000002/model.safetensors: weights hold NaN"):
        train(_config(out, label_file))
    assert not (out / "model.safetensors").exists()
