"""Model zoo: families (builders) and named sizes (configs), looked up by name.

A size is a plain dict of builder keyword arguments; ``create_model(name, **overrides)`` merges the
overrides into it, so every model can be rebuilt from ``model.config`` alone (that dict is what is
saved beside the weights).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

_FAMILIES: dict[str, Callable[..., Any]] = {}
_SIZES: dict[str, dict[str, Any]] = {}


def register_family(family: str, builder: Callable[..., Any]) -> None:
    """Register ``builder(**config)`` under ``family`` (one family per module in this package)."""
    _FAMILIES[family] = builder


def register_model(name: str, family: str, **config: Any) -> None:
    """Register a named size of ``family``; names are unique across families."""
    if name in _SIZES:
        raise ValueError(f"model {name!r} is registered twice")
    _SIZES[name] = {"family": family, **config}


def _ensure_loaded() -> None:
    from peaknet_xtal.model import peaknet  # noqa: F401  (registers its family and sizes on import)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (optionally of one family), in registration order."""
    _ensure_loaded()
    return [n for n, c in _SIZES.items() if family is None or c["family"] == family]


def known_families() -> list[str]:
    """Registered model family names."""
    _ensure_loaded()
    return sorted(_FAMILIES)


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full config of a registered size with ``overrides`` applied."""
    _ensure_loaded()
    if name not in _SIZES:
        raise KeyError(f"no model {name!r}; registered: {list(_SIZES)}")
    config = copy.deepcopy(_SIZES[name])
    config.update(overrides)
    config["name"] = name
    return config


def build_from_config(config: dict[str, Any]) -> Any:
    """Rebuild a model from its ``config`` dict (as saved beside the weights)."""
    _ensure_loaded()
    config = dict(config)
    family = config.pop("family", None)
    if family not in _FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family](**config)


def create_model(name: str, **overrides: Any) -> Any:
    """A freshly initialised model of the registered size ``name`` (training mode)."""
    return build_from_config(model_config(name, **overrides))
