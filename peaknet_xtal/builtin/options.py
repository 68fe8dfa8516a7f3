"""Plugin options shared by the built-in sources and writers (public: plugins may use them too)."""
from __future__ import annotations

import os
from typing import Any


def geometry_option(value: Any) -> Any:
    """The ``geometry`` option as a Geometry: a ``.geom`` path is read, a Geometry (or any other
    object) passes through, None stays None."""
    if value is None or not isinstance(value, (str, os.PathLike)):
        return value
    from peaknet_xtal.formats.geometry import read_geometry

    return read_geometry(value)
