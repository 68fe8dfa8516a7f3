"""The model, the finding engine and one training step on torch's ``meta`` device.

CI has no GPU, and the only CUDA tests skip there; a tensor made on the CPU and mixed with the
model's input (``torch.quantile`` with a CPU ``q`` crashed every GPU run) would go unnoticed.
``meta`` tensors carry shapes and devices but no data, and torch refuses to mix them with CPU
tensors exactly as it refuses CUDA ones, so these runs catch device mixing without a GPU.

Two concessions to a device without data: boolean-mask indexing (its output size depends on the
data) is allowed by torch's switch that assumes every element is selected, and the engine's one
exit from the device (``engine.to_host``) hands back zeros of the right shape.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx.experimental._config as fx_config

from peaknet_xtal.model import create_model

META = torch.device("meta")


@pytest.fixture(autouse=True)
def data_dependent_shapes_on_meta(monkeypatch):
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)


def test_model_forward_stays_on_the_device() -> None:
    model = create_model("yocto").eval().to(META)
    x = torch.randn(2, 1, 40, 56, device=META)
    mask = torch.ones(2, 1, 40, 56, dtype=torch.bool, device=META)
    with torch.no_grad():
        logits = model(x, mask)
    assert logits.device == META and tuple(logits.shape) == (2, 2, 40, 56)


def test_finding_engine_runs_the_model_on_the_device(monkeypatch) -> None:
    from peaknet_xtal.finding import engine as engine_module
    from peaknet_xtal.types import Frame

    shipped: list[tuple[str, tuple[int, ...]]] = []

    def to_host(tensor: torch.Tensor) -> np.ndarray:
        shipped.append((tensor.device.type, tuple(tensor.shape)))
        return np.zeros(tuple(tensor.shape), np.float32)

    monkeypatch.setattr(engine_module, "to_host", to_host)
    engine = engine_module.InferenceEngine(create_model("yocto").eval(), device="meta",
                                           batch_size=2, tile_size=64, tile_overlap=16)
    rng = np.random.default_rng(0)
    frame = Frame(panels=[rng.normal(5, 1, (40, 50)).astype(np.float32),
                          rng.normal(5, 1, (100, 70)).astype(np.float32)])
    (result,) = engine.find_frames([frame])
    assert shipped and all(device == "meta" for device, _ in shipped)
    assert len(result.peaks) == 0  # zeros came back: no peak, but every step ran


def test_one_training_step_on_the_device(tmp_path) -> None:
    """The trainer's own model, optimiser and scheduler (``_Run``) and its loss, one step."""
    from peaknet_xtal.config import deep_merge
    from peaknet_xtal.training.supervised import SUPERVISED_DEFAULTS, focal_batch_loss
    from peaknet_xtal.training.trainer import _global_count, _Run

    config = deep_merge(SUPERVISED_DEFAULTS, {
        "out": str(tmp_path), "device": "meta",
        "model": {"name": "yocto", "overrides": {"neck_blocks": 1}}})
    run = _Run(0, 1, config)
    assert next(run.model.parameters()).device == META
    rng = np.random.default_rng(1)
    batch = {"image": torch.from_numpy(rng.normal(5, 1, (2, 1, 32, 32)).astype(np.float32)),
             "mask": torch.ones(2, 1, 32, 32, dtype=torch.bool),
             "label": torch.zeros(2, 32, 32, dtype=torch.long)}
    batch = {k: v.to(run.device) for k, v in batch.items()}
    logits = run.wrapped(batch["image"], batch["mask"])
    total, count = focal_batch_loss(logits, batch, alpha=(0.25, 0.75), gamma=2.0)
    (total / _global_count(count, 1)).backward()
    torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), 1.0)
    run.optimizer.step()
    run.scheduler.step()
    assert all(p.device == META for p in run.model.parameters())
