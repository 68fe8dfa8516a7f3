"""Saving and loading models: safetensors weights plus a JSON config that rebuilds the network.

The config is written twice, as ``<stem>.json`` beside the weights (readable, diffable) and inside
the safetensors metadata (so a lone weights file still loads).  Writes are atomic.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
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


def _safetensors_metadata(weights: Path) -> dict[str, str]:
    """The header metadata of a safetensors file; anything else (random bytes, a truncated file,
    a pickle under a .safetensors name) is a FormatError. safetensors parses only its own
    length-prefixed JSON header, so nothing in the file can run code."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise FormatError(weights, f"not a readable safetensors file ({exc}); give a model "
                                   "written by peaknet-train or save_model") from exc


def _config_dict(text: str, path: Path, where: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(path, f"{where} is not valid JSON: {exc.msg}",
                          line=exc.lineno if where == "model config" else None) from exc
    if not isinstance(config, dict):
        raise FormatError(path, f"{where} must be a JSON object, not a {type(config).__name__}")
    family = config.get("family")
    if not isinstance(family, str):
        raise FormatError(path, f"{where} has no model 'family' string")
    return config


def read_config(weights: Path) -> dict[str, Any]:
    """The model config beside ``weights`` (JSON), else from the safetensors metadata."""
    beside = weights.with_suffix(".json")
    if beside.exists():
        try:
            text = beside.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(beside, f"cannot read the model config ({exc})") from exc
        return _config_dict(text, beside, "model config")
    meta = _safetensors_metadata(weights)
    if "config" not in meta:
        raise FormatError(weights, "no model config: neither a .json beside it nor 'config' in "
                                   "the safetensors metadata")
    return _config_dict(meta["config"], weights, "the safetensors metadata 'config'")


#: What a model setting takes, said where one is not found.
MODEL_FORMS = (f"give a .safetensors weights file, a folder holding one, or {DEFAULT_NAME!r} "
               "for the shipped model")


def _existing(spec: str | os.PathLike[str]) -> Path:
    """The weights file ``spec`` names, which exists; otherwise a FormatError saying what a
    model setting takes.  A registered model or family name (``mytiny``, ``student-atto-b2``)
    is said to be an architecture without weights: it is what a user who read the model list
    types, and "not found" sent them looking for a file."""
    weights = _resolve(spec)
    if weights.exists():
        return weights
    from peaknet_xtal.model.zoo import known_families, list_models, model_config

    name = os.fspath(spec)
    family = (model_config(name)["family"] if name in list_models()
              else name if name in known_families() else None)
    if family is not None:
        what = "model family" if family == name else f"model architecture (family {family!r})"
        raise FormatError(name, f"is a {what} without trained weights: none are shipped for "
                                "it (train one with peaknet-train, whose run folder then holds "
                                f"them); {MODEL_FORMS}")
    raise FormatError(weights, f"model weights not found ({MODEL_FORMS})")


def check_model(spec: str | os.PathLike[str]) -> Path | None:
    """Validate a model without reading its weights: the path exists, is a safetensors file and
    carries a config of a known family (else the plugins that failed to load are named: one may
    have provided it), and a plugin family's network, built from that config, keeps the hook
    contract (``model.zoo.check_contract``: a config, an output of its input's size).  Hosts (the
    engine, so ``PeakFinder`` and every finding command; the DIALS plugin; peaknet2cxi before it
    opens an input; training) call this at start-up so that a bad ``model=`` fails at once, in
    the main process, before any input is opened or output written, with the file named.
    Returns the weights path (None for the shipped default).

    The plugin's network is built on the CPU, as :func:`load_model` builds it (so that a model
    that loads passes), randomly initialised with torch's random numbers left as they were, and
    dropped; the built-in family is tested with this package and not built here.  Why: a plugin
    model that downsamples, given as a weights file, was refused only when the engine first
    loaded it, after peaknet2cxi had opened the inputs and written to the output folder."""
    if str(spec) == DEFAULT_NAME:
        return None
    weights, config = _weights_file(spec)
    from peaknet_xtal.model.zoo import contract_checked

    if contract_checked(config["family"]):
        import torch

        with torch.random.fork_rng(devices=[]):
            build_model(config, weights)
    return weights


def checked_weights(spec: str | os.PathLike[str]) -> Path:
    """The weights file a model spec names, checked by :func:`check_model`: the shipped
    default's for ``default``."""
    return check_model(spec) or _default_weights()


def _default_weights() -> Path:
    """The shipped default model's weights (looked up at each call: tests move the folder)."""
    return WEIGHTS_DIR / f"{DEFAULT_NAME}.safetensors"


def _weights_file(spec: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The weights file ``spec`` names and its config, checked as :func:`check_model` says
    (all but the network)."""
    weights = _existing(spec)
    if not weights.is_file():
        raise FormatError(weights, "model weights path is not a file")
    _safetensors_metadata(weights)
    config = read_config(weights)
    from peaknet_xtal.model.zoo import missing_family

    problem = missing_family(config["family"])
    if problem is not None:
        raise FormatError(weights, problem)
    return weights, config


def build_model(config: Mapping[str, Any], weights: Path) -> Any:
    """The network ``config`` (read from ``weights``) describes, freshly initialised (on
    torch's default device: a caller checking shapes alone builds it on ``meta``).  What is
    wrong names ``weights``: a plugin's model that breaks the hook contract is the zoo's
    PluginError (the plugin's fault, named as the zoo names it), a setting ``build`` refuses a
    FormatError of the config."""
    from peaknet_xtal.model.zoo import build_from_config
    from peaknet_xtal.registry import PluginError

    try:
        return build_from_config({k: v for k, v in config.items() if k != "extra"})
    except PluginError as exc:
        raise PluginError(f"{weights}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(weights, f"model config cannot build a model: {exc}") from exc


def model_digest(spec: Any) -> str | None:
    """SHA-256 of the weights a model spec names (the shipped file for ``default``), so that a
    record of how peaks were found tells a retrained model at the same path from the one
    used; None for a model handed over as a Python object (no file to name)."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    weights = _default_weights() if str(spec) == DEFAULT_NAME else _existing(spec)
    digest = hashlib.sha256()
    try:
        with open(weights, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise FormatError(weights, f"cannot read the model weights: {exc.strerror or exc}") \
            from exc
    return digest.hexdigest()


def tensor_shapes(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, of a state dict (or anything with ``.shape`` values)."""
    return {name: tuple(t.shape) for name, t in tensors.items()}


def check_fit(model: Mapping[str, tuple[int, ...]], weights: Mapping[str, tuple[int, ...]],
              path: str | os.PathLike[str], what: str) -> None:
    """Weights (tensor name -> shape) that do not fit a model's are a FormatError naming
    ``path``, saying ``what`` and the first misfit in one line: torch's own error lists every
    tensor, a multi-line paragraph each (175 lines for another architecture)."""
    problems = [f"no {name}" for name in model if name not in weights]
    problems += [f"{name} is not in it" for name in weights if name not in model]
    problems += [f"{name} is {list(weights[name])}, not {list(shape)}"
                 for name, shape in model.items() if name in weights and weights[name] != shape]
    if problems:
        more = f", and {len(problems) - 1} more misfits" if len(problems) > 1 else ""
        raise FormatError(path, f"{what} ({problems[0]}{more})")


def check_kinds(model: Mapping[str, Any], state: Mapping[str, Any],
                path: str | os.PathLike[str]) -> None:
    """Weights (tensor name -> torch tensor) stored as another kind of number than the model's
    (integers or booleans for its floating-point weights, or the reverse) are a FormatError
    naming ``path`` and the first such tensor.  Why: loading casts them silently, and weights
    rounded to whole numbers gave other peaks with exit 0.  Floating-point widths may differ
    (weights saved in half precision load as they are)."""
    bad = [f"{name} is {state[name].dtype}, the model's {tensor.dtype}"
           for name, tensor in model.items()
           if name in state and state[name].is_floating_point() != tensor.is_floating_point()]
    if bad:
        more = f", and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise FormatError(path, f"weights of another number type ({bad[0]}{more})")


def check_finite(state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Weights (tensor name -> torch tensor) holding NaN or infinity are a FormatError naming
    ``path`` and the first such tensor.  Why: a training run that diverged writes them, and a
    network with them scores every pixel NaN, which no threshold passes: every frame then had
    0 peaks and the run ended as a success."""
    import torch

    bad = [name for name, tensor in state.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        more = f", and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise FormatError(path, f"weights hold NaN or infinite values ({bad[0]}{more}): written "
                                "by a training run that diverged? Use an earlier checkpoint or "
                                "other weights")


def load_model(spec: str | os.PathLike[str] = DEFAULT_NAME, device: str = "cpu") -> Any:
    """A model in eval mode from ``"default"``, a ``.safetensors`` file or a model directory.

    ``"default"`` is the small trained model shipped in ``model/weights``; when those weights are
    missing (a broken install or checkout) this is an error, never a silently random model whose
    "peaks" would look like results.  A plugin's model that breaks the hook contract is the
    zoo's PluginError naming the plugin (``model.zoo.build_from_config``), not a config error.
    """
    from safetensors.torch import load_file

    if str(spec) == DEFAULT_NAME:
        weights = _default_weights()
        if not weights.exists():
            raise FormatError(weights, "the shipped default model weights are missing; reinstall "
                                       "peaknet-xtal or rebuild them with "
                                       "examples/train_default_model.py, or pass a weights path")
        config = read_config(weights)
    else:
        weights, config = _weights_file(spec)
    model = build_model(config, weights)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FormatError(weights, f"not a readable safetensors file: {exc}") from exc
    check_fit(tensor_shapes(model.state_dict()), tensor_shapes(state), weights,
              "weights do not fit the config")
    check_kinds(model.state_dict(), state, weights)
    check_finite(state, weights)
    model.load_state_dict(state)
    return model.to(device).eval()
