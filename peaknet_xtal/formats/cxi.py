"""CXI/HDF5 images and CXI peak tables, in the layout ``indexamajig --peaks=cxi`` reads.

Reading: a stack ``(n_frames, ss, fs)`` with ``dim0 = %`` or a single 2-D frame, split into panels
by a CrystFEL geometry (or one whole-slab panel without one).  Each
:class:`~peaknet_xtal.types.Frame` remembers the HDF5 file, dataset and index it came from, so a
writer can link back to the pixels instead of copying them.

Writing: :func:`write_cxi` puts the peak table at ``/entry_1/result_1`` *in the same file as the
images*, because CrystFEL has no key naming a separate peak file.  The images are either copied in
or (``mode="vds"``) referenced through an HDF5 virtual dataset at ``/entry_1/data_1/data``, which
costs a few kB instead of a second copy of the raw data.  Peak positions are raw slab indices,
0-based pixel centre, so indexamajig's default ``--half-pixel-shift`` is right.

:class:`CXIWriter` is the writer the inference engine and the Ray pipeline use: it rolls a new
file every ``frames_per_file`` results, finalises each atomically, and reports the frames already
written by an earlier run (:meth:`CXIWriter.done_keys`) so an interrupted run resumes exactly.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from peaknet_xtal.atomic import atomic_path, write_text_atomic
from peaknet_xtal.errors import FormatError
from peaknet_xtal.types import Frame, FrameResult, empty_peaks
from peaknet_xtal.formats.geometry import HC_EV_A

log = logging.getLogger(__name__)

#: Where images are looked for when the geometry names no ``data`` path, in this order.
DEFAULT_DATA_PATHS = ("/entry_1/data_1/data", "/data/data", "/entry_1/instrument_1/detector_1/data")
#: Static masks looked for beside the data when the geometry names none (psocake writes this).
DEFAULT_MASK_PATHS = ("/entry_1/data_1/mask",)
DATA_PATH = "/entry_1/data_1/data"
PEAK_GROUP = "/entry_1/result_1"
#: Per-row identity of each written frame: lets a resumed run skip what is already done.
KEY_GROUP = "/entry_1/peaknet"
DEFAULT_MAX_PEAKS = 2048
CXI_SUFFIXES = (".cxi", ".h5", ".hdf5", ".hdf", ".nxs")

#: CXI column name -> (PEAK_DTYPE column, what CrystFEL makes of it).
PEAK_COLUMNS: dict[str, str] = {
    "peakXPosRaw": "fs",
    "peakYPosRaw": "ss",
    "peakTotalIntensity": "intensity",
    "peakNPixels": "npix",
    "peakMaximumValue": "max_value",
    "peakSNR": "snr",
    "peakBackground": "background",
    "peakProbability": "prob",
    "peakOneOverD": "one_over_d",
    "peakPanel": "panel",
}


# --------------------------------------------------------------------------------------------
# reading images


def open_h5(path: str | os.PathLike[str]) -> h5py.File:
    """Open an HDF5 file read-only, turning every low-level failure into a FormatError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(path, f"not a readable HDF5 file ({exc})") from exc


@dataclass
class CXIInfo:
    """Where the images of a CXI/HDF5 file are, and how many there are."""

    path: str
    dataset: str
    n_frames: int
    frame_shape: tuple[int, ...]  # (ss, fs) of the raw slab (more for EuXFEL-style layouts)
    dtype: np.dtype
    stacked: bool  # True for a (n, ss, fs) stack, False for one 2-D frame
    mask_dataset: str | None = None


def _dataset(h5: h5py.File, path: str, name: str) -> h5py.Dataset:
    """The dataset at ``name``, or a FormatError naming the file and dataset."""
    try:
        obj = h5.get(name)
    except (OSError, KeyError, RuntimeError) as exc:  # broken links, truncated files
        raise FormatError(path, f"cannot open ({exc})", dataset=name) from exc
    if obj is None:
        raise FormatError(path, "dataset not found", dataset=name)
    if not isinstance(obj, h5py.Dataset):
        raise FormatError(path, f"is a {type(obj).__name__}, not a dataset", dataset=name)
    return obj


