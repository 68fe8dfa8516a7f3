"""Saving and loading integrators: safetensors weights + JSON config, as the peak models do.

``"default"`` is the small integrator shipped in ``peaknet_xtal/model/weights/`` (rebuilt by
``examples/train_integrator_default.py``).  Writes are atomic.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peaknet_xtal.atomic import atomic_path, write_json_atomic
from peaknet_xtal.errors import FormatError
from peaknet_xtal.model.weights_io import (
    WEIGHTS_DIR,
    check_finite,
    check_fit,
    check_kinds,
    tensor_shapes,
)

DEFAULT_NAME = "integrator_default"


def default_path() -> Path:
    return WEIGHTS_DIR / f"{DEFAULT_NAME}.safetensors"


def save_integrator(model: Any, path: str | os.PathLike[str],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write weights (``.safetensors``) and config (``.json`` beside it and in the metadata)."""
    from safetensors.torch import save_file

    target = Path(path)
    if target.suffix != ".safetensors":
        target = target.with_suffix(".safetensors")
    config = dict(model.config)
    if extra:
        config["extra"] = extra
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(config, sort_keys=True)})
    write_json_atomic(target.with_suffix(".json"), config)
    return target


def load_integrator(spec: str | os.PathLike[str] = "default", device: str = "cpu") -> Any:
    """An integrator in eval mode from ``"default"`` or a ``.safetensors`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from peaknet_xtal.integration.model import build_model

    path = default_path() if str(spec) == "default" else Path(spec)
    if not path.exists():
        raise FormatError(path, "integrator weights not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own types for corrupt headers
        raise FormatError(path, f"not a readable safetensors file: {exc}") from exc
    beside = path.with_suffix(".json")
    try:
        config = json.loads(beside.read_text()) if beside.exists() else json.loads(
            meta["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"no readable integrator config: {exc}") from exc
    config.pop("extra", None)
    try:
        model = build_model(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(path, f"config does not describe an integrator: {exc}") from exc
    check_fit(tensor_shapes(model.state_dict()), tensor_shapes(state), path,
              "weights do not fit the config")
    check_kinds(model.state_dict(), state, path)
    check_finite(state, path)
    model.load_state_dict(state)
    return model.to(device).eval()
