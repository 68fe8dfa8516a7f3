"""Files a simulated run produces: CXI stack + .geom, truth (HDF5), and the run geometry.

The stack uses the raw data layout of the source geometry (``/entry_1/data_1/data`` of shape
``(n, *slab_shape)``, float32 ADU) with a static ``/entry_1/data_1/mask`` (1 = good) and the true
strong peaks as a Cheetah/CrystFEL CXI peak table in ``/entry_1/result_1`` (raw slab coordinates,
pixel-centre origin, as indexamajig expects with its default half-pixel shift).  A stacked layout
(EuXFEL-style modules along a fixed dimension, ``p0/dim1 = 3``) is stored as one 2-D slab instead,
the modules one below another (``Geometry.as_slab``, as ``peaknet2cxi`` stores it): CrystFEL
places a CXI peak by its slab position alone, and the modules of a stack share one fs/ss range.
Its truth peak masks and stream use that slab's coordinates too.  The ``.geom``
written beside it has the same stem, numeric ``clen``/``photon_energy`` (the values the frames were
simulated with) and the ``peak_list`` keys, so CrystFEL, DIALS (through ``peaknet_dxtbx``) and
``peaknet_xtal.formats.cxi`` all read the stack with the right geometry.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from peaknet_xtal.atomic import atomic_path, write_text_atomic
from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.cxi import (
    DATA_PATH,
    DEFAULT_MAX_PEAKS,
    GEOMETRY_ATTR,
    MASK_PATH,
    PEAK_GROUP,
    open_h5,
)
from peaknet_xtal.formats.geometry import HC_EV_A
from peaknet_xtal.sim.simulate import REFLECTION_DTYPE, SimTruth
from peaknet_xtal.types import Frame

# The project's CXI layout lives in one place (formats/cxi.py); the simulator writes the same.
MAX_PEAKS = DEFAULT_MAX_PEAKS


def run_geometry(geometry: Any, wavelength_A: float, clen_m: float, adu_per_photon: float) -> Any:
    """The geometry as the simulated stack needs it: numeric beam/distance, CXI stack layout, a
    stacked layout's modules laid out as one slab (``Geometry.as_slab``; a slab layout is kept as
    it is).  Panels keep their order, names and lab placement, so per-panel truth is unchanged."""
    geometry = geometry.as_slab()
    panels = []
    for panel in geometry.panels:
        dims = list(panel.dims)
        if "%" not in dims:
            dims = ["%"] + dims
        panel_clen = panel.clen_m if isinstance(panel.clen_m, float) else None
        panels.append(dataclasses.replace(panel, dims=dims, clen_path=None,
                                          clen_m=panel_clen if panel_clen is not None else clen_m,
                                          adu_per_photon=adu_per_photon))
    keys = {k: v for k, v in geometry.keys.items()
            if not (k in {"clen", "photon_energy", "wavelength", "electron_voltage", "adu_per_eV",
                          "adu_per_photon", "data", "peak_list", "peak_list_type"}
                    or k.startswith("mask") or k.startswith("dim"))}
    keys.update({"photon_energy": f"{HC_EV_A / wavelength_A:.4f}", "clen": repr(float(clen_m)),
                 "adu_per_photon": repr(float(adu_per_photon)), "data": DATA_PATH,
                 "mask": MASK_PATH, "mask_good": "0x1", "mask_bad": "0x0",
                 "peak_list": PEAK_GROUP, "peak_list_type": "cxi"})
    return dataclasses.replace(geometry, panels=panels, keys=keys, data=DATA_PATH,
                               clen_m=float(clen_m), clen_path=None, wavelength_A=wavelength_A,
                               photon_energy_eV=HC_EV_A / wavelength_A, photon_energy_path=None,
                               adu_per_photon=adu_per_photon)


class CXIStackWriter:
    """Append frames to a CXI stack; the file appears under its final name only on ``close``."""

    def __init__(self, path: str | os.PathLike[str], geometry: Any, mask: list[np.ndarray],
                 wavelength_A: float, clen_m: float, adu_per_photon: float) -> None:
        self.path = Path(path)
        self.geometry = geometry.as_slab()  # run_geometry's already (its .geom describes it)
        geometry = self.geometry
        self.geom_path = self.path.with_suffix(".geom")
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        self.h5 = h5py.File(tmp, "w")
        slab = tuple(geometry.slab_shape)
        self.data = self.h5.create_dataset(DATA_PATH, shape=(0, *slab), maxshape=(None, *slab),
                                           dtype="f4", chunks=(1, *slab))
        self.h5.create_dataset(MASK_PATH, data=geometry.assemble_slab(
            [m.astype(np.uint16) for m in mask], fill=0))
        group = self.h5.require_group(PEAK_GROUP)
        self.n_peaks = group.create_dataset("nPeaks", shape=(0,), maxshape=(None,), dtype="i4")
        self.tables = {name: group.create_dataset(name, shape=(0, MAX_PEAKS),
                                                  maxshape=(None, MAX_PEAKS), dtype="f4",
                                                  chunks=(16, MAX_PEAKS), fillvalue=0)
                       for name in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity",
                                    "peakMaximumValue", "peakSNR")}
        self.h5.attrs[GEOMETRY_ATTR] = self.geom_path.name
        self.h5.attrs["wavelength_A"] = wavelength_A
        self.h5.attrs["clen_m"] = clen_m
        self.h5.attrs["adu_per_photon"] = adu_per_photon
        self.h5.attrs["creator"] = "peaknet-sim"
        self.h5[DATA_PATH].parent.attrs["wavelength_A"] = wavelength_A

    def append(self, frame: Frame, truth: SimTruth) -> None:
        n = self.data.shape[0]
        self.data.resize(n + 1, axis=0)
        self.data[n] = self.geometry.assemble_slab(frame.panels, fill=0)
        strong = truth.strong[:MAX_PEAKS]
        fs, ss = self.geometry.panel_to_raw(strong["panel"], strong["fs"], strong["ss"])
        self.n_peaks.resize(n + 1, axis=0)
        self.n_peaks[n] = len(strong)
        values = {"peakXPosRaw": fs, "peakYPosRaw": ss,
                  "peakTotalIntensity": strong["photons"] * truth.adu_per_photon,
                  "peakMaximumValue": strong["max_photons"] * truth.adu_per_photon,
                  "peakSNR": strong["snr"]}
        for name, table in self.tables.items():
            table.resize(n + 1, axis=0)
            row = np.zeros(MAX_PEAKS, dtype=np.float32)
            row[:len(strong)] = values[name]
            table[n] = row

    def close(self) -> None:
        self.h5.close()
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self.h5.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


class TruthWriter:
    """Truth of every frame in one HDF5 file (written atomically on ``close``).

    ``/reflections``: REFLECTION_DTYPE rows plus ``frame``; ``/frames``: seed, hit, wavelength,
    number of crystals and reflections; ``/crystals``: frame, crystal, A (columns a*, b*, c*,
    1/Angstrom, CrystFEL lab frame), cell (A, deg), lattice, centring; ``/peak_masks``: the
    segmentation target in the raw slab layout (uint8, 1 = pixel of a strong spot).
    """

    FRAME_DTYPE = np.dtype([("frame", "i4"), ("seed", "i8"), ("hit", "?"), ("wavelength_A", "f8"),
                            ("n_crystals", "i4"), ("n_reflections", "i4"), ("n_strong", "i4")])
    CRYSTAL_DTYPE = np.dtype([("frame", "i4"), ("crystal", "i4"), ("A", "f8", (3, 3)),
                              ("cell", "f8", (6,)), ("lattice", "S16"), ("centring", "S1")])

    def __init__(self, path: str | os.PathLike[str], geometry: Any) -> None:
        self.geometry = geometry.as_slab()  # the layout of the run's .geom (see run_geometry)
        geometry = self.geometry
        self._atomic = atomic_path(path)
        self.h5 = h5py.File(self._atomic.__enter__(), "w")
        slab = tuple(geometry.slab_shape)
        self.masks = self.h5.create_dataset("peak_masks", shape=(0, *slab), maxshape=(None, *slab),
                                            dtype="u1", chunks=(1, *slab), compression="lzf")
        self.reflections: list[np.ndarray] = []
        self.frames: list[tuple[Any, ...]] = []
        self.crystals: list[tuple[Any, ...]] = []

    def append(self, truth: SimTruth) -> None:
        index = len(self.frames)
        rows = np.zeros(len(truth.reflections),
                        dtype=np.dtype(REFLECTION_DTYPE.descr + [("frame", "i4")]))
        for name in REFLECTION_DTYPE.names or ():
            rows[name] = truth.reflections[name]
        rows["frame"] = index
        self.reflections.append(rows)
        self.frames.append((index, truth.seed, truth.hit, truth.wavelength_A, len(truth.crystals),
                            len(truth.reflections), int(truth.reflections["strong"].sum())))
        for c, crystal in enumerate(truth.crystals):
            self.crystals.append((index, c, crystal.A, crystal.cell.parameters,
                                  crystal.cell.lattice.encode(), crystal.cell.centring.encode()))
        self.masks.resize(index + 1, axis=0)
        self.masks[index] = self.geometry.assemble_slab(
            [m.astype(np.uint8) for m in truth.peak_masks], fill=0)

    def close(self) -> None:
        empty = np.zeros(0, dtype=np.dtype(REFLECTION_DTYPE.descr + [("frame", "i4")]))
        self.h5.create_dataset("reflections", data=np.concatenate(self.reflections)
                               if self.reflections else empty)
        self.h5.create_dataset("frames", data=np.array(self.frames, dtype=self.FRAME_DTYPE))
        self.h5.create_dataset("crystals", data=np.array(self.crystals, dtype=self.CRYSTAL_DTYPE))
        self.h5.close()
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        self.h5.close()
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def read_truth(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tables of a truth file written by :class:`TruthWriter` (peak masks stay on disk);
    a missing, damaged or foreign file is a FormatError naming it and what is wrong."""
    path = os.fspath(path)
    tables = {}
    with open_h5(path) as h5:
        for name in ("reflections", "frames", "crystals"):
            try:
                tables[name] = h5[name][()]
            except (KeyError, OSError, RuntimeError) as exc:
                raise FormatError(path, f"no readable {name} table (a peaknet-sim truth file "
                                  f"holds one): {exc}", dataset=f"/{name}") from None
    return tables


def write_run_geometry(path: str | os.PathLike[str], geometry: Any) -> None:
    write_text_atomic(path, geometry.to_text())
