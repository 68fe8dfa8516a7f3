"""The plugin manager: built-in and third-party sources, writers and model families, looked up by
name.

Plugins are third-party code running inside every command, so the registry contains and names
their faults (the rules are part of the hook contract, see :mod:`peaknet_xtal.hookspecs`): a
plugin that fails to load is skipped with a warning naming it, a hook that returns the wrong thing
or a name registered twice is a :class:`PluginError` naming the plugin(s), and a ``sniff`` that
raises means "not mine".  Items are listed built-ins first, then plugins in load order (pluggy
itself calls the last registered first, which would let any plugin shadow a built-in's ``sniff``).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import pluggy

from peaknet_xtal import hookspecs
from peaknet_xtal.errors import FormatError, PeakNetError
from peaknet_xtal.types import Frame

log = logging.getLogger(__name__)

#: The built-in plugins, by the names they are registered under (and in this order).
BUILTINS = ("builtin-sources", "builtin-writers", "builtin-models")


class PluginError(PeakNetError, ValueError):
    """A plugin broke the hook contract: a hook raised or returned something else than the
    hookspecs say, or two plugins registered one name.  The message names the plugin(s)."""


class Registered(NamedTuple):
    """One registered item and a description of the plugin that registered it (for messages)."""

    item: Any
    plugin: str


#: Per plugin name: how to name it in messages (entry point and distribution).
_ORIGINS: dict[str, str] = {}
#: Plugins that failed to load (one line each: which, and why), for the errors that need them.
_SKIPPED: list[str] = []
#: Plugins whose ``sniff`` raised already (warned once each).
_SNIFF_WARNED: set[str] = set()


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """Built-ins first, then every ``peaknet_xtal`` entry point (unless PEAKNET_NO_PLUGINS=1).

    An entry point that cannot be loaded (its import fails, or pluggy rejects its hooks) is
    skipped with a warning naming it: a broken third-party plugin must not take down the work
    that needs only the built-ins.
    """
    from peaknet_xtal.builtin import models as builtin_models
    from peaknet_xtal.builtin import sources as builtin_sources
    from peaknet_xtal.builtin import writers as builtin_writers

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    _SKIPPED.clear()
    for name, module in zip(BUILTINS, (builtin_sources, builtin_writers, builtin_models),
                            strict=True):
        pm.register(module, name=name)
        _ORIGINS[name] = f"built-in {module.__name__}"
    if os.environ.get("PEAKNET_NO_PLUGINS") != "1":
        _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """pluggy's ``load_setuptools_entrypoints``, one plugin at a time: that stops at the first
    plugin that fails to import, with its traceback, whatever the input."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=hookspecs.PROJECT):
        if pm.get_plugin(entry.name) is not None or pm.is_blocked(entry.name):
            continue  # the same plugin seen twice on the path: the first one wins, as in pluggy
        dist = getattr(entry, "dist", None)
        where = f"plugin {entry.name!r} (entry point {entry.name} = {entry.value}"
        if dist is not None:
            where += f" of {dist.metadata['Name']} {dist.version}"
        where += ")"
        try:
            pm.register(entry.load(), name=entry.name)
        except Exception as exc:  # noqa: BLE001  (anything a third-party import may raise)
            if pm.has_plugin(entry.name):
                pm.unregister(name=entry.name)
            reason = f"{type(exc).__name__}: {exc}"
            _SKIPPED.append(f"{where} failed to load ({reason})")
            log.warning("%s failed to load and is skipped: %s.  Set PEAKNET_NO_PLUGINS=1 to "
                        "load no plugins", where, reason)
            continue
        _ORIGINS[entry.name] = where


def describe_plugin(name: str) -> str:
    """How messages name the plugin registered as ``name``: its entry point and distribution
    (or the built-in module)."""
    return _ORIGINS.get(name, f"plugin {name!r}")


def skipped_plugins() -> list[str]:
    """One line per plugin that failed to load and was skipped (why, and which entry point)."""
    plugin_manager()
    return list(_SKIPPED)


def skipped_note() -> str:
    """What an error about a missing name adds: the plugins that might have provided it."""
    skipped = skipped_plugins()
    return f"; not loaded: {'; '.join(skipped)}" if skipped else ""


