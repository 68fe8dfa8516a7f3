"""Supervised training on labelled crops with the focal loss."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from peaknet_xtal.config import bounded, deep_merge
from peaknet_xtal.training.trainer import (
    TRAIN_DEFAULTS,
    TRAIN_TYPES,
    _pair,
    check_start,
    launch,
    resolve_model_name,
)

SUPERVISED_DEFAULTS: dict[str, Any] = deep_merge(TRAIN_DEFAULTS, {
    "loss": {"alpha": [0.25, 0.75], "gamma": 2.0},
})
#: The focal loss's class weights (background, peak) and focusing exponent: a negative
#: exponent or weight trains towards nonsense without failing.
SUPERVISED_TYPES: dict[str, Any] = {**TRAIN_TYPES,
                                    "loss.alpha": _pair(bounded(float, ge=0, le=1)),
                                    "loss.gamma": bounded(float, ge=0)}


def focal_batch_loss(logits: Any, batch: dict[str, Any], alpha: tuple[float, ...],
                     gamma: float) -> tuple[Any, Any]:
    """(sum of the per-pixel focal loss over valid pixels, number of valid pixels)."""
    from peaknet_xtal.training.losses import focal_loss

    valid = batch["mask"][:, 0]
    return (focal_loss(logits, batch["label"], valid, tuple(alpha), gamma, reduction="sum"),
            valid.sum())


def build_dataset(config: dict[str, Any]) -> Any:
    """The crop dataset described by ``config["data"]``."""
    from peaknet_xtal.training.data import Augment, CropDataset, make_source

    data = config["data"]
    return CropDataset(make_source(data), int(data["crop"]), int(config["seed"]),
                       Augment(**(data.get("augment") or {})), float(data["peak_bias"]))


def train(config: dict[str, Any], dataset: Any = None) -> Path:
    """Train per ``config`` (merged over SUPERVISED_DEFAULTS); returns the final model path,
    or, for a run stopped by ``stop_after`` before its schedule's end, its checkpoint folder.

    ``dataset`` replaces the one described by ``config["data"]`` (any ``dataset[sample_id]`` ->
    {"image", "mask", "label"} mapping).  The settings are checked (``trainer.check_start``:
    the model, ``data.crop`` against it, the run folder) before any data are read.
    """
    config = deep_merge(SUPERVISED_DEFAULTS, config)
    check_start(resolve_model_name(config))
    loss = functools.partial(focal_batch_loss, alpha=tuple(config["loss"]["alpha"]),
                             gamma=float(config["loss"]["gamma"]))
    return launch(config, dataset if dataset is not None else build_dataset(config), loss)