def _data_path(h5: h5py.File, path: str, geometry: Any, data_path: str | None) -> str:
    wanted = data_path or (getattr(geometry, "data", None) if geometry is not None else None)
    if wanted:
        if "%" in wanted:
            raise FormatError(path, "path placeholders ('%' in the data path) are not supported; "
                              "use a stack with dim0 = %", dataset=wanted)
        _dataset(h5, path, wanted)
        return wanted
    for candidate in DEFAULT_DATA_PATHS:
        if isinstance(h5.get(candidate), h5py.Dataset):
            return candidate
    raise FormatError(path, f"no image dataset found (looked for {', '.join(DEFAULT_DATA_PATHS)})")


def _mask_path(h5: h5py.File, geometry: Any, mask_path: str | None) -> str | None:
    if mask_path:
        return mask_path
    named = getattr(geometry, "mask", None) if geometry is not None else None
    if named and not getattr(geometry, "mask_file", None):
        return named
    if named is None:
        for candidate in DEFAULT_MASK_PATHS:
            if isinstance(h5.get(candidate), h5py.Dataset):
                return candidate
    return None


def _frame_ndim(geometry: Any) -> int:
    return 2 if geometry is None else len(geometry.slab_shape)


def _check_shape(path: str, dataset: str, shape: tuple[int, ...], geometry: Any) -> None:
    """The data must cover the geometry's slab; otherwise panels would silently be cut off."""
    ndim = _frame_ndim(geometry)
    if len(shape) not in (ndim, ndim + 1):
        raise FormatError(path, f"image data has {len(shape)} dimensions {shape}; expected a "
                          f"{ndim}-D frame or a {ndim + 1}-D stack of them", dataset=dataset)
    if geometry is None:
        return
    need = tuple(geometry.slab_shape)
    have = shape[-ndim:]
    if any(h < n for h, n in zip(have, need)):
        raise FormatError(path, f"frames are {'x'.join(map(str, have))} but the geometry "
                          f"{getattr(geometry, 'path', None) or ''} needs a slab of at least "
                          f"{'x'.join(map(str, need))}", dataset=dataset)


def check_image_dataset(path: str, name: str, ds: h5py.Dataset) -> None:
    """Image data must be numbers (a boolean dataset is a mask, strings are not pixels) and, for
    an HDF5 virtual dataset, every source file must exist: HDF5 reads a missing source as the
    fill value, so the frames would silently be zeros."""
    kind = ds.dtype.kind
    if kind == "b":
        raise FormatError(path, "boolean data: this looks like a mask, not detector images; "
                          "give the image dataset", dataset=name)
    if kind not in "fiu":
        raise FormatError(path, f"pixel values must be numbers, but the dataset holds "
                          f"{ds.dtype} values", dataset=name)
    if not ds.is_virtual:
        plist = ds.id.get_create_plist()
        for k in range(plist.get_nfilters()):
            code, _, _, label = plist.get_filter(k)
            if not h5py.h5z.filter_avail(code):
                raise FormatError(path, f"compressed with HDF5 filter {code} "
                                  f"({label.decode(errors='replace') or 'unnamed'}), which this "
                                  "HDF5 library cannot decode (install its plugin, e.g. the "
                                  "hdf5plugin package, and set HDF5_PLUGIN_PATH)", dataset=name)
    else:
        missing = sorted({source.file_name for source in ds.virtual_sources()
                          if not _vds_source_exists(path, source.file_name)})
        if missing:
            raise FormatError(path, f"virtual dataset source file(s) missing: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
                              "HDF5 would read their frames as zeros", dataset=name)


