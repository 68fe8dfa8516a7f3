"""Built-in frame sources: CXI/HDF5 + geometry ("cxi"), DIALS-readable images ("dxtbx"), and
simulated stills ("sim").

They register through :func:`peaknet_xtal.hookspecs.peaknet_source_types` exactly like a
third-party plugin would, so the registry has one code path for both.  Heavy dependencies (dxtbx,
the simulator) are imported only when a source is opened.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from peaknet_xtal.builtin.options import geometry_option
from peaknet_xtal.errors import FormatError
from peaknet_xtal.hookspecs import hookimpl
from peaknet_xtal.types import Frame


@dataclass(frozen=True)
class SourceType:
    """What ``peaknet_source_types`` returns (see hookspecs); plugins may reuse this class.
    ``options``: the names of the options beyond ``geometry`` that ``open`` takes from a user
    (``--source-option KEY=VALUE`` of peaknet2cxi, peaknet-show and stream2labels); the
    built-ins take none that way."""

    name: str
    description: str
    sniff: Callable[[str], bool]
    open: Callable[..., Any]
    options: tuple[str, ...] = ()


def _open_cxi(path: str, geometry: Any = None, data_path: str | None = None,
              mask_path: str | None = None, **_: Any) -> Any:
    from peaknet_xtal.formats.cxi import CXISource

    return CXISource(path, geometry_option(geometry), data_path=data_path, mask_path=mask_path)


def _sniff_cxi(path: str) -> bool:
    from peaknet_xtal.formats.cxi import sniff_cxi

    return sniff_cxi(path)


def _open_dxtbx(path: str, with_geometry: bool = True, geometry: Any = None, **_: Any) -> Any:
    from peaknet_xtal.formats.dxtbx_images import DxtbxSource

    return DxtbxSource(path, with_geometry=with_geometry, geometry=geometry_option(geometry))


def _sniff_dxtbx(path: str) -> bool:
    from peaknet_xtal.formats.dxtbx_images import sniff_dxtbx

    return sniff_dxtbx(path)


class SimSource:
    """``count`` simulated stills with seeds ``seed, seed+1, ...`` (deterministic per seed).

    The path is ``sim:`` or ``sim:<file.geom>``; a ``geometry`` option wins over the path.
    """

    name = "sim"

    def __init__(self, path: str, geometry: Any = None, count: int = 8, seed: int = 0,
                 config: Any = None) -> None:
        self.path = path
        rest = path[4:] if path.startswith("sim:") else path
        self.geometry = geometry_option(geometry if geometry is not None else (rest or None))
        if self.geometry is None:
            raise FormatError(path, "a simulated source needs a geometry "
                              "(sim:<file.geom> or the geometry option)")
        self.count, self.seed = int(count), int(seed)
        self.config = config

    def __len__(self) -> int:
        return self.count

    def _config(self) -> Any:
        from peaknet_xtal.sim import SimConfig

        if self.config is None or isinstance(self.config, SimConfig):
            return self.config
        return SimConfig.from_dict(dict(self.config))

    def __iter__(self) -> Iterator[Frame]:
        from peaknet_xtal.sim import simulate_frame

        config = self._config()
        for i in range(self.count):
            frame, truth = simulate_frame(self.geometry, self.seed + i, config)
            frame.source, frame.serial = self.path, i
            frame.meta["truth"] = truth
            yield frame

    def close(self) -> None:
        """Nothing to release."""


def _open_sim(path: str, geometry: Any = None, count: int = 8, seed: int = 0,
              config: Any = None, **_: Any) -> SimSource:
    return SimSource(path, geometry=geometry, count=count, seed=seed, config=config)


def _sniff_sim(path: str) -> bool:
    return str(path).startswith("sim:")


SOURCE_TYPES = (
    SourceType("cxi", "CXI/HDF5 image stacks or single frames, split into panels by a CrystFEL "
               "geometry (option geometry=...)", _sniff_cxi, _open_cxi),
    SourceType("dxtbx", "any image DIALS' dxtbx reads (CBF, miniCBF .bz2/.gz, NeXus, ...)",
               _sniff_dxtbx, _open_dxtbx),
    SourceType("sim", "simulated XFEL stills with exact truth (sim:<file.geom>; options count, "
               "seed, config)", _sniff_sim, _open_sim),
)


@hookimpl
def peaknet_source_types() -> tuple[SourceType, ...]:
    return SOURCE_TYPES
