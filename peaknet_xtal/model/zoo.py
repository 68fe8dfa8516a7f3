"""Model zoo: families (builders) and named sizes (configs), looked up by name.

A size is a plain dict of builder keyword arguments; ``create_model(name, **overrides)`` merges the
overrides into it, so every model can be rebuilt from ``model.config`` alone (that dict is what is
saved beside the weights).

Families come from the plugin registry (:func:`peaknet_xtal.hookspecs.peaknet_model_families`),
built-ins first, so a plugin's architecture is created, listed, trained and loaded by name like
PeakNet.  The built-in family is declared where it is defined, with :func:`register_family` and
:func:`register_model` at the bottom of ``model/peaknet.py``, and handed to the registry by the
built-in plugin (``peaknet_xtal.builtin.models``) through that same hook.
"""
from __future__ import annotations

import copy
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
    """Declare a named size of the declared ``family``; names are unique across families."""
    if name in _SIZES:
        raise ValueError(f"model {name!r} is registered twice")
    _SIZES[name] = {"family": family, **config}


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
                                  f"{family!r} ({_plugin(entry.plugin)})")
            sizes[name] = {**config, "family": family}
            owner[name] = _plugin(entry.plugin)
    return sizes


def _plugin(name: str) -> str:
    from peaknet_xtal.registry import describe_plugin

    return describe_plugin(name)


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
    """Rebuild a model from its ``config`` dict (as saved beside the weights)."""
    families = _families()
    config = dict(config)
    family = config.pop("family", None)
    if family not in families:
        raise KeyError(f"unknown model family {family!r}; known: {sorted(families)}"
                       f"{_not_loaded()}")
    return families[family].build(**config)


def create_model(name: str, **overrides: Any) -> Any:
    """A freshly initialised model of the registered size ``name`` (training mode)."""
    return build_from_config(model_config(name, **overrides))
