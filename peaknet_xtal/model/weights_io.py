"""Saving and loading models: safetensors weights plus a JSON config that rebuilds the network.

The config is written twice, as ``<stem>.json`` beside the weights (readable, diffable) and inside
the safetensors metadata (so a lone weights file still loads).  Writes are atomic.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from peaknet_xtal.atomic import atomic_path, write_json_atomic
from peaknet_xtal.errors import FormatError

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_NAME = "default"


def _resolve(spec: str | os.PathLike[str]) -> Path:
    path = Path(spec)
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        preferred = path / "model.safetensors"
        if preferred.exists():
            return preferred
        if len(found) != 1:
            raise FormatError(path, f"expected model.safetensors or exactly one .safetensors file "
                                    f"in the directory, found {[f.name for f in found]}")
        return found[0]
    return path


def save_model(model: Any, path: str | os.PathLike[str], extra: dict[str, Any] | None = None,
               state: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights (safetensors) and config (JSON); a directory gets model.*.

    ``state`` replaces ``model.state_dict()`` (a gathered full state dict of a sharded model).
    """
    from safetensors.torch import save_file

    target = Path(path)
    if target.suffix != ".safetensors":
        target = target / "model.safetensors"
    config = dict(model.config)
    if extra:
        config["extra"] = extra
    state = model.state_dict() if state is None else state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(config, sort_keys=True)})
    write_json_atomic(target.with_suffix(".json"), config)
    return target


def read_config(weights: Path) -> dict[str, Any]:
    """The model config beside ``weights`` (JSON), else from the safetensors metadata."""
    beside = weights.with_suffix(".json")
    if beside.exists():
        try:
            return json.loads(beside.read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(beside, f"model config is not valid JSON: {exc.msg}",
                              line=exc.lineno) from exc
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "config" not in meta:
        raise FormatError(weights, "no model config: neither a .json beside it nor 'config' in "
                                   "the safetensors metadata")
    return json.loads(meta["config"])


def load_model(spec: str | os.PathLike[str] = DEFAULT_NAME, device: str = "cpu") -> Any:
    """A model in eval mode from ``"default"``, a ``.safetensors`` file or a model directory.

    ``"default"`` is the small trained model shipped in ``model/weights``; when those weights are
    missing (a broken install or checkout) this is an error, never a silently random model whose
    "peaks" would look like results.
    """
    from safetensors.torch import load_file

    from peaknet_xtal.model.zoo import build_from_config

    if str(spec) == DEFAULT_NAME:
        weights = WEIGHTS_DIR / "default.safetensors"
        if not weights.exists():
            raise FormatError(weights, "the shipped default model weights are missing; reinstall "
                                       "peaknet-xtal or rebuild them with "
                                       "examples/train_default_model.py, or pass a weights path")
    else:
        weights = _resolve(spec)
    if not weights.exists():
        raise FormatError(weights, "model weights not found")
    config = read_config(weights)
    config.pop("extra", None)
    try:
        model = build_from_config(config)
    except (KeyError, TypeError) as exc:
        raise FormatError(weights, f"model config cannot build a model: {exc}") from exc
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FormatError(weights, f"not a readable safetensors file: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FormatError(weights, f"weights do not fit the config: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")
    return model.to(device).eval()