#: Per hook: what it returns (plural, for messages) and the attributes each item needs,
#: as (name, check, what the check asks for).
_Check = tuple[str, Callable[[Any], bool], str]
_CONTRACTS: dict[str, tuple[str, tuple[_Check, ...]]] = {
    "peaknet_source_types": ("source types", (
        ("name", lambda v: isinstance(v, str) and bool(v), "name: str"),
        ("description", lambda v: isinstance(v, str), "description: str"),
        ("sniff", callable, "sniff(path)"),
        ("open", callable, "open(path, **options)"))),
    "peaknet_writer_types": ("writer types", (
        ("name", lambda v: isinstance(v, str) and bool(v), "name: str"),
        ("description", lambda v: isinstance(v, str), "description: str"),
        ("suffix", lambda v: isinstance(v, str), "suffix: str"),
        ("open", callable, "open(path, **options)"))),
    "peaknet_model_families": ("model families", (
        ("name", lambda v: isinstance(v, str) and bool(v), "name: str"),
        ("description", lambda v: isinstance(v, str), "description: str"),
        ("build", callable, "build(**config)"),
        ("sizes", lambda v: isinstance(v, Mapping) and all(
            isinstance(k, str) and isinstance(c, Mapping) for k, c in v.items()),
         "sizes: a mapping of model name to build keyword arguments"))),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _checked(hook: str, result: Any, plugin: str) -> list[Any]:
    """The items of one plugin's ``hook`` result, or a PluginError naming the plugin and what
    the hook must return (a str would otherwise be iterated letter by letter)."""
    kinds, checks = _CONTRACTS[hook]
    asks = ", ".join(what for _, _, what in checks)
    must = f"{hook} must return a list of {kinds} (objects with {asks})"
    if isinstance(result, (str, bytes)) or not isinstance(result, (list, tuple)):
        raise PluginError(f"{describe_plugin(plugin)}: {must}, not {type(result).__name__} "
                          f"{_short(result)}")
    for i, item in enumerate(result):
        wrong = [what for attr, ok, what in checks
                 if not ok(getattr(item, attr, None))]
        if wrong:
            raise PluginError(f"{describe_plugin(plugin)}: {must}; item {i} ({_short(item)}) "
                              f"lacks or has a wrong {', '.join(wrong)}")
    return list(result)


def _collect(hook: str) -> list[Registered]:
    """Every item the implementations of ``hook`` return, with the plugin that gave it:
    built-ins first, then plugins in the order they were loaded."""
    pm = plugin_manager()
    impls = [impl for impl in getattr(pm.hook, hook).get_hookimpls()
             if not (impl.hookwrapper or impl.wrapper)]
    rank = {name: i for i, name in enumerate(BUILTINS)}
    impls.sort(key=lambda impl: rank.get(impl.plugin_name, len(BUILTINS)))  # stable: load order
    found: list[Registered] = []
    for impl in impls:
        try:
            result = impl.function()
        except Exception as exc:  # noqa: BLE001  (a plugin's own fault, named as such)
            raise PluginError(f"{describe_plugin(impl.plugin_name)}: {hook} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        found += [Registered(item, impl.plugin_name)
                  for item in _checked(hook, result, impl.plugin_name)]
    return found


def registered(hook: str) -> dict[str, Registered]:
    """The items of ``hook`` (a hookspec name) by name, each with its plugin; one name
    registered twice is a PluginError naming both plugins."""
    kinds = _CONTRACTS[hook][0]
    table: dict[str, Registered] = {}
    for entry in _collect(hook):
        name = entry.item.name
        if name in table:
            first, second = table[name].plugin, entry.plugin
            raise PluginError(f"two {kinds} are registered as {name!r}: by "
                              f"{describe_plugin(first)} and by {describe_plugin(second)}")
        table[name] = entry
    return table


def _items(entries: Mapping[str, Registered]) -> dict[str, Any]:
    """The items of :func:`registered` entries, by name, without their plugins."""
    return {name: entry.item for name, entry in entries.items()}


def source_types() -> dict[str, Any]:
    """All registered source types by name, built-ins first."""
    return _items(registered("peaknet_source_types"))


def writer_types() -> dict[str, Any]:
    """All registered writer types by name, built-ins first."""
    return _items(registered("peaknet_writer_types"))


def model_families() -> dict[str, Any]:
    """All registered model families by name, built-ins first (``model.zoo`` looks models up
    through these)."""
    return _items(registered("peaknet_model_families"))


def _sniff(entry: Registered, path: str) -> bool:
    """``entry``'s ``sniff(path)``; one that raises is taken as "not mine", with a warning
    naming the plugin once (a broken sniff must not stop every input)."""
    try:
        return bool(entry.item.sniff(path))
    except Exception as exc:  # noqa: BLE001  (the contract says never raise; contain it)
        if entry.plugin not in _SNIFF_WARNED:
            _SNIFF_WARNED.add(entry.plugin)
            log.warning("%s: sniff of source type %r raised %s: %s; taken as 'cannot read "
                        "this input' (warned once)", describe_plugin(entry.plugin), entry.item.name,
                        type(exc).__name__, exc)
        return False


def sniff_source(path: str, exclude: Collection[str] = ()) -> str | None:
    """The name of the first source type (built-ins first) whose ``sniff`` accepts ``path``,
    leaving out the types named in ``exclude``; None when none does."""
    return _first_sniffing(registered("peaknet_source_types"), path, exclude)


def _first_sniffing(entries: Mapping[str, Registered], path: str,
                    exclude: Collection[str] = ()) -> str | None:
    """:func:`sniff_source` over source types already collected."""
    for name, entry in entries.items():
        if name not in exclude and _sniff(entry, path):
            return name
    return None


def open_source(path: str, kind: str | None = None, **options: Any) -> Any:
    """Open ``path`` with the named source type, or the first whose ``sniff`` accepts it."""
    entries = registered("peaknet_source_types")  # every hook called once, not per lookup
    types = _items(entries)
    if kind is not None:
        if kind not in types:
            raise KeyError(f"no source type {kind!r}; registered: {sorted(types)}"
                           f"{skipped_note()}")
        return types[kind].open(path, **options)
    found = _first_sniffing(entries, path)
    if found is not None:
        return types[found].open(path, **options)
    raise ValueError(f"{path}: no registered source can read this file ({sorted(types)})"
                     f"{skipped_note()}")


def open_writer(kind: str, path: str, **options: Any) -> Any:
    """Open a writer of the named type."""
    types = writer_types()
    if kind not in types:
        raise KeyError(f"no writer type {kind!r}; registered: {sorted(types)}{skipped_note()}")
    return types[kind].open(path, **options)


def frame_at(source: Any, event: str) -> Frame:
    """The frame of an open ``FrameSource`` whose key has ``event``.

    The source's own random access (``frame_at``) when it has one; otherwise its frames are read
    in order until the event comes up (correct for any source, slow for late events).
    """
    direct = getattr(source, "frame_at", None)
    if direct is not None:
        return direct(event)
    for frame in source:
        if frame.event == event:
            return frame
    raise FormatError(str(getattr(source, "path", source)), f"no frame with event {event!r}")
