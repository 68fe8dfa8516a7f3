"""Checkpoints that resume exactly: weights (safetensors + JSON config) and training state.

Layout: ``<dir>/step_000120/{model.safetensors, model.json, state.pt}`` plus ``<dir>/latest``
naming the newest complete checkpoint.  A checkpoint directory is written under a temporary name
and renamed when complete, and ``latest`` is replaced atomically afterwards, so a crash at any
moment leaves the previous checkpoint usable.

Resuming reads files from a run folder that may have been copied from elsewhere, so nothing in it
may run code: ``latest`` must name a ``step_NNNNNN`` folder inside the checkpoint folder (no path,
no symlink leading out), and ``state.pt`` is loaded with ``torch.load(weights_only=True)``, whose
unpickler accepts tensors and plain containers only.

A stop (Ctrl-C, a batch scheduler's SIGTERM) that arrives while a checkpoint is written waits
for the write to finish (``stopping.stops_held``): it takes seconds even for the largest model,
while a stop that threw it away cost the run up to ``checkpoint.every`` steps (the rerun
resumed from the checkpoint before).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from peaknet_xtal.atomic import write_text_atomic
from peaknet_xtal.errors import FormatError

KEEP = 2
_STEP_NAME = re.compile(r"step_\d{6,}")


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


def checkpoint_step(checkpoint: Path | None) -> int:
    """The step of a ``step_NNNNNN`` checkpoint folder; 0 for none (a fresh start)."""
    return 0 if checkpoint is None else int(checkpoint.name.split("_")[1])


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    root = Path(directory)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(pointer, f"cannot read the checkpoint pointer ({exc})") from exc
    if not _STEP_NAME.fullmatch(name):
        raise FormatError(pointer, f"must name a step_NNNNNN folder beside it, not {name[:80]!r}; "
                                   "delete it to start afresh")
    path = root / name
    for needed in ("state.pt", "model.safetensors"):
        _inside(root, path / needed, pointer)
    return path


def _inside(root: Path, path: Path, pointer: Path) -> Path:
    """``path`` as a regular file inside ``root`` after resolving symlinks, else a FormatError:
    a checkpoint must not read files from elsewhere."""
    real, base = path.resolve(), root.resolve()
    if not real.is_relative_to(base):
        raise FormatError(path, f"leads outside the checkpoint folder {base} (to {real}); "
                                "refusing to resume from it")
    if not real.is_file():
        raise FormatError(pointer, f"points at {path.parent.name}, which is not a complete "
                                   f"checkpoint (no {path.name})")
    return real


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The training state (optimiser, scheduler, RNG, step), read without running code."""
    import torch

    path = _inside(checkpoint.parent, checkpoint / "state.pt", checkpoint / "state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals; anything for garbage
        raise FormatError(path, "cannot read training state (only tensors and plain values are "
                                f"accepted): {str(exc).splitlines()[0][:300]}") from exc
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step"} <= set(state):
        raise FormatError(path, "not a training state (needs optimizer, scheduler, rng, step)")
    return state


def load_weights(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's model weights as a state dict (full, unsharded)."""
    from safetensors.torch import load_file

    path = _inside(checkpoint.parent, checkpoint / "model.safetensors",
                   checkpoint / "model.safetensors")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise FormatError(path, f"cannot read checkpoint weights: {exc}") from exc