def _vds_source_exists(path: str, source: str) -> bool:
    """HDF5 resolves a relative source against the virtual file's folder (then the working
    directory); '.' is the file itself."""
    if source == ".":
        return True
    if os.path.isabs(source):
        return os.path.exists(source)
    here = os.path.dirname(os.path.abspath(path))
    return os.path.exists(os.path.join(here, source)) or os.path.exists(source)


def check_mask_dataset(path: str, name: str, mask: h5py.Dataset,
                       frame_shape: tuple[int, ...], n_frames: int, stacked: bool) -> None:
    """A mask must cover the frames exactly: one static mask of the frame shape, or one mask
    per frame.  Anything else would mask the wrong pixels, or none."""
    shape = tuple(int(n) for n in mask.shape)
    allowed = [tuple(frame_shape)] + ([(n_frames, *frame_shape)] if stacked else [])
    if shape not in allowed:
        raise FormatError(path, f"mask shape {shape} does not fit the images: need "
                          f"{' or '.join(str(a) for a in allowed)}", dataset=name)
    if mask.dtype.kind not in "biu":
        raise FormatError(path, f"mask values must be integers or booleans, not {mask.dtype}",
                          dataset=name)


def inspect_cxi(path: str | os.PathLike[str], geometry: Any = None, *,
                data_path: str | None = None, mask_path: str | None = None) -> CXIInfo:
    """Locate and check the image data without reading any pixels."""
    path = os.fspath(path)
    with open_h5(path) as h5:
        return _inspect(h5, path, geometry, data_path, mask_path)


def _inspect(h5: h5py.File, path: str, geometry: Any, data_path: str | None,
             mask_path: str | None) -> CXIInfo:
    name = _data_path(h5, path, geometry, data_path)
    ds = _dataset(h5, path, name)
    check_image_dataset(path, name, ds)
    shape = tuple(int(n) for n in ds.shape)
    _check_shape(path, name, shape, geometry)
    stacked = len(shape) == _frame_ndim(geometry) + 1
    n_frames = shape[0] if stacked else 1
    frame_shape = shape[1:] if stacked else shape
    mask_name = _mask_path(h5, geometry, mask_path)
    if mask_name is not None:
        check_mask_dataset(path, mask_name, _dataset(h5, path, mask_name), frame_shape,
                           n_frames, stacked)
    mask_file = getattr(geometry, "mask_file", None) if geometry is not None else None
    if mask_file and not mask_path:
        with open_h5(mask_file) as other:
            file_mask = getattr(geometry, "mask", None) or DEFAULT_MASK_PATHS[0]
            check_mask_dataset(mask_file, file_mask, _dataset(other, mask_file, file_mask),
                               frame_shape, n_frames, stacked)
    return CXIInfo(path=path, dataset=name, n_frames=n_frames, frame_shape=frame_shape,
                   dtype=ds.dtype, stacked=stacked, mask_dataset=mask_name)


def _split(slab: np.ndarray, geometry: Any) -> list[np.ndarray]:
    if geometry is None:
        return [slab]
    return [np.ascontiguousarray(p) for p in geometry.split_slab(slab)]


def mask_bits_ok(raw: np.ndarray, geometry: Any) -> np.ndarray:
    """True = good, following CrystFEL's mask_good / mask_bad bit rules (or nonzero = good)."""
    good = getattr(geometry, "mask_good", None) if geometry is not None else None
    bad = getattr(geometry, "mask_bad", None) if geometry is not None else None
    if good is None and bad is None:
        return raw != 0
    raw = raw.astype(np.int64)
    ok = np.ones(raw.shape, dtype=bool)
    if good:
        ok &= (raw & int(good)) == int(good)
    if bad:
        ok &= (raw & int(bad)) == 0
    return ok


class _Reader:
    """Reads frames one at a time from an open file (constant memory on huge stacks)."""

    def __init__(self, path: str, geometry: Any, data_path: str | None, mask_path: str | None):
        self.path = os.path.abspath(path)
        self.geometry = geometry
        self.h5 = open_h5(path)
        try:
            self.info = _inspect(self.h5, self.path, geometry, data_path, mask_path)
            self._energy = self._energy_dataset()
        except Exception:
            self.h5.close()
            raise
        self.data = self.h5[self.info.dataset]
        self.mask = self.h5[self.info.mask_dataset] if self.info.mask_dataset else None
        self._mask_h5 = None
        mask_file = getattr(geometry, "mask_file", None) if geometry is not None else None
        if mask_file and not mask_path:  # the geometry's mask lives in another file
            self._mask_h5 = open_h5(mask_file)
            self.mask = self._mask_h5[getattr(geometry, "mask", None) or DEFAULT_MASK_PATHS[0]]
        self._static_masks = geometry.bad_pixel_masks() if geometry is not None else None

    def _energy_dataset(self) -> h5py.Dataset | None:
        """The per-frame photon energy (eV) the geometry points at (``photon_energy = /path``),
        as CrystFEL reads it; without it 1/d and an ``adu_per_eV`` gain stay unknown."""
        path = getattr(self.geometry, "photon_energy_path", None)
        if not path:
            return None
        if path not in self.h5 or not isinstance(self.h5[path], h5py.Dataset):
            log.warning("%s: no photon energy dataset %s (named by the geometry)", self.path, path)
            return None
        energy = self.h5[path]
        if energy.size not in (1, self.info.n_frames):
            raise FormatError(self.path, f"{energy.size} photon energies for "
                              f"{self.info.n_frames} frames", dataset=path)
        return energy

    def wavelength_A(self, index: int) -> float | None:
        if self._energy is None:
            return None
        energy = float(np.ravel(self._energy[()] if self._energy.size == 1
                                else self._energy[index])[0])
        if not np.isfinite(energy) or energy <= 0:
            raise FormatError(self.path, f"photon energy {energy} eV of frame {index} is not "
                              "positive", dataset=self._energy.name)
        return HC_EV_A / energy

    def slab(self, index: int) -> np.ndarray:
        if not 0 <= index < self.info.n_frames:
            raise IndexError(f"{self.path}: frame {index} out of range 0..{self.info.n_frames - 1}")
        try:
            raw = self.data[index] if self.info.stacked else self.data[()]
        except (OSError, RuntimeError) as exc:  # truncated file, missing VDS source
            raise FormatError(self.path, f"cannot read frame {index} ({exc})",
                              dataset=self.info.dataset) from exc
        return np.asarray(raw, dtype=np.float32)

    def masks(self, index: int) -> list[np.ndarray] | None:
        pieces: list[list[np.ndarray]] = []
        if self.mask is not None:
            raw = (self.mask[index] if self.mask.ndim == len(self.info.frame_shape) + 1
                   else self.mask[()])
            pieces.append(_split(mask_bits_ok(np.asarray(raw), self.geometry), self.geometry))
        if self._static_masks is not None:
            pieces.append(list(self._static_masks))
        if not pieces:
            return None
        out = [m.copy() for m in pieces[0]]
        for extra in pieces[1:]:
            for m, e in zip(out, extra):
                m &= e
        return out

    def frame(self, index: int) -> Frame:
        wavelength = self.wavelength_A(index)
        return Frame(
            panels=_split(self.slab(index), self.geometry),
            masks=self.masks(index),
            source=self.path,
            event=f"//{index}" if self.info.stacked else "//",
            serial=index,
            geometry=self.geometry,
            meta={"h5_file": self.path, "h5_dataset": self.info.dataset,
                  "h5_index": index if self.info.stacked else None,
                  "slab_shape": self.info.frame_shape,
                  **({} if wavelength is None else {"wavelength_A": wavelength})},
        )

    def close(self) -> None:
        self.h5.close()
        if self._mask_h5 is not None:
            self._mask_h5.close()


def iter_cxi_frames(path: str | os.PathLike[str], geometry: Any = None, *,
                    data_path: str | None = None, mask_path: str | None = None,
                    start: int = 0, stop: int | None = None) -> Iterator[Frame]:
    """Yield the frames of a CXI/HDF5 file in order, one read per frame."""
    reader = _Reader(os.fspath(path), geometry, data_path, mask_path)
    try:
        end = reader.info.n_frames if stop is None else min(stop, reader.info.n_frames)
        for index in range(start, end):
            yield reader.frame(index)
    finally:
        reader.close()


def read_cxi_frame(path: str | os.PathLike[str], index: int = 0, geometry: Any = None, *,
                   data_path: str | None = None, mask_path: str | None = None) -> Frame:
    """One frame by its position in the stack (0 for a single-frame file)."""
    reader = _Reader(os.fspath(path), geometry, data_path, mask_path)
    try:
        return reader.frame(index)
    finally:
        reader.close()


class CXISource:
    """A ``FrameSource`` (see hookspecs) over one CXI/HDF5 file."""

    name = "cxi"

    def __init__(self, path: str | os.PathLike[str], geometry: Any = None, *,
                 data_path: str | None = None, mask_path: str | None = None) -> None:
        if isinstance(geometry, (str, os.PathLike)):
            from peaknet_xtal.formats.geometry import read_geometry

            geometry = read_geometry(geometry)
        self.path = os.fspath(path)
        self.geometry = geometry
        self._options = {"data_path": data_path, "mask_path": mask_path}
        self.info = inspect_cxi(self.path, geometry, **self._options)

    def __len__(self) -> int:
        return self.info.n_frames

    def __iter__(self) -> Iterator[Frame]:
        return iter_cxi_frames(self.path, self.geometry, **self._options)

    def close(self) -> None:
        """Nothing stays open between iterations."""


def sniff_cxi(path: str | os.PathLike[str]) -> bool:
    """Cheap check: an HDF5 file holding images at one of the default data paths."""
    try:
        if not os.fspath(path).lower().endswith(CXI_SUFFIXES) or not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as h5:
            return any(isinstance(h5.get(p), h5py.Dataset) for p in DEFAULT_DATA_PATHS)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# peak tables


@dataclass
class CXIPeaks:
    """The peak table of a CXI file: ``n_peaks[i]`` valid entries in row ``i`` of every column."""

    n_peaks: np.ndarray  # (n_frames,) int
    columns: dict[str, np.ndarray]  # CXI name -> (n_frames, max_peaks)
    keys: list[tuple[str, str]] = field(default_factory=list)  # (source, event) per row if stored

    def __len__(self) -> int:
        return len(self.n_peaks)

    @property
    def max_peaks(self) -> int:
        return int(self.columns["peakXPosRaw"].shape[1])

    def raw(self, row: int) -> dict[str, np.ndarray]:
        """Valid entries of one frame, raw slab coordinates, by CXI column name."""
        n = int(self.n_peaks[row])
        return {name: values[row, :n] for name, values in self.columns.items()}

    def peaks(self, row: int, geometry: Any = None) -> np.ndarray:
        """One frame as a PEAK_DTYPE table (panel-relative coordinates when a geometry is given)."""
        raw = self.raw(row)
        table = empty_peaks(int(self.n_peaks[row]))
        for cxi_name, column in PEAK_COLUMNS.items():
            if cxi_name in raw:
                table[column] = raw[cxi_name]
        if geometry is not None:
            panel, pfs, pss = geometry.raw_to_panel(raw["peakXPosRaw"].astype(np.float64),
                                                    raw["peakYPosRaw"].astype(np.float64))
            table["panel"], table["fs"], table["ss"] = panel, pfs, pss
        elif "peakPanel" not in raw:
            table["panel"] = 0
        return table


def read_cxi_peaks(path: str | os.PathLike[str], group: str = PEAK_GROUP) -> CXIPeaks:
    """Read a CXI peak table back, checking it the way indexamajig would use it."""
    path = os.fspath(path)
    with open_h5(path) as h5:
        n_peaks = np.asarray(_dataset(h5, path, f"{group}/nPeaks")[()]).astype(np.int64)
        if n_peaks.ndim != 1:
            raise FormatError(path, f"nPeaks must be 1-D, not {n_peaks.shape}",
                              dataset=f"{group}/nPeaks")
        columns: dict[str, np.ndarray] = {}
        grp = h5[group]
        for name in grp:
            if not name.startswith("peak") or not isinstance(grp[name], h5py.Dataset):
                continue
            values = np.asarray(grp[name][()])
            where = f"{group}/{name}"
            if values.ndim != 2 or values.shape[0] != len(n_peaks):
                raise FormatError(path, f"shape {values.shape} does not match "
                                  f"{len(n_peaks)} frames", dataset=where)
            if len(n_peaks) and values.shape[1] < n_peaks.max():
                raise FormatError(path, f"only {values.shape[1]} columns but nPeaks reaches "
                                  f"{n_peaks.max()}", dataset=where)
            columns[name] = values
        for needed in ("peakXPosRaw", "peakYPosRaw", "peakTotalIntensity"):
            if needed not in columns:
                raise FormatError(path, "dataset not found", dataset=f"{group}/{needed}")
        keys = _read_keys(h5)
    return CXIPeaks(n_peaks=n_peaks, columns=columns, keys=keys)


def _read_keys(h5: h5py.File) -> list[tuple[str, str]]:
    if f"{KEY_GROUP}/source" not in h5:
        return []
    sources = [s.decode() if isinstance(s, bytes) else str(s) for s in h5[f"{KEY_GROUP}/source"]]
    events = [s.decode() if isinstance(s, bytes) else str(s) for s in h5[f"{KEY_GROUP}/event"]]
    return list(zip(sources, events))


