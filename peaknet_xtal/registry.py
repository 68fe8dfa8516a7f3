"""The plugin manager: built-in and third-party sources and writers, looked up by name."""
from __future__ import annotations

import functools
import os
from typing import Any

import pluggy

from peaknet_xtal import hookspecs
from peaknet_xtal.errors import FormatError
from peaknet_xtal.types import Frame


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """Built-ins first, then every ``peaknet_xtal`` entry point (unless PEAKNET_NO_PLUGINS=1)."""
    from peaknet_xtal.builtin import sources as builtin_sources
    from peaknet_xtal.builtin import writers as builtin_writers

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin_sources, name="builtin-sources")
    pm.register(builtin_writers, name="builtin-writers")
    if os.environ.get("PEAKNET_NO_PLUGINS") != "1":
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def _by_name(items: list[Any], kind: str) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for item in items:
        if item.name in table:
            raise ValueError(f"two {kind} types are registered as {item.name!r}")
        table[item.name] = item
    return table


def source_types() -> dict[str, Any]:
    """All registered source types by name."""
    found = [t for group in plugin_manager().hook.peaknet_source_types() for t in group]
    return _by_name(found, "source")


def writer_types() -> dict[str, Any]:
    """All registered writer types by name."""
    found = [t for group in plugin_manager().hook.peaknet_writer_types() for t in group]
    return _by_name(found, "writer")


def open_source(path: str, kind: str | None = None, **options: Any) -> Any:
    """Open ``path`` with the named source type, or the first whose ``sniff`` accepts it."""
    types = source_types()
    if kind is not None:
        if kind not in types:
            raise KeyError(f"no source type {kind!r}; registered: {sorted(types)}")
        return types[kind].open(path, **options)
    for source_type in types.values():
        if source_type.sniff(path):
            return source_type.open(path, **options)
    raise ValueError(f"{path}: no registered source can read this file ({sorted(types)})")


def open_writer(kind: str, path: str, **options: Any) -> Any:
    """Open a writer of the named type."""
    types = writer_types()
    if kind not in types:
        raise KeyError(f"no writer type {kind!r}; registered: {sorted(types)}")
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
