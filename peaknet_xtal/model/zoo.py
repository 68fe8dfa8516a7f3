"""Model zoo: families (builders) and named sizes (configs), looked up by name.

A size is a plain dict of builder keyword arguments; ``create_model(name, **overrides)`` merges the
overrides into it, so every model can be rebuilt from ``model.config`` alone (that dict is what is
saved beside the weights).

Families come from the plugin registry (:func:`peaknet_xtal.hookspecs.peaknet_model_families`),
built-ins first, so a plugin's architecture is created, listed, trained and loaded by name like
PeakNet.  The built-in family is declared where it is defined, with :func:`register_family` and
:func:`register_model` at the bottom of ``model/peaknet.py``, and handed to the registry by the
built-in plugin (``peaknet_xtal.builtin.models``) through that same hook.

A plugin's family is checked against the hook contract where its models are made
(:func:`build_from_config`, so ``create_model``, ``load_model``, peaknet-train's start check, and
``weights_io.check_model``, which every host calls on a weights file before any work):
``build`` takes ``name``, the model carries a JSON ``config`` of its family, and its output has
its input's size on sides that are odd multiples of its ``pad_multiple`` (1 unless it says: the
finding engine pads panels of any size to multiples of it).  Why: each of these broke late,
as a traceback far from the plugin (the first checkpoint, a user's ``model.overrides``, or the
finding engine on the first panel of an odd size), or not at all (a larger output was cropped).
"""
from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Families declared in this process with :func:`register_family` (the built-in plugin hands them
#: to the registry); look families up with :func:`known_families`, which sees plugins too.
_FAMILIES: dict[str, Callable[..., Any]] = {}
#: Sizes declared with :func:`register_model` (``{"family": ..., **config}`` per model name).
_SIZES: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class ModelFamily:
    """What ``peaknet_model_families`` returns (see hookspecs); plugins may reuse this class."""

    name: str
    description: str
    build: Callable[..., Any]
    sizes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def register_family(family: str, builder: Callable[..., Any]) -> None:
    """Declare ``builder(**config)`` as ``family`` in this process (one family per module of this
    package, at import).  The declared families reach the zoo through the built-in plugin's
    ``peaknet_model_families``; a plugin package implements that hook itself instead."""
    _FAMILIES[family] = builder


def register_model(name: str, family: str, **config: Any) -> None:
    """Declare a named size of the declared ``family``; names are unique across families (a
    clash names both families and the modules that declared them: raised inside the built-in
    plugin's hook when a plugin module declared the name first, where it would blame the
    built-in)."""
    if name in _SIZES:
        first = _SIZES[name]["family"]
        raise ValueError(f"model {name!r} is registered twice: for family {first!r} "
                         f"({_declarer(first)}) and for family {family!r} ({_declarer(family)})")
    _SIZES[name] = {"family": family, **config}


def _declarer(family: str) -> str:
    """The module that declared ``family`` with :func:`register_family`."""
    builder = _FAMILIES.get(family)
    return f"declared in {builder.__module__}" if builder is not None else "not declared"


def declared_families() -> tuple[ModelFamily, ...]:
    """The families declared with :func:`register_family` and :func:`register_model`, as the
    hook returns them (what the built-in plugin registers): this package's own first, whatever
    the order of imports, then any a plugin module declared on import."""
    ours = sorted(_FAMILIES, key=lambda f: not _FAMILIES[f].__module__.startswith("peaknet_xtal."))
    return tuple(
        ModelFamily(family, (_FAMILIES[family].__doc__ or family).strip().splitlines()[0],
                    _FAMILIES[family],
                    {name: {k: v for k, v in config.items() if k != "family"}
                     for name, config in _SIZES.items() if config["family"] == family})
        for family in ours)


def _families() -> dict[str, Any]:
    from peaknet_xtal.registry import model_families

    return model_families()


def _sizes() -> dict[str, dict[str, Any]]:
    """Every registered size as ``{"family": ..., **config}``, built-ins first; one model name
    in two families is a PluginError naming both plugins."""
    from peaknet_xtal.registry import PluginError, registered

    sizes: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    for family, entry in registered("peaknet_model_families").items():
        for name, config in entry.item.sizes.items():
            if name in sizes:
                raise PluginError(f"two models are registered as {name!r}: in family "
                                  f"{sizes[name]['family']!r} ({owner[name]}) and in family "
                                  f"{family!r} ({_origin(entry)})")
            sizes[name] = {**config, "family": family}
            owner[name] = _origin(entry)
    return sizes


def _ours(entry: Any) -> bool:
    """Whether a registered family is this package's own (tested with it, so not checked)."""
    return str(getattr(entry.item.build, "__module__", "")).startswith("peaknet_xtal.")


def contract_checked(family: Any) -> bool:
    """Whether models of ``family`` are checked against the hook contract where they are made
    (:func:`build_from_config`): a plugin's family; this package's own is tested with it, and
    an unknown one cannot be built."""
    from peaknet_xtal.registry import registered

    entry = registered("peaknet_model_families").get(family)
    return entry is not None and not _ours(entry)


def _origin(entry: Any) -> str:
    """How messages name where a registered family comes from: its plugin's entry point and
    distribution; for a family a plugin module declared with :func:`register_family` (which
    reaches the registry through the built-in plugin), that module."""
    from peaknet_xtal.registry import BUILTINS, describe_plugin

    if entry.plugin in BUILTINS and not _ours(entry):
        return f"declared in {entry.item.build.__module__}"
    return describe_plugin(entry.plugin)


def catalogue() -> list[dict[str, Any]]:
    """Every registered family, built-ins first: its name, description, origin (its plugin,
    with entry point and distribution, or the built-in module) and model names (what
    ``peaknet-show --models`` lists)."""
    from peaknet_xtal.registry import registered

    _sizes()  # one model name in two families is an error here too
    return [{"family": family, "description": entry.item.description,
             "origin": _origin(entry), "models": list(entry.item.sizes)}
            for family, entry in registered("peaknet_model_families").items()]


def _not_loaded() -> str:
    """The plugins that failed to load: where a model a user asks for may have come from."""
    from peaknet_xtal.registry import skipped_note

    return skipped_note()


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (optionally of one family), built-ins first, then plugins'."""
    return [n for n, c in _sizes().items() if family is None or c["family"] == family]


def known_families() -> list[str]:
    """Registered model family names (plugins' included)."""
    return sorted(_families())


def missing_family(family: Any) -> str | None:
    """Why models of ``family`` cannot be built here (no such family is registered: the known
    ones, and the plugins that failed to load, one of which may have been its), None when they
    can."""
    families = _families()
    if family in families:
        return None
    return f"unknown model family {family!r}; known: {sorted(families)}{_not_loaded()}"


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full config of a registered size with ``overrides`` applied."""
    sizes = _sizes()
    if name not in sizes:
        raise KeyError(f"no model {name!r}; registered: {list(sizes)}{_not_loaded()}")
    config = copy.deepcopy(sizes[name])
    config.update(overrides)
    config["name"] = name
    return config


def build_from_config(config: dict[str, Any]) -> Any:
    """Rebuild a model from its ``config`` dict (as saved beside the weights).  A plugin's model
    that breaks the hook contract is a PluginError naming its family and plugin (module
    docstring); an unknown family or a setting ``build`` refuses is a KeyError, TypeError or
    ValueError of the caller's config."""
    from peaknet_xtal.registry import registered

    entries = registered("peaknet_model_families")
    config = dict(config)
    family = config.pop("family", None)
    if family not in entries:
        raise KeyError(missing_family(family))
    entry = entries[family]
    if _ours(entry):
        return entry.item.build(**config)
    name = config.get("name")
    who = (f"model family {family!r} ({_origin(entry)})"
           + (f", model {name!r}" if name is not None else ""))
    if name is not None and not _takes_name(entry.item.build):
        raise _breach(who, f"{_callable_name(entry.item.build)} takes no 'name' argument",
                      "build(**config) must accept name= (and may ignore it)")
    model = entry.item.build(**config)
    check_contract(model, family, who)
    return model


def _takes_name(build: Callable[..., Any]) -> bool:
    """Whether ``build(name=...)`` is accepted (True where the signature cannot be read)."""
    try:
        parameters = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or (p.name == "name" and p.kind is not p.POSITIONAL_ONLY)
               for p in parameters)


