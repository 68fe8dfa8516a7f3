"""Every extension point of peaknet-xtal, in one place.

A plugin is a module (or object) with functions named like the specs below and decorated with
``peaknet_xtal.hookimpl``.  Third-party plugins are found through the ``peaknet_xtal`` entry-point
group; the built-in sources and writers (``peaknet_xtal.builtin``) register through these same
hooks, so a plugin has exactly the powers the built-ins have.

The objects the hooks return follow two small protocols, documented here too:

``FrameSource``
    ``name: str``; ``__iter__()`` yields :class:`peaknet_xtal.types.Frame`;  ``__len__()`` the
    number of frames when known; ``close()``.  Frames must carry a stable ``(source, event)``
    key, which is what makes resumable runs and exactly-once output possible.  Optional:
    ``frame_at(event: str) -> Frame``, random access by the event of a key (the data engine
    reads the frames an indexing result names this way); a source without it is read in order
    until the event comes up (:func:`peaknet_xtal.registry.frame_at`).

``PeakWriter``
    ``name: str``; ``write(result: FrameResult)``; ``close()`` which finalises the output
    atomically (nothing half-written is left under the final name); ``done_keys()`` returns the
    ``(source, event)`` keys already written by an earlier, interrupted run so they can be skipped.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Sequence

PROJECT = "peaknet_xtal"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def peaknet_source_types() -> Sequence[Any]:
    """Return the frame-source types this plugin provides.

    Each item is a ``SourceType`` with ``name: str``, ``description: str``,
    ``sniff(path: str) -> bool`` (can this source open ``path``? must be cheap and never raise),
    and ``open(path: str, **options) -> FrameSource``.  Options are source specific (``geometry``
    for CXI/HDF5, ``count``/``seed`` for simulated frames, ...); unknown options are ignored.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


@hookspec
def peaknet_writer_types() -> Sequence[Any]:
    """Return the peak-writer types this plugin provides.

    Each item is a ``WriterType`` with ``name: str``, ``description: str``, ``suffix: str``
    (the file suffix it writes, e.g. ``".cxi"``) and ``open(path: str, **options) -> PeakWriter``.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations
