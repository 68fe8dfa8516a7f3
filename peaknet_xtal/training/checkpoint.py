"""Checkpoints that resume exactly: weights (safetensors + JSON config) and training state.

Layout: ``<dir>/step_000120/{model.safetensors, model.json, state.pt}`` plus ``<dir>/latest``
naming the newest complete checkpoint.  A checkpoint directory is written under a temporary name
and renamed when complete, and ``latest`` is replaced atomically afterwards, so a crash at any
moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from peaknet_xtal.atomic import write_text_atomic
from peaknet_xtal.errors import FormatError

KEEP = 2


def save_checkpoint(directory: str | os.PathLike[str], step: int, model: Any,
                    state: dict[str, Any], keep: int = KEEP,
                    weights: dict[str, Any] | None = None) -> Path:
    """Write ``model`` and ``state`` (optimiser, scheduler, RNG, step) for ``step``."""
    import torch

    from peaknet_xtal.model import save_model

    root = Path(directory)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model.safetensors", state=weights)
    torch.save({**state, "step": step}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / "state.pt").exists():
        raise FormatError(pointer, f"points at {path.name}, which is not a complete checkpoint")
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FormatError(checkpoint / "state.pt", f"cannot read training state: {exc}") from exc


def load_weights(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's model weights as a state dict (full, unsharded)."""
    from safetensors.torch import load_file

    path = checkpoint / "model.safetensors"
    try:
        return load_file(str(path))
    except Exception as exc:
        raise FormatError(path, f"cannot read checkpoint weights: {exc}") from exc