def _callable_name(build: Callable[..., Any]) -> str:
    return f"{getattr(build, '__qualname__', type(build).__name__)}()"


def _breach(who: str, problem: str, asks: str) -> Exception:
    from peaknet_xtal.registry import PluginError

    return PluginError(f"{who}: {problem}; {asks} (see the hookspec peaknet_model_families)")


#: Input sides are at least this in the contract check's probe (a padding layer may need a few
#: pixels); the probe's sides are odd multiples of the model's ``pad_multiple`` above it.
PROBE_SIDE = 33


def probe_shape(multiple: int) -> tuple[int, int]:
    """The probe's (height, width): the smallest odd multiple of ``multiple`` from
    :data:`PROBE_SIDE` and the next one (33 x 35 for a model without ``pad_multiple``, 96 x 160
    for 32): a network that downsamples more than its ``pad_multiple`` says returns another
    size there, and height and width differ, so that a transposed output shows too."""
    k = -(-PROBE_SIDE // multiple)
    k += 1 - k % 2
    return multiple * k, multiple * (k + 2)


def check_contract(model: Any, family: str, who: str) -> None:
    """``model`` (built by ``family``'s ``build``) against the hook contract the code relies
    on, a PluginError naming ``who`` otherwise: a ``torch.nn.Module``; ``config`` a
    JSON-serialisable dict with ``family`` (what ``save_model`` stores and ``load_model``
    rebuilds from); ``pad_multiple``, if set, a positive int; ``normalise`` where ``config``
    says ``input_norm: local``; and ``model(image, mask)`` (and ``peak_logit`` where there is
    one) returning an output of the input's height and width, on a probe of
    :func:`probe_shape` (one forward pass in eval mode, a few milliseconds; free on torch's
    ``meta`` device)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise _breach(who, f"build returned a {type(model).__name__}",
                      "build must return a torch.nn.Module")
    config = getattr(model, "config", None)
    asks = ("the model must carry config: a JSON-serialisable dict with the family's name under "
            "'family', which save_model stores and load_model rebuilds the model from")
    if not isinstance(config, Mapping):
        has = "no config" if config is None else f"a config of {type(config).__name__}"
        raise _breach(who, f"the model has {has}", asks)
    if config.get("family") != family:
        raise _breach(who, f"its config's family is {config.get('family')!r}", asks)
    try:
        json.dumps(dict(config), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise _breach(who, f"its config is not JSON-serialisable ({exc})", asks) from None
    multiple = getattr(model, "pad_multiple", 1)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise _breach(who, f"pad_multiple is {multiple!r}", "pad_multiple, where set, is a "
                      "positive int")
    if config.get("input_norm") == "local" and not callable(getattr(model, "normalise", None)):
        raise _breach(who, "its config says input_norm 'local' but it has no normalise()",
                      "a model normalised per panel has normalise(image, valid)")
    problem = _probe(model, probe_shape(multiple))
    if problem is not None:
        raise _breach(who, problem, "model(image, mask) takes (B, 1, H, W) images and returns "
                      "(B, 2, H, W) logits (peak_logit: (B, 1, H, W)) of the same H and W; a "
                      "network that downsamples sets pad_multiple (the finding engine pads "
                      "input sides to a multiple of it) or pads and crops inside forward")


def _probe(model: Any, shape: tuple[int, int]) -> str | None:
    """What is wrong with ``model``'s outputs for one ``(1, 1, *shape)`` image and mask on its
    own device (None: nothing).  Eval mode (batch-norm statistics untouched), no autograd, no
    random numbers drawn (a training run's seed sequence is unchanged)."""
    import torch

    first = next(iter([*model.parameters(), *model.buffers()]), None)
    device = first.device if first is not None else None
    height, width = shape
    image = torch.linspace(0.0, 1.0, height * width, device=device).reshape(1, 1, height, width)
    mask = torch.ones_like(image, dtype=torch.bool)
    # what each returns: logits of two classes or more; peak_logit one channel
    calls = [("model", model, range(2, 1 << 16))]
    if callable(getattr(model, "peak_logit", None)):
        calls.append(("model.peak_logit", model.peak_logit, range(1, 2)))
    training = model.training
    model.eval()
    try:
        for what, call, channels in calls:
            asked = f"{what}(image (1, 1, {height}, {width}), mask)"
            try:
                with torch.no_grad():
                    out = call(image, mask)
            except Exception as exc:  # noqa: BLE001  (a plugin's fault, named as such)
                return f"{asked} raised {type(exc).__name__}: {exc}"
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            if not (isinstance(got, tuple) and len(got) == 4 and got[0] == 1
                    and got[1] in channels and got[2:] == shape):
                return f"{asked} returned {got}"
    finally:
        model.train(training)
    return None


def crop_problem(model: Any, crop: int) -> str | None:
    """Why ``model`` cannot be trained on ``crop`` x ``crop`` squares, which training feeds it
    as they are (unpadded), naming the multiple its input sides need and the nearest crops that
    are multiples of it; None where it can.  A side that is a multiple of its ``pad_multiple``
    is what the contract promises; on another, a plugin's model is probed (:func:`_probe`: one
    forward pass, free on torch's ``meta`` device, where peaknet-train's start check builds the
    model), since one that pads inside ``forward`` takes any.  The built-in family does so
    (PeakNet: 76-px crops train) and is not probed: on ``meta`` its boolean-mask indexing has
    no size.  Why: a crop the model does not take failed in the first training step, after the
    data were loaded, as a torch shape error."""
    multiple = getattr(model, "pad_multiple", 1)
    if crop % multiple == 0 or not contract_checked(getattr(model, "config", {}).get("family")):
        return None
    problem = _probe(model, (crop, crop))
    if problem is None:
        return None
    below = crop // multiple * multiple
    nearest = " or ".join(str(side) for side in (below, below + multiple) if side > 0)
    return (f"its input sides must be multiples of {multiple} (its pad_multiple; {problem}): "
            f"use {nearest}")


def create_model(name: str, **overrides: Any) -> Any:
    """A freshly initialised model of the registered size ``name`` (training mode)."""
    return build_from_config(model_config(name, **overrides))
