"""The plugin manager: built-in and third-party sources, writers and model families, looked up by
name.

Plugins are third-party code running inside every command, so the registry contains and names
their faults (the rules are part of the hook contract, see :mod:`peaknet_xtal.hookspecs`): a
plugin that fails to load is skipped with a warning naming it, one with an unknown (misspelt)
hook or none is warned about, a hook that returns the wrong thing, a name registered twice, a
source that opens as no FrameSource or yields no Frames is a :class:`PluginError` naming the
plugin(s), and a ``sniff`` that raises means "not mine".  Items are listed built-ins first, then
plugins in load order (pluggy itself calls the last registered first, which would let any plugin
shadow a built-in's ``sniff``).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping
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
        _warn_unknown_hooks(pm, entry.name, where)


def _warn_unknown_hooks(pm: pluggy.PluginManager, name: str, where: str) -> None:
    """One warning for a plugin some of whose hook implementations name no hookspec (a
    misspelt ``peaknet_source_type``), or that implements no hook at all (an entry point aimed
    at the wrong module, functions without ``@hookimpl``).  pluggy registers both silently and
    never calls them (only its ``check_pending`` would say, and it raises at the first one):
    the plugin's sources or models then just never appeared.  Its valid hooks keep working."""
    import difflib

    plugin = pm.get_plugin(name)
    specs = sorted(n for n in vars(hookspecs) if n.startswith("peaknet_"))
    unknown, known = [], 0
    for caller in pm.get_hookcallers(plugin) or []:
        mine = [impl for impl in caller.get_hookimpls() if impl.plugin is plugin]
        if caller.has_spec():
            known += len(mine)
        elif any(not impl.optionalhook for impl in mine):
            close = difflib.get_close_matches(caller.name, specs, n=1)
            unknown.append(caller.name + (f" (did you mean {close[0]}?)" if close else ""))
    hooks = f"the hooks are {', '.join(specs)} (peaknet_xtal.hookspecs)"
    if unknown:
        log.warning("%s: unknown hook(s) %s, never called: %s", where, ", ".join(unknown), hooks)
    elif not known:
        plain = sorted(n for n in specs if callable(getattr(plugin, n, None)))
        why = (f"; {', '.join(plain)} lack(s) the @peaknet_xtal.hookspecs.hookimpl decorator"
               if plain else "")
        log.warning("%s implements no hook, so it provides nothing%s: %s", where, why, hooks)


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


def unclaimed(error: FormatError) -> FormatError:
    """``error``, about an input no loaded source reads, with the plugins that failed to load
    named in it where any did (one of them might have read it): only their load warning named
    them, and the error blamed the input alone.  ``error`` itself where every plugin loaded."""
    note = skipped_note()
    if not note:
        return error
    said = type(error)(error.path, error.message + note, line=error.line,
                       dataset=error.dataset)
    said.__cause__ = error.__cause__
    return said


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


def sniff_builtin_source(path: str) -> str | None:
    """:func:`sniff_source` among the built-in source types alone."""
    return _sniff_among(path, builtin=True)


def sniff_plugin_source(path: str) -> str | None:
    """:func:`sniff_source` among the source types of third-party plugins alone: what a
    command asks about an input no built-in reads (an HDF5 file without the built-in's
    datasets, a folder, a name that is not a file) before it says so.  The built-ins are
    asked first, so a plugin never takes an input one of them reads."""
    return _sniff_among(path, builtin=False)


def _sniff_among(path: str, builtin: bool) -> str | None:
    entries = registered("peaknet_source_types")
    return _first_sniffing({name: entry for name, entry in entries.items()
                            if (entry.plugin in BUILTINS) == builtin}, path)


def source_options() -> dict[str, tuple[str, ...]]:
    """Per source type, the options beyond ``geometry`` its ``open`` takes from a user
    (``SourceType.options``, optional: none where it declares none; ``--source-option
    KEY=VALUE`` passes these and refuses any other key: :mod:`peaknet_xtal.source_option`).
    A declaration that is not a sequence of names is a PluginError naming the plugin."""
    found: dict[str, tuple[str, ...]] = {}
    for name, entry in registered("peaknet_source_types").items():
        names = getattr(entry.item, "options", None) or ()
        if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)) or not all(
                isinstance(n, str) and n for n in names):
            raise PluginError(f"{describe_plugin(entry.plugin)}: source type {name!r}: options "
                              f"must be a sequence of option names, not {_short(names)}")
        found[name] = tuple(names)
    return found


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


def checked_source(source: Any, kind: str, path: str) -> Any:
    """``source``, opened by source type ``kind``, if it is a ``FrameSource`` (iterable, with
    ``close``); else a PluginError naming the plugin and what its ``open`` returned (``None``
    from an unfinished plugin ended in ``'NoneType' object has no attribute 'close'``)."""
    if callable(getattr(source, "__iter__", None)) and callable(getattr(source, "close", None)):
        return source
    entry = registered("peaknet_source_types").get(kind)
    who = describe_plugin(entry.plugin) if entry is not None else "a plugin"
    raise PluginError(f"{who}: source type {kind!r} opened {path} as {type(source).__name__} "
                      f"{_short(source)}, not a FrameSource (frames to iterate over, close(): "
                      "peaknet_xtal.hookspecs)")


def checked_frames(source: Any, path: str) -> Iterator[Frame]:
    """The frames of an open ``FrameSource``, each checked to be a :class:`Frame` where it
    enters: anything else (a plugin's source yielding bare arrays) is a PluginError naming the
    plugin, its source type and what it yielded.  Unchecked, it failed at the first attribute
    a consumer read (``'numpy.ndarray' object has no attribute 'event'``), naming neither."""
    for item in source:
        if not isinstance(item, Frame):
            raise PluginError(_not_a_frame(source, path, item))
        yield item


def _not_a_frame(source: Any, path: str, item: Any) -> str:
    """What :func:`checked_frames` says: who yielded what instead of a Frame, from which input."""
    kind = getattr(source, "name", None)
    entry = registered("peaknet_source_types").get(kind) if isinstance(kind, str) else None
    who = (f"{describe_plugin(entry.plugin)}: source type {kind!r}" if entry is not None else
           f"source {type(source).__module__}.{type(source).__qualname__}")
    shape = getattr(item, "shape", None)
    if shape is not None:  # an array: its type, shape and dtype, not its values
        what = f"{type(item).__module__}.{type(item).__name__} of shape {tuple(shape)}"
        what += f" {item.dtype}" if hasattr(item, "dtype") else ""
    else:
        what = f"{type(item).__name__} {_short(item)}"
    return (f"{who} yielded a {what} for {path}, not a peaknet_xtal.types.Frame (a frame "
            "source yields Frames: peaknet_xtal.hookspecs)")


def frame_at(source: Any, event: str) -> Frame:
    """The frame of an open ``FrameSource`` whose key has ``event``.

    The source's own random access (``frame_at``) when it has one; otherwise its frames are read
    in order until the event comes up (correct for any source, slow for late events).  Either
    way it must be a :class:`Frame` (:func:`checked_frames`).
    """
    path = str(getattr(source, "path", source))
    direct = getattr(source, "frame_at", None)
    if direct is not None:
        frame = direct(event)
        if not isinstance(frame, Frame):
            raise PluginError(_not_a_frame(source, path, frame))
        return frame
    for frame in checked_frames(source, path):
        if frame.event == event:
            return frame
    raise FormatError(path, f"no frame with event {event!r}")
