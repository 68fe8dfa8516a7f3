"""Built-in frame sources (work in progress)."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def peaknet_source_types():
    return []