def _peak_arrays(results: Sequence[FrameResult], geometry: Any,
                 max_peaks: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pack per-frame peak tables into CrystFEL's (n_frames, max_peaks) float32 columns."""
    counts = np.array([len(r.peaks) for r in results], dtype=np.int32)
    width = max(max_peaks, int(counts.max()) if len(counts) else 0)
    if width > max_peaks:  # grow in whole blocks, as Cheetah does
        width = -(-width // max_peaks) * max_peaks
    columns = {name: np.zeros((len(results), width), dtype=np.float32) for name in PEAK_COLUMNS}
    for row, result in enumerate(results):
        peaks = result.peaks
        n = len(peaks)
        if n == 0:
            continue
        raw_fs, raw_ss = _to_raw(peaks, result.frame.geometry or geometry)
        columns["peakXPosRaw"][row, :n] = raw_fs
        columns["peakYPosRaw"][row, :n] = raw_ss
        for cxi_name, column in PEAK_COLUMNS.items():
            if column not in ("fs", "ss"):
                columns[cxi_name][row, :n] = peaks[column]
    return counts, columns


def _to_raw(peaks: np.ndarray, geometry: Any) -> tuple[np.ndarray, np.ndarray]:
    """Panel-relative -> raw slab coordinates (both 0-based pixel centre)."""
    if geometry is None:
        if len(peaks) and np.any(peaks["panel"] != 0):
            raise ValueError("peaks on several panels need a geometry to place them in the slab")
        return peaks["fs"], peaks["ss"]
    min_fs = np.array([p.min_fs for p in geometry.panels], dtype=np.float64)
    min_ss = np.array([p.min_ss for p in geometry.panels], dtype=np.float64)
    return peaks["fs"] + min_fs[peaks["panel"]], peaks["ss"] + min_ss[peaks["panel"]]


def _slab(frame: Frame, geometry: Any) -> np.ndarray:
    geometry = frame.geometry or geometry
    if geometry is None:
        if len(frame.panels) != 1:
            raise ValueError(f"{frame.source} {frame.event}: copying a multi-panel frame into a "
                             "CXI stack needs a geometry")
        return frame.panels[0]
    return geometry.assemble_slab(frame.panels, fill=0)


def _can_link(results: Sequence[FrameResult]) -> bool:
    return all(r.frame.meta.get("h5_file") and r.frame.meta.get("h5_dataset")
               and os.path.exists(r.frame.meta["h5_file"]) for r in results)


def _write_vds(h5: h5py.File, results: Sequence[FrameResult]) -> None:
    """``/entry_1/data_1/data`` as a virtual dataset over the original frames: no pixel copied."""
    shapes, dtypes = [], []
    for r in results:
        with h5py.File(r.frame.meta["h5_file"], "r") as src:
            ds = src[r.frame.meta["h5_dataset"]]
            shapes.append(tuple(ds.shape))
            dtypes.append(ds.dtype)
    frame_shapes = {s[-2:] for s in shapes}
    if len(frame_shapes) != 1:
        raise ValueError(f"cannot stack frames of different shapes {sorted(frame_shapes)}")
    frame_shape = frame_shapes.pop()
    layout = h5py.VirtualLayout(shape=(len(results), *frame_shape), dtype=np.result_type(*dtypes))
    for row, (r, shape) in enumerate(zip(results, shapes)):
        source = h5py.VirtualSource(os.path.abspath(r.frame.meta["h5_file"]),
                                    r.frame.meta["h5_dataset"], shape=shape)
        index = r.frame.meta.get("h5_index")
        layout[row] = source[index] if len(shape) == 3 else source
    h5.create_virtual_dataset(DATA_PATH, layout, fillvalue=0)


def _write_copy(h5: h5py.File, results: Sequence[FrameResult], geometry: Any) -> None:
    first = _slab(results[0].frame, geometry)
    ds = h5.create_dataset(DATA_PATH, shape=(len(results), *first.shape), dtype=np.float32,
                           chunks=(1, *first.shape), compression="gzip", compression_opts=1)
    for row, r in enumerate(results):
        ds[row] = first if row == 0 else _slab(r.frame, geometry)


def write_cxi(path: str | os.PathLike[str], results: Sequence[FrameResult], geometry: Any = None,
              *, mode: str = "auto", max_peaks: int = DEFAULT_MAX_PEAKS) -> str:
    """Write one CXI file (images + peak table) atomically; returns the mode actually used.

    ``mode``: ``"vds"`` links to the original HDF5 frames, ``"copy"`` stores the pixels,
    ``"auto"`` links when every frame came from an HDF5 file that still exists.
    """
    if mode not in ("auto", "vds", "copy"):
        raise ValueError(f"mode must be auto, vds or copy, not {mode!r}")
    if not results:
        raise ValueError(f"{path}: nothing to write")
    used = mode if mode != "auto" else ("vds" if _can_link(results) else "copy")
    counts, columns = _peak_arrays(results, geometry, max_peaks)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            if used == "vds":
                _write_vds(h5, results)
            else:
                _write_copy(h5, results, geometry)
            grp = h5.create_group(PEAK_GROUP)
            grp.create_dataset("nPeaks", data=counts)
            for name, values in columns.items():
                grp.create_dataset(name, data=values, chunks=(1, values.shape[1]),
                                   compression="gzip", compression_opts=1)
            keys = h5.create_group(KEY_GROUP)
            keys.create_dataset("source", data=[r.frame.source for r in results],
                                dtype=h5py.string_dtype())
            keys.create_dataset("event", data=[r.frame.event for r in results],
                                dtype=h5py.string_dtype())
            keys.create_dataset("hit", data=np.array([r.hit for r in results], dtype=np.int8))
    return used


def write_cxi_geometry(cxi_path: str | os.PathLike[str], geometry: Any,
                       geom_path: str | os.PathLike[str] | None = None, *,
                       mask_file: str | os.PathLike[str] | None = None) -> Path:
    """Write the ``.geom`` indexamajig needs beside a CXI file (stack at dim0, peaks at result_1).

    Every panel is re-laid as ``%, ss, fs`` because that is how :func:`write_cxi` stores frames.
    A mask dataset that lived in the original data file is pointed at that file (``mask_file``),
    since the CXI file holds no copy of it.
    """
    from dataclasses import replace

    target = Path(geom_path) if geom_path is not None else Path(cxi_path).with_suffix(".geom")
    relaid = replace(geometry, panels=[replace(p, dims=["%", "ss", "fs"])
                                       for p in geometry.panels],
                     keys={k: v for k, v in geometry.keys.items()
                           if not re.fullmatch(r"dim\d+", k)})
    keys = {"data": DATA_PATH, "dim0": "%", "dim1": "ss", "dim2": "fs",
            "peak_list": PEAK_GROUP, "peak_list_type": "cxi"}
    if getattr(geometry, "mask", None) and not getattr(geometry, "mask_file", None) and mask_file:
        keys["mask_file"] = os.path.abspath(mask_file)
    write_text_atomic(target, relaid.to_text(**keys))
    return target


# --------------------------------------------------------------------------------------------
# the rolling writer


class CXIWriter:
    """A ``PeakWriter`` (see hookspecs): rolling CXI files ``<prefix>-NNNNN.cxi`` (+ ``.geom``).

    Results are buffered and written ``frames_per_file`` at a time; every file appears atomically,
    so a crash loses only the results still in the buffer, and :meth:`done_keys` reads the keys of
    finished files so a rerun skips them.
    """

    name = "cxi"
    _pattern = re.compile(r"-(\d{5})\.cxi$")

    def __init__(self, path: str | os.PathLike[str], geometry: Any = None, *,
                 frames_per_file: int = 1000, mode: str = "auto",
                 max_peaks: int = DEFAULT_MAX_PEAKS, write_geometry: bool = True) -> None:
        if isinstance(geometry, (str, os.PathLike)):
            from peaknet_xtal.formats.geometry import read_geometry

            geometry = read_geometry(geometry)
        path = Path(path)
        if path.suffix == ".cxi":
            self.directory, self.prefix = path.parent, path.stem
        else:
            self.directory, self.prefix = path, "peaks"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.geometry = geometry
        self.frames_per_file = max(1, int(frames_per_file))
        self.mode = mode
        self.max_peaks = max_peaks
        self.write_geometry = write_geometry
        self._buffer: list[FrameResult] = []
        self._next_index = self._first_free_index()
        self.files: list[Path] = []

    def finished_files(self) -> list[Path]:
        """Files completed by this or an earlier run, in order."""
        found = [p for p in self.directory.glob(f"{self.prefix}-*.cxi")
                 if self._pattern.search(p.name) and p.name[len(self.prefix)] == "-"]
        return sorted(found)

    def _first_free_index(self) -> int:
        indices = [int(self._pattern.search(p.name).group(1)) for p in self.finished_files()]
        return max(indices) + 1 if indices else 0

    def done_keys(self) -> set[tuple[str, str]]:
        """``(source, event)`` of every frame in a finished file."""
        keys: set[tuple[str, str]] = set()
        for path in self.finished_files():
            try:
                keys.update(read_cxi_peaks(path).keys)
            except FormatError:
                continue  # not one of ours: it will not be overwritten either
        return keys

    def write(self, result: FrameResult) -> None:
        self._buffer.append(result)
        if len(self._buffer) >= self.frames_per_file:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered results as the next file now."""
        if not self._buffer:
            return None
        target = self.directory / f"{self.prefix}-{self._next_index:05d}.cxi"
        geometry = self.geometry or self._buffer[0].frame.geometry
        if self.write_geometry and geometry is not None:  # first: a finished .cxi has its .geom
            write_cxi_geometry(target, geometry,
                               mask_file=self._buffer[0].frame.meta.get("h5_file"))
        write_cxi(target, self._buffer, geometry, mode=self.mode, max_peaks=self.max_peaks)
        self._buffer = []
        self._next_index += 1
        self.files.append(target)
        return target

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> CXIWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
