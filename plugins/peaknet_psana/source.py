"""psana source plugin (work in progress)."""
from __future__ import annotations

from peaknet_xtal.hookspecs import hookimpl


@hookimpl
def peaknet_source_types():
    return []
