"""Built-in peak writers (work in progress)."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def peaknet_writer_types():
    return []
