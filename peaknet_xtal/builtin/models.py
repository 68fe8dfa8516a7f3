"""Built-in model families (PeakNet and its named sizes).

Registered through :func:`peaknet_xtal.hookspecs.peaknet_model_families` exactly like a
third-party plugin's families, so ``model.zoo`` has one code path for both.  The family is
declared where it is defined (``model/peaknet.py``, with ``zoo.register_family`` and
``zoo.register_model``); torch is imported only when the registry asks for model families, not
when it looks up sources or writers.
"""
from __future__ import annotations

from typing import Any

from peaknet_xtal.hookspecs import hookimpl


@hookimpl
def peaknet_model_families() -> tuple[Any, ...]:
    from peaknet_xtal.model import peaknet  # noqa: F401  (declares its family and sizes)
    from peaknet_xtal.model.zoo import declared_families

    return declared_families()
