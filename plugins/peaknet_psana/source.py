"""psana (LCLS) frame source, registered as source type ``psana`` through the ``peaknet_xtal``
entry-point group (``psana = peaknet_psana.source`` in setup.cfg).

Why a separate plugin: psana only exists inside LCLS software environments.  The type is always
listed, so opening it by name (``registry.open_source(run, "psana", ...)``) says psana is missing
rather than "no source type 'psana'"; ``sniff`` never claims a name there (``peaknet2cxi`` then
says "input file not found"), and nothing imports psana until a source is opened.

Paths are psana data-source strings, ``exp=mfxp12345:run=7`` (psana2 keywords ``exp``/``run``;
any extra ``key=value`` parts, e.g. ``dir=/path/xtc``, are passed on).  Options: ``detector``
(required, e.g. ``"epix10k2M"``), ``max_events``, ``geometry`` (a CrystFEL geometry attached to
every frame).  Where psana is importable a run is an input like a file:

    peaknet2cxi exp=mfxp12345:run=7 --source-option detector=epix10k2M -g epix.geom -o out

(``--source-option`` passes the options this type declares, ``detector`` and ``max_events``, as
the strings typed; ``-g`` the geometry); from Python, ``registry.open_source(run, "psana",
detector=...)``.  A run's length is unknown before it is read (``__len__`` raises TypeError).
Each frame's key is ``(data-source string, "//<timestamp>")``, stable across reruns, so the
pipeline's resume and exactly-once bookkeeping work unchanged.
"""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from peaknet_xtal.hookspecs import hookimpl
from peaknet_xtal.types import Frame

_DATASOURCE = re.compile(r"^(?:[a-z_]+=[^:]+)(?::[a-z_]+=[^:]+)*$")


def psana_available() -> bool:
    return importlib.util.find_spec("psana") is not None


def parse_datasource(text: str) -> dict[str, str]:
    """``"exp=mfx1:run=7:dir=/x"`` -> ``{"exp": "mfx1", "run": "7", "dir": "/x"}``."""
    if not _DATASOURCE.match(text):
        raise ValueError(f"{text!r} is not a psana data source (expected exp=NAME:run=N)")
    parts = dict(item.split("=", 1) for item in text.split(":"))
    missing = {"exp", "run"} - set(parts)
    if missing:
        raise ValueError(f"{text!r}: psana data source lacks {sorted(missing)}")
    return parts


def calib_to_panels(calib: Any) -> list[np.ndarray]:
    """A calibrated detector array -> one float32 2-D array per panel (module)."""
    data = np.asarray(calib, dtype=np.float32)
    if data.ndim == 2:
        return [data]
    return [panel for panel in data.reshape(-1, *data.shape[-2:])]


class PsanaSource:
    """A ``FrameSource`` over one psana run (psana2 API)."""

    name = "psana"

    def __init__(self, path: str, detector: str | None = None, max_events: int | None = None,
                 geometry: Any = None, **_: Any) -> None:
        if not psana_available():
            raise RuntimeError(f"{path}: the psana source needs LCLS psana, which is not "
                               "importable in this environment")
        if not detector:
            raise ValueError(f"{path}: the psana source needs a detector name (option 'detector')")
        self.path = path
        self.keys = parse_datasource(path)
        self.detector = detector
        self.max_events = max_events
        self.geometry = geometry

    def __len__(self) -> int:
        raise TypeError("a psana run has no known length before it is read")

    def __iter__(self) -> Iterator[Frame]:
        from psana import DataSource

        options: dict[str, Any] = {k: v for k, v in self.keys.items() if k not in ("exp", "run")}
        ds = DataSource(exp=self.keys["exp"], run=int(self.keys["run"]),
                        max_events=int(self.max_events or 0), **options)
        serial = 0
        for run in ds.runs():
            det = run.Detector(self.detector)
            for evt in run.events():
                calib = det.raw.calib(evt)
                if calib is None:  # a dropped shot: no frame, no key
                    continue
                yield Frame(panels=calib_to_panels(calib), source=self.path,
                            event=f"//{evt.timestamp}", serial=serial, geometry=self.geometry,
                            meta={"timestamp": int(evt.timestamp)})
                serial += 1

    def close(self) -> None:
        """psana closes its files when the run iterator ends."""


@dataclass(frozen=True)
class PsanaSourceType:
    name: str = "psana"
    description: str = "LCLS psana run (exp=NAME:run=N), when psana is importable"
    options: tuple[str, ...] = ("detector", "max_events")  # --source-option KEY=VALUE

    def sniff(self, path: str) -> bool:
        return psana_available() and bool(_DATASOURCE.match(str(path))) and "exp=" in str(path)

    def open(self, path: str, **options: Any) -> PsanaSource:
        return PsanaSource(str(path), **options)


@hookimpl
def peaknet_source_types() -> list[PsanaSourceType]:
    return [PsanaSourceType()]
