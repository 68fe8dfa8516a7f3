"""CXI/HDF5 images and CXI peak tables, in the layout ``indexamajig --peaks=cxi`` reads.

Reading: a stack ``(n_frames, ss, fs)`` with ``dim0 = %`` or a single 2-D frame, split into panels
by a CrystFEL geometry (or one whole-slab panel without one); with placeholders in the
geometry's ``data`` path (``/%/data``), one event per group that path matches, as CrystFEL
reads them (:func:`expand_data_paths`).  Each
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
With ``hits_only`` the frames it leaves out are recorded too (:func:`write_nonhits`), so a resumed
hit-finding run does not look at its blank frames again.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from peaknet_xtal.atomic import atomic_path, write_text_atomic
from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.geometry import HC_EV_A, MaskSpec
from peaknet_xtal.types import Frame, FrameResult, empty_peaks, event_index

log = logging.getLogger(__name__)

#: Where images are looked for when the geometry names no ``data`` path, in this order.
#: Where images are looked for without a geometry's ``data``: CXI's places, and ``/data``, a
#: plain stack as the simplest writers store it (an Eiger stream's stills; it needed -g)
DEFAULT_DATA_PATHS = ("/entry_1/data_1/data", "/data/data", "/entry_1/instrument_1/detector_1/data",
                      "/data")
#: Static masks looked for beside the data when the geometry names none (psocake writes this).
DEFAULT_MASK_PATHS = ("/entry_1/data_1/mask",)

# The CXI layout the project writes (peaknet2cxi, the Ray pipeline, peaknet-sim): one place.
#: Images, ``(n_frames, *slab)``: copied pixels or a virtual dataset over the input.
DATA_PATH = "/entry_1/data_1/data"
#: Good-pixel mask per frame (uint8, 1 = good; ``mask_good = 0x1`` in the geometry).
MASK_PATH = "/entry_1/data_1/mask"
#: The peak table indexamajig reads (``peak_list``, ``peak_list_type = cxi``).
PEAK_GROUP = "/entry_1/result_1"
#: Per-row identity of each written frame: lets a resumed run skip what is already done.
KEY_GROUP = "/entry_1/peaknet"
#: Photon energy of each frame in eV (``photon_energy = <this path>`` in the geometry).
PHOTON_ENERGY_PATH = f"{KEY_GROUP}/photon_energy_eV"
#: Camera length of each frame, copied from the input when its geometry names an HDF5 path.
CLEN_PATH = f"{KEY_GROUP}/clen"
#: The whole detector's shift (CrystFEL's ``detector_shift_x``/``_y``), where the geometry reads
#: it from the input per frame, copied beside it: ``{KEY_GROUP}/detector_shift_x`` and ``_y``.
SHIFT_KEYS = ("detector_shift_x", "detector_shift_y")
#: File attribute naming the geometry file (relative to the CXI file's folder).
GEOMETRY_ATTR = "peaknet_geometry"


def geometry_path(image_file: str | os.PathLike[str]) -> str | None:
    """The CrystFEL geometry that belongs to a CXI file, or None: the one its
    :data:`GEOMETRY_ATTR` names beside it (peaknet-sim and peaknet2cxi write it), else
    ``NAME.geom`` beside ``NAME.cxi``.  What dials.import (the project's dxtbx format) and
    peaknet2cxi read such a file with when no geometry is given."""
    try:
        with h5py.File(image_file, "r") as h5:
            named = h5.attrs.get(GEOMETRY_ATTR)
    except OSError:
        return None
    if isinstance(named, bytes):
        named = named.decode()
    candidates = []
    if named:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(image_file)), str(named)))
    candidates.append(os.path.splitext(os.fspath(image_file))[0] + ".geom")
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


#: Peak table width (Cheetah allocates in blocks of 2048; CrystFEL's peakfinder8 stops at 2048
#: peaks a panel, and indexamajig reads every peak a CXI table holds).
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
#: ``units`` attributes of the peak columns that have one (CrystFEL reads none of them; a reader
#: of the file should not have to guess that 1/d is in 1/Angstrom here and nm^-1 in streams)
PEAK_UNITS = {"peakXPosRaw": "pixel (0-based pixel centre, raw slab)",
              "peakYPosRaw": "pixel (0-based pixel centre, raw slab)",
              "peakTotalIntensity": "ADU", "peakMaximumValue": "ADU", "peakBackground": "ADU",
              "peakOneOverD": "1/angstrom"}


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
    mask_dataset: str | None = None  # the first mask read from this file (for display)
    masks: tuple[MaskSource, ...] = ()  # every mask the frames are read with
    #: with placeholders in the data path (``dataset`` is then the pattern): each frame's
    #: dataset, its index there (None for a 2-D dataset) and the placeholder values, in
    #: CrystFEL's order of events; empty otherwise
    frames: tuple[tuple[str, int | None, tuple[str, ...]], ...] = ()
    #: CrystFEL's event id of each of those frames (``tag_7//``)
    events: tuple[str, ...] = ()


@dataclass(frozen=True)
class MaskSource:
    """One bad pixel mask a reader applies: where it is, how its bits read, which panels it
    covers (None: every panel)."""

    file: str | None  # None: the image file itself
    dataset: str
    spec: MaskSpec
    panels: tuple[int, ...] | None = None


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


#: CrystFEL's placeholder in HDF5 paths (crystfel_geometry(5), "PANEL DATA LOCATIONS"): in a
#: ``data`` path it stands for the groups of one event each (``data = /%/data`` reads
#: ``/tag_1/data``, ``/tag_2/data``, ...), in a mask or beam-value path for the same values.
PLACEHOLDER = "%"


def substitute(pattern: str, values: Sequence[str]) -> str:
    """``pattern`` with its placeholders replaced by ``values`` in order, as CrystFEL does for
    data, mask and beam-value paths (a mask may have fewer placeholders than the data path: it
    takes the first values)."""
    pieces = pattern.split(PLACEHOLDER)
    if len(pieces) - 1 > len(values):
        raise ValueError(f"{pattern}: {len(pieces) - 1} placeholders but only {len(values)} "
                         "values")
    out = pieces[0]
    for value, piece in zip(values, pieces[1:], strict=False):
        out += value + piece
    return out


def expand_data_paths(h5: h5py.File, path: str, pattern: str
                      ) -> list[tuple[tuple[str, ...], str]]:
    """Every dataset matching a ``data`` path with placeholders, as (placeholder values,
    dataset path), in CrystFEL's order of events: a ``%`` component matches each member of its
    group in name order, the other components match literally, and only datasets at the end of
    the path count.  CrystFEL enumerates whole-component placeholders only (``/%/data``, not
    ``/tag_%/data``), so a placeholder inside a component is refused here rather than matching
    nothing."""
    parts = pattern.strip("/").split("/")
    for part in parts:
        if PLACEHOLDER in part and part != PLACEHOLDER:
            raise FormatError(path, f"the placeholder in {part!r} is part of a path component; "
                              "CrystFEL finds events only where '%' is a whole component "
                              "(e.g. /%/data)", dataset=pattern)
    found: list[tuple[tuple[str, ...], str]] = []

    def walk(group: h5py.Group, at: str, rest: list[str], values: tuple[str, ...]) -> None:
        part, last = rest[0], len(rest) == 1
        if part == PLACEHOLDER:
            names = sorted(group.keys(), key=lambda n: n.encode())  # HDF5's name index order
        else:
            names = [part] if part in group else []
        for name in names:
            try:
                obj = group.get(name)
            except (OSError, KeyError, RuntimeError):  # a broken link: not an event
                continue
            here = f"{at}/{name}"
            taken = values + ((name,) if part == PLACEHOLDER else ())
            if last and isinstance(obj, h5py.Dataset):
                found.append((taken, here))
            elif not last and isinstance(obj, h5py.Group):
                walk(obj, here, rest[1:], taken)

    walk(h5, "", parts, ())
    return found


def placeholder_event(values: Sequence[str], index: int | None) -> str:
    """CrystFEL's event id of a frame found through path placeholders: the values joined by
    ``/``, then ``//`` and the frame's index in a stacked dataset (``tag_7//``,
    ``run_1/tag_7//3``)."""
    return "/".join(values) + "//" + ("" if index is None else str(index))


def _data_path(h5: h5py.File, path: str, geometry: Any, data_path: str | None) -> str:
    wanted = data_path or (getattr(geometry, "data", None) if geometry is not None else None)
    if wanted:
        if PLACEHOLDER not in wanted:
            _dataset(h5, path, wanted)
        return wanted
    for candidate in DEFAULT_DATA_PATHS:
        if isinstance(h5.get(candidate), h5py.Dataset):
            return candidate
    found = _image_like(h5)
    hint = ("; image-like datasets here: " + ", ".join(f"{name} {shape} {dtype}"
                                                       for name, shape, dtype in found)
            + " (name one with a geometry's 'data' key, -g)" if found else "")
    raise FormatError(path, f"no image dataset found (looked for "
                            f"{', '.join(DEFAULT_DATA_PATHS)}){hint}")


def _image_like(h5: h5py.File, most: int = 5) -> list[tuple[str, tuple[int, ...], str]]:
    """Numeric datasets of two or more dimensions (name, shape, type), for an error that says
    which dataset a user may have meant (an Eiger file's ``/data``)."""
    found: list[tuple[str, tuple[int, ...], str]] = []

    def visit(name: str, obj: Any) -> None:
        if (len(found) < most and isinstance(obj, h5py.Dataset) and obj.ndim >= 2
                and obj.dtype.kind in "fiu"):
            found.append((f"/{name}", tuple(int(n) for n in obj.shape), str(obj.dtype)))

    try:
        h5.visititems(visit)
    except (OSError, KeyError, RuntimeError):  # a broken link: say what was found before it
        pass
    return found


def _mask_plan(h5: h5py.File, path: str, geometry: Any, mask_path: str | None,
               frame_shape: tuple[int, ...], n_frames: int, stacked: bool,
               values: tuple[str, ...] = ()) -> list[MaskSource]:
    """Every mask the frames of ``path`` are read with, each checked against the frames.

    The geometry's masks 0-7 (CrystFEL's ``maskN_*``; a pixel is bad when any mask says so),
    each on the panels that name it; ``mask_path`` (the caller's) replaces mask 0.  Mask 0
    without a dataset is at :data:`DEFAULT_MASK_PATHS`, and with no mask 0 at all the image
    file's own mask there is used when it has one (psocake writes it).  A dataset the geometry
    names that the image file lacks is warned about and skipped (CrystFEL would stop); one in
    a mask file must be there.  A geometry's mask with neither good nor bad bits masks no
    pixel, as in CrystFEL (both default to 0), with a warning.  Placeholders in a mask's
    location take the data path's ``values`` (those of the first event: the check is on its
    dataset)."""
    all_specs: list[tuple[MaskSpec, tuple[int, ...]]] = (
        geometry.mask_specs() if geometry is not None else [])
    n_panels = len(geometry.panels) if geometry is not None else 1
    bits = {"goodbits": getattr(geometry, "mask_good", None),
            "badbits": getattr(geometry, "mask_bad", None)}
    plan: list[MaskSource] = []
    if mask_path:
        plan.append(MaskSource(None, mask_path, MaskSpec(0, mask_path, **bits)))
        specs = [(spec, panels) for spec, panels in all_specs if spec.index != 0]
    else:
        specs = all_specs
        if not any(spec.index == 0 for spec, _ in specs):
            for candidate in DEFAULT_MASK_PATHS:
                if isinstance(h5.get(candidate), h5py.Dataset):
                    plan.append(MaskSource(None, candidate, MaskSpec(0, candidate, **bits)))
                    break
    for spec, panels in specs:
        if spec.data is None and spec.index != 0:
            continue  # zero bits and no location (the parser refuses anything else): no mask
        dataset = spec.data or DEFAULT_MASK_PATHS[0]
        covered = None if len(panels) == n_panels else panels
        if spec.goodbits is None and spec.badbits is None:
            _warn_bitless(geometry, spec, dataset)
            continue
        if spec.file is None and h5.get(_substituted(path, dataset, values)) is None:
            if spec.data is not None and (path, dataset) not in _MISSING_WARNED:
                # the geometry names a mask this file lacks: CrystFEL would stop; we go on
                _MISSING_WARNED.add((path, dataset))  # once: a file is inspected more than once
                log.warning("%s: no mask dataset %s (mask %d, named by the geometry %s); "
                            "reading the frames without it: only the geometry's other masks, "
                            "bad regions and flags mask pixels", path, dataset, spec.index,
                            getattr(geometry, "path", None) or "")
            continue
        plan.append(MaskSource(spec.file, dataset, spec, covered))
    for source in plan:
        name = _substituted(path, source.dataset, values)
        if source.file is None:
            check_mask_dataset(path, name, _dataset(h5, path, name), frame_shape, n_frames,
                               stacked)
        else:
            with _open_mask_file(source.spec, geometry) as other:
                check_mask_dataset(source.file, name, _dataset(other, source.file, name),
                                   frame_shape, n_frames, stacked)
    return plan


def _open_mask_file(spec: MaskSpec, geometry: Any) -> h5py.File:
    """The mask file a geometry's ``maskN_file`` names, open, or a FormatError naming it, the
    key and where a relative name was looked for (the image readers' one opening of it)."""
    assert spec.file is not None
    if not os.path.exists(spec.file):
        key = "mask_file" if spec.index == 0 else f"mask{spec.index}_file"
        where = ("" if os.path.isabs(spec.file) else  # only a relative name is looked for
                 f"; a relative name is taken from the working directory, {os.getcwd()}, as "
                 "CrystFEL takes it")
        raise FormatError(spec.file, f"mask file not found (named by {key} in the geometry "
                          f"{getattr(geometry, 'path', None) or ''}{where})")
    return open_h5(spec.file)


#: (image file, mask dataset) already warned about as missing
_MISSING_WARNED: set[tuple[str, str]] = set()
#: (geometry, mask number) already warned about by :func:`_warn_bitless`
_BITLESS_WARNED: set[tuple[str, int]] = set()


def _warn_bitless(geometry: Any, spec: MaskSpec, dataset: str) -> None:
    """Once per geometry and mask: a mask without ``maskN_goodbits``/``maskN_badbits`` (nor
    ``mask_good``/``mask_bad`` for mask 0) marks no pixel bad in CrystFEL (crystfel_geometry(5):
    bad unless every good bit is set, or if any bad bit is), so none here either: guessing
    which values mean good would mask every good pixel of a 0-is-good mask."""
    where = str(getattr(geometry, "path", None) or "the geometry")
    if (where, spec.index) in _BITLESS_WARNED:
        return
    _BITLESS_WARNED.add((where, spec.index))
    good, bad = (("mask_good", "mask_bad") if spec.index == 0
                 else (f"mask{spec.index}_goodbits", f"mask{spec.index}_badbits"))
    log.warning("%s: mask %d (%s) gives neither %s nor %s, so it marks no pixel bad (as in "
                "CrystFEL, where both default to 0); add %s = 0x1 if 1 marks a good pixel, or "
                "%s = 0xffff if any nonzero value marks a bad one", where, spec.index, dataset,
                good, bad, good, bad)


def mask_file_masks(geometry: Any, image: str, shape: tuple[int, ...]) -> list[list[np.ndarray]]:
    """Per mask of ``geometry`` that lies in a mask file (``maskN_file``), the good pixels of
    each panel, for an image that is not HDF5 (a CBF file read through the geometry): its one
    array has ``shape``, and each mask file's dataset must be one static mask of that shape.
    A mask that the geometry places in the image file itself cannot be read from such a file:
    it is warned about once and skipped, as a mask dataset an HDF5 image lacks is
    (:func:`_mask_plan`)."""
    n_panels = len(geometry.panels)
    out: list[list[np.ndarray]] = []
    for spec, panels in geometry.mask_specs():
        if spec.data is None and spec.file is None:
            continue  # no location: mask 0's default lies in an HDF5 image file
        dataset = spec.data or DEFAULT_MASK_PATHS[0]
        if spec.goodbits is None and spec.badbits is None:
            _warn_bitless(geometry, spec, dataset)
            continue
        if spec.file is None:
            if (image, dataset) not in _MISSING_WARNED:
                _MISSING_WARNED.add((image, dataset))
                log.warning("%s: the geometry %s places mask %d in the image file (%s), which "
                            "is not HDF5; reading the image without it (give the mask in an "
                            "HDF5 file with mask%s_file)", image,
                            getattr(geometry, "path", None) or "", spec.index, dataset,
                            "" if spec.index == 0 else spec.index)
            continue
        with _open_mask_file(spec, geometry) as h5:
            mask = _dataset(h5, spec.file, dataset)
            check_mask_dataset(spec.file, dataset, mask, shape, 1, False)
            raw = np.asarray(mask[()])
        covered = None if len(panels) == n_panels else panels
        out.append(mask_good(raw, spec, covered, geometry))
    return out


def _substituted(path: str, pattern: str, values: tuple[str, ...]) -> str:
    """:func:`substitute`, with a location holding more placeholders than the data path (which
    gives no value for them) refused naming the file."""
    try:
        return substitute(pattern, values)
    except ValueError:
        raise FormatError(path, f"{pattern} has more '%' placeholders than the data path "
                          f"gives values for ({len(values)})", dataset=pattern) from None


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
    if any(h < n for h, n in zip(have, need, strict=False)):
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
                                  "HDF5 library cannot decode (hdf5plugin, a dependency, "
                                  "brings bitshuffle, LZ4, Blosc, Zstd and others; for this one "
                                  "install its HDF5 plugin and set HDF5_PLUGIN_PATH)",
                                  dataset=name)
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
    if PLACEHOLDER in name:
        return _inspect_events(h5, path, geometry, name, mask_path)
    ds = _dataset(h5, path, name)
    check_image_dataset(path, name, ds)
    shape = tuple(int(n) for n in ds.shape)
    _check_shape(path, name, shape, geometry)
    stacked = len(shape) == _frame_ndim(geometry) + 1
    n_frames = shape[0] if stacked else 1
    frame_shape = shape[1:] if stacked else shape
    plan = _mask_plan(h5, path, geometry, mask_path, frame_shape, n_frames, stacked)
    mask_name = next((m.dataset for m in plan if m.file is None), None)
    return CXIInfo(path=path, dataset=name, n_frames=n_frames, frame_shape=frame_shape,
                   dtype=ds.dtype, stacked=stacked, mask_dataset=mask_name, masks=tuple(plan))


def _inspect_events(h5: h5py.File, path: str, geometry: Any, pattern: str,
                    mask_path: str | None) -> CXIInfo:
    """A file whose events are the datasets a ``data`` path with placeholders matches
    (:func:`expand_data_paths`): each one frame, or a stack of frames, of one shape."""
    matches = expand_data_paths(h5, path, pattern)
    if not matches:
        raise FormatError(path, f"no dataset matches the data path {pattern} (each '%' stands "
                          "for the name of a group, as CrystFEL reads it)", dataset=pattern)
    frames: list[tuple[str, int | None, tuple[str, ...]]] = []
    first: tuple[str, tuple[int, ...], int, bool, tuple[str, ...], np.dtype] | None = None
    for values, name in matches:
        ds = _dataset(h5, path, name)
        check_image_dataset(path, name, ds)
        shape = tuple(int(n) for n in ds.shape)
        _check_shape(path, name, shape, geometry)
        stacked = len(shape) == _frame_ndim(geometry) + 1
        frame_shape = shape[1:] if stacked else shape
        if first is None:
            first = (name, frame_shape, shape[0] if stacked else 1, stacked, values, ds.dtype)
        elif frame_shape != first[1]:
            raise FormatError(path, f"frames of {name} are {'x'.join(map(str, frame_shape))} "
                              f"but those of {first[0]} are {'x'.join(map(str, first[1]))}: "
                              "the events of one file must share a frame shape",
                              dataset=pattern)
        frames.extend((name, index, values)
                      for index in (range(shape[0]) if stacked else [None]))
    assert first is not None
    if not frames:
        raise FormatError(path, f"every dataset matching {pattern} is empty (0 frames)",
                          dataset=pattern)
    plan = _mask_plan(h5, path, geometry, mask_path, first[1], first[2], first[3], first[4])
    mask_name = next((m.dataset for m in plan if m.file is None), None)
    return CXIInfo(path=path, dataset=pattern, n_frames=len(frames), frame_shape=first[1],
                   dtype=first[5], stacked=first[3], mask_dataset=mask_name, masks=tuple(plan),
                   frames=tuple(frames),
                   events=tuple(placeholder_event(v, i) for _, i, v in frames))


def _split(slab: np.ndarray, geometry: Any) -> list[np.ndarray]:
    if geometry is None:
        return [slab]
    return [np.ascontiguousarray(p) for p in geometry.split_slab(slab)]


def mask_good(raw: np.ndarray, spec: MaskSpec, panels: tuple[int, ...] | None,
              geometry: Any) -> list[np.ndarray]:
    """Per panel, the good pixels one mask (:class:`MaskSource`) gives a frame: ``raw`` in the
    slab layout read by ``spec``'s bits; a mask of some ``panels`` only leaves the others' pixels
    all good.  The one reading of a mask, the library's readers' and the DIALS format's."""
    good = _split(spec.good(raw), geometry)
    if panels is None:
        return good
    return [g if i in panels else np.ones(g.shape, dtype=bool) for i, g in enumerate(good)]


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


FLAG_KEYS = ("flag_lessthan", "flag_morethan", "flag_equal")


def panel_flags(geometry: Any) -> list[dict[str, float]] | None:
    """Per panel, CrystFEL's value flags (``flag_lessthan`` etc., its own value or the global
    default); None when no panel has any."""
    if geometry is None:
        return None
    flags = []
    for panel in geometry.panels:
        values = {}
        for key in FLAG_KEYS:
            raw = panel.extra.get(key, geometry.keys.get(key))
            if raw is not None:
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise FormatError(geometry.path, f"{key} = {raw!r} is not a number") from None
        flags.append(values)
    return flags if any(flags) else None


def flagged_ok(values: np.ndarray, flags: dict[str, float]) -> np.ndarray:
    """True = good after CrystFEL's value flags (strict comparisons, as its manual says)."""
    good = np.ones(values.shape, dtype=bool)
    if "flag_lessthan" in flags:
        good &= ~(values < flags["flag_lessthan"])
    if "flag_morethan" in flags:
        good &= ~(values > flags["flag_morethan"])
    if "flag_equal" in flags:
        good &= values != flags["flag_equal"]
    return good


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
        #: the image datasets read, by path (one, or one per event with placeholders)
        self._data: dict[str, h5py.Dataset] = {}
        #: with placeholders, frames per image dataset and whether it is a stack (its masks and
        #: beam values hold one value, or one per frame of the stack)
        self._counts: dict[str, int] = {}
        self._stacked: dict[str, bool] = {}
        for name, within, _ in self.info.frames:
            self._counts[name] = self._counts.get(name, 0) + 1
            self._stacked[name] = within is not None
        self._mask_files: dict[str, h5py.File] = {}
        #: (file, location, bits, panels covered or None) of each mask; files opened once
        self._masks: list[tuple[h5py.File, str, MaskSpec, tuple[int, ...] | None]] = []
        #: mask datasets opened (and checked against the frames), by (file, dataset)
        self._mask_data: dict[tuple[str, str], h5py.Dataset] = {}
        try:
            for source in self.info.masks:
                if source.file is None:
                    where = self.h5
                else:
                    if source.file not in self._mask_files:
                        self._mask_files[source.file] = open_h5(source.file)
                    where = self._mask_files[source.file]
                self._masks.append((where, source.dataset, source.spec, source.panels))
        except Exception:
            self.close()
            raise
        self._static_masks = geometry.bad_pixel_masks() if geometry is not None else None
        self._flags = panel_flags(geometry)
        self._beam_warned = False
        self._event_numbers: dict[str, int] | None = None  # placeholder events, by id

    def _locate(self, index: int) -> tuple[str, int | None, tuple[str, ...]]:
        """Frame ``index`` of the file: its dataset, its index there, its placeholder values."""
        if not 0 <= index < self.info.n_frames:
            raise IndexError(f"{self.path}: frame {index} out of range 0..{self.info.n_frames - 1}")
        if self.info.frames:
            return self.info.frames[index]
        return self.info.dataset, (index if self.info.stacked else None), ()

    def index_of(self, event: str | None) -> int:
        """The frame an event names: ``//N`` (a stack's frame N), ``//`` (a file's one frame) or,
        with placeholders in the data path, CrystFEL's ``tag_7//`` / ``tag_7//N``; a
        FormatError when it names none (a number past the end is the reader's IndexError)."""
        if self.info.events:
            if self._event_numbers is None:
                self._event_numbers = {e: i for i, e in enumerate(self.info.events)}
            index = self._event_numbers.get((event or "").strip(), -1)
            if index < 0:
                raise FormatError(self.path, f"no event {event!r} (this file's events are named "
                                  f"as {self.info.events[0]!r}, through {self.info.dataset})")
            return index
        index = event_index(event)
        if index < 0:
            raise FormatError(self.path, f"event {event!r} does not name a frame number")
        return index

    def _dataset_at(self, index: int) -> tuple[h5py.Dataset, int | None, tuple[str, ...]]:
        name, within, values = self._locate(index)
        if name not in self._data:
            self._data[name] = self.h5[name]
        return self._data[name], within, values

    def _energy_dataset(self) -> h5py.Dataset | None:
        """The per-frame beam value the geometry points at (``photon_energy = /path [eV|keV]``,
        ``wavelength = /path m|A``, ``electron_voltage = /path V|kV``), as CrystFEL reads it;
        without it 1/d and an ``adu_per_eV`` gain stay unknown.  A location with placeholders
        is looked up per frame (:meth:`_beam_value`)."""
        path = getattr(self.geometry, "photon_energy_path", None)
        if not path or PLACEHOLDER in path:
            return None
        if path not in self.h5 or not isinstance(self.h5[path], h5py.Dataset):
            log.warning("%s: no photon energy dataset %s (named by the geometry)", self.path, path)
            return None
        energy = self.h5[path]
        if energy.size not in (1, self.info.n_frames):
            raise FormatError(self.path, f"{energy.size} photon energies for "
                              f"{self.info.n_frames} frames", dataset=path)
        return energy

    def _beam_value(self, index: int) -> tuple[float, str] | None:
        """The geometry's beam value for frame ``index`` and the dataset it came from: one value
        for all frames, one per frame of the file, or, at a location with placeholders, the
        event's own (one value, or one per frame of its stack)."""
        if self._energy is not None:
            energy = self._energy
            value = energy[()] if energy.size == 1 else energy[index]
            return float(np.ravel(value)[0]), energy.name
        pattern = getattr(self.geometry, "photon_energy_path", None)
        if not pattern or PLACEHOLDER not in pattern:
            return None
        data_name, within, values = self._locate(index)
        name = _substituted(self.path, pattern, values)
        energy = self.h5.get(name)
        if not isinstance(energy, h5py.Dataset):
            if not self._beam_warned:
                self._beam_warned = True
                log.warning("%s: no photon energy dataset %s (named by the geometry as %s)",
                            self.path, name, pattern)
            return None
        if energy.size == 1:
            return float(np.ravel(energy[()])[0]), name
        if within is not None and energy.size == self._counts.get(data_name, 1):
            return float(np.ravel(energy[within])[0]), name
        raise FormatError(self.path, f"{energy.size} photon energies for "
                          f"{self._counts.get(data_name, 1)} frame(s) of {data_name}",
                          dataset=name)

    def wavelength_A(self, index: int) -> float | None:
        """The frame's wavelength from the geometry's beam dataset, converted from the unit
        the geometry gives it (a wavelength in m or A, an energy in eV or keV, an electron
        voltage in V or kV)."""
        found = self._beam_value(index)
        if found is None:
            return None
        value, name = found
        energy = self.geometry.photon_energy_eV_of(value)
        if not np.isfinite(energy) or energy <= 0:
            unit = getattr(self.geometry, "photon_energy_path_unit", None) or "eV"
            raise FormatError(self.path, f"beam value {value} {unit} of frame {index} is not "
                              "positive", dataset=name)
        return HC_EV_A / energy

    def slab(self, index: int) -> np.ndarray:
        data, within, _ = self._dataset_at(index)
        try:
            raw = data[within] if within is not None else data[()]
        except (OSError, RuntimeError) as exc:  # truncated file, missing VDS source
            raise FormatError(self.path, f"cannot read frame {index} ({exc})",
                              dataset=data.name) from exc
        return np.asarray(raw, dtype=np.float32)

    def _mask_dataset(self, where: h5py.File, name: str, data_name: str) -> h5py.Dataset:
        """A mask dataset, checked against the frames of ``data_name`` when first opened (each
        event's own mask, with placeholders, is checked as it comes)."""
        key = (where.filename, name)
        if key not in self._mask_data:
            mask = _dataset(where, where.filename, name)
            check_mask_dataset(where.filename, name, mask, self.info.frame_shape,
                               self._counts.get(data_name, self.info.n_frames),
                               self._stacked.get(data_name, self.info.stacked))
            self._mask_data[key] = mask
        return self._mask_data[key]

    def masks(self, index: int, panels: Sequence[np.ndarray] | None = None
              ) -> list[np.ndarray] | None:
        pieces: list[list[np.ndarray]] = []
        if panels is not None and self._flags:
            pieces.append([flagged_ok(p, f) for p, f in zip(panels, self._flags, strict=False)])
        data_name, within, values = self._locate(index)
        for where, location, spec, covered in self._masks:
            mask = self._mask_dataset(where, _substituted(self.path, location, values), data_name)
            raw = (mask[within if within is not None else index]
                   if mask.ndim == len(self.info.frame_shape) + 1 else mask[()])
            pieces.append(mask_good(np.asarray(raw), spec, covered, self.geometry))
        if self._static_masks is not None:
            pieces.append(list(self._static_masks))
        if not pieces:
            return None
        out = [m.copy() for m in pieces[0]]
        for extra in pieces[1:]:
            for m, e in zip(out, extra, strict=False):
                m &= e
        return out

    def frame(self, index: int) -> Frame:
        from peaknet_xtal.finding.sanitise import implied_dtype

        wavelength = self.wavelength_A(index)
        panels = _split(self.slab(index), self.geometry)
        name, within, values = self._locate(index)
        data = self._dataset_at(index)[0]
        located = [path for path in (getattr(self.geometry, "camera_length_path", None),
                                     *header_shifts(self.geometry).values()) if path]
        if self.info.frames:
            event = self.info.events[index]
        else:
            event = f"//{index}" if self.info.stacked else "//"
        return Frame(
            panels=panels,
            masks=self.masks(index, panels),
            source=self.path,
            event=event,
            serial=index,
            geometry=self.geometry,
            # the path the frame was read by in this file: a dataset reached through an
            # external link (a NeXus master's data) names itself inside the other file
            meta={"h5_file": self.path, "h5_dataset": name, "h5_index": within,
                  "slab_shape": self.info.frame_shape,
                  # placeholder values (and the frame's place in the file) for what reads the
                  # file again: the CXI writer's masks, a camera length at a location with '%'
                  **({"h5_placeholders": list(values), "h5_frame": index} if values else {}),
                  **({} if wavelength is None else {"wavelength_A": wavelength}),
                  # a camera length or detector shift the geometry reads from this file,
                  # read once here
                  **({"header_read": {path.split()[0]: _value_in(self.h5, path, values, within)
                                      for path in located}}
                     if located else {}),
                  # the stored type: integer data mark gaps and bad pixels by it
                  # (finding.sanitise), and slab() makes frames float32; float data of
                  # whole numbers mark them as the type they imply, as every other entry
                  # point reads them (a float64 copy of an Eiger stack, 65535.0 in its gaps:
                  # 480 false peaks a frame along them here, none through the Python API)
                  "dtype": (str(data.dtype) if data.dtype.kind != "f"
                            else implied_dtype(panels) or str(data.dtype))},
        )

    def close(self) -> None:
        self.h5.close()
        for other in getattr(self, "_mask_files", {}).values():
            other.close()


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


def read_cxi_event(path: str | os.PathLike[str], event: str | None, geometry: Any = None
                   ) -> Frame:
    """One frame by its event (``//N``, ``//``, or a placeholder file's ``tag_7//``: what a
    CrystFEL stream's ``Event:`` line says); a number past the end is an IndexError."""
    reader = _Reader(os.fspath(path), geometry, None, None)
    try:
        return reader.frame(reader.index_of(event))
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
        self._options: dict[str, Any] = {"data_path": data_path, "mask_path": mask_path}
        self.info = inspect_cxi(self.path, geometry, **self._options)
        self._reader: _Reader | None = None

    def __len__(self) -> int:
        return self.info.n_frames

    def __iter__(self) -> Iterator[Frame]:
        return iter_cxi_frames(self.path, self.geometry, **self._options)

    def frame_at(self, event: str) -> Frame:
        """Random access by event (``//N`` is frame N; with placeholders in the data path,
        CrystFEL's ``tag_7//`` or ``tag_7//N``: ``_Reader.index_of``); the file stays open until
        ``close``."""
        if self._reader is None:
            self._reader = _Reader(self.path, self.geometry, **self._options)
        index = self._reader.index_of(event)
        try:
            return self._reader.frame(index)
        except IndexError as exc:
            raise FormatError(self.path, f"event {event!r}: {exc}") from exc

    def close(self) -> None:
        """Closes the file ``frame_at`` keeps open (iterations close their own)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None


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
        if len(n_peaks) and n_peaks.min() < 0:
            row = int(np.argmin(n_peaks))
            raise FormatError(path, f"nPeaks of frame {row} is {int(n_peaks[row])}: a peak count "
                              "cannot be negative", dataset=f"{group}/nPeaks")
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
    return list(zip(sources, events, strict=False))


def peak_columns(results: Sequence[FrameResult], geometry: Any,
                 max_peaks: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pack per-frame peak tables into CrystFEL's (n_frames, max_peaks) float32 columns, in the
    raw coordinates of the stored layout (:func:`_stored_layout`)."""
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
        raw_fs, raw_ss = _to_raw(peaks, _stored_layout(result.frame, geometry))
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
    """The frame's pixels in ``geometry``'s layout (the stored one, :func:`_stored_layout`)."""
    if geometry is None:
        if len(frame.panels) != 1:
            raise ValueError(f"{frame.source} {frame.event}: copying a multi-panel frame into a "
                             "CXI stack needs a geometry")
        return frame.panels[0]
    return geometry.assemble_slab(frame.panels, fill=0)


def _mask_slab(frame: Frame, geometry: Any, shape: tuple[int, ...],
               masks_in: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The frame's good-pixel mask (1 = good) in the stored frame layout; 0 outside panels."""
    masks = [np.asarray(m, dtype=np.uint8)
             for m in (masks_in if masks_in is not None else frame.masks_or_ones())]
    if geometry is None:
        small = masks[0]
    else:
        small = geometry.assemble_slab(masks, fill=0).astype(np.uint8)
    if small.shape == shape:
        return small
    out = np.zeros(shape, dtype=np.uint8)  # linked frames may be larger than the geometry's slab
    out[tuple(slice(0, n) for n in small.shape)] = small
    return out


def _usable(panels: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None,
            dtype: Any) -> list[np.ndarray]:
    """The pixels the finder used (True = good): the input's masks less what it masked where
    frames enter it (``finding.sanitise``: non-finite and absurd values, the values integer
    data mark gaps with, such as 65535 in uint16 Eiger frames).  Stored as the CXI mask, so
    that indexamajig and peaknet-integrate do not read a module gap as 65535 counts."""
    from peaknet_xtal.finding.sanitise import sanitise_frame

    return sanitise_frame(panels, masks, dtype)[1]


def _stored_layout(frame: Frame, geometry: Any) -> Any:
    """The geometry of a frame as a CXI file here stores it: the frame's own (else the
    writer's), with stacked modules laid out as one slab (``Geometry.as_slab``: CrystFEL's CXI
    peak reader places peaks by slab position alone)."""
    geometry = frame.geometry or geometry
    return None if geometry is None else geometry.as_slab()


def _linkable(result: FrameResult) -> bool:
    meta = result.frame.meta
    return bool(meta.get("h5_file") and meta.get("h5_dataset")
                and os.path.exists(meta["h5_file"]))


def _can_link(results: Sequence[FrameResult]) -> bool:
    return all(_linkable(r) for r in results)


def frame_photon_energy_eV(frame: Frame, geometry: Any = None) -> float:
    """The photon energy of one frame: its own (per-frame HDF5 value, dxtbx beam), else the
    geometry's; NaN when nothing says."""
    wavelength = frame.meta.get("wavelength_A")
    if not wavelength:
        panels = frame.meta.get("panels") or [{}]
        wavelength = panels[0].get("wavelength_A") if isinstance(panels[0], dict) else None
    if wavelength:
        return HC_EV_A / float(wavelength)
    geometry = frame.geometry or geometry
    energy = getattr(geometry, "photon_energy_eV", None)
    return float(energy) if energy else float("nan")


def header_shifts(geometry: Any) -> dict[str, str]:
    """The detector shifts a geometry reads from the data file (``detector_shift_x =
    /LCLS/shift_x mm``): key -> location with its unit, as the line gives them.  A number
    (``1.5 mm``) is no location: CrystFEL takes a value that parses as a number as the number."""
    keys = getattr(geometry, "keys", None) or {}
    shifts = {}
    for key in SHIFT_KEYS:
        value = str(keys.get(key, "")).strip()
        if not value:
            continue
        try:
            float(value.split()[0])
        except ValueError:
            shifts[key] = value
    return shifts


def _frame_value(frame: Frame, location: str) -> float:
    """The value the source file holds at a geometry's ``location`` (the camera
    length, a detector shift) for this frame (NaN if the file or the dataset is missing); its
    unit is the geometry's.  The reader stores it in the frame's meta (``header_read``) while
    its file is open, so the engine (for 1/d), the stream chunk and this writer take one read;
    a frame made elsewhere is read here."""
    read, where = frame.meta.get("header_read"), location.split()[0]
    if isinstance(read, Mapping) and where in read:
        return float(read[where])
    source = frame.meta.get("h5_file")
    if not source or not os.path.exists(source):
        return float("nan")
    with h5py.File(source, "r") as h5:
        return _value_in(h5, location, frame.meta.get("h5_placeholders") or (),
                         frame.meta.get("h5_index"))


def _value_in(h5: h5py.File, location: str, placeholders: Sequence[str],
              index: int | None) -> float:
    """The value at ``location`` in an open file for the frame at ``index`` of its stack (a
    scalar serves every frame), NaN where there is none."""
    try:  # a location with placeholders takes the frame's own values (its event's group)
        path = substitute(location.split()[0], placeholders)
    except ValueError:
        return float("nan")
    ds = h5.get(path)
    if not isinstance(ds, h5py.Dataset):
        return float("nan")
    values = np.ravel(ds[()])
    if values.size == 1:
        return float(values[0])
    return float(values[index]) if index is not None and index < values.size else float("nan")


class CXIWriteError(OSError):
    """A CXI file HDF5 could not write (a full disk, a quota, a file size limit), with the
    ``errno`` HDF5's driver reported where it gave one.  After it, HDF5 keeps the dropped file
    in its own tables: a command that meets one should not let the interpreter's shutdown
    flush it again (``peaknet2cxi`` leaves at once; HDF5 crashed there)."""

    @classmethod
    def of(cls, path: Path, exc: BaseException) -> CXIWriteError:
        code = getattr(exc, "errno", None)
        if not code:
            found = re.search(r"errno = (\d+)", str(exc))
            code = int(found.group(1)) if found else None
        text = f"cannot write {path}: {' '.join(str(exc).split())}"
        return cls(code, text) if code else cls(text)


class _CXIFile:
    """One CXI file being written frame by frame under a temporary name (constant memory).

    Pixels (copy mode), masks, peak rows, photon energies and keys go to disk as each frame
    arrives; in ``vds`` mode only where each frame lives is remembered, and the virtual dataset
    is laid out when the file is finished.  The file appears under its name only then.
    """

    def __init__(self, path: Path, geometry: Any, mode: str, max_peaks: int,
                 geometry_name: str | None = None,
                 settings: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.geometry = geometry
        self.settings = settings
        self.mode = mode
        self.max_peaks = max(1, int(max_peaks))
        self.geometry_name = geometry_name
        self.n = 0
        self.frame_shape: tuple[int, ...] | None = None
        #: (file, dataset, frame index, shape, stacked modules or None) of each linked frame
        self._sources: list[tuple[str, str, Any, tuple[int, ...], Any]] = []
        self._dtypes: list[np.dtype] = []
        self._shapes: dict[tuple[str, str], tuple[tuple[int, ...], np.dtype]] = {}
        self._atomic = atomic_path(self.path)
        self.h5 = h5py.File(self._atomic.__enter__(), "w")
        self._ds: dict[str, h5py.Dataset] = {}
        self._warned: set[str] = set()
        self._readers: dict[tuple[str, str], _Reader] = {}
        #: the input files of the frames written (:data:`INPUTS_ATTR`), each as first read
        self._inputs: dict[str, list[Any]] = {}

    # ---- what a file can hold ---------------------------------------------------------------

    def _source_shape(self, result: FrameResult) -> tuple[tuple[int, ...], np.dtype]:
        meta = result.frame.meta
        key = (meta["h5_file"], meta["h5_dataset"])
        if key not in self._shapes:
            with h5py.File(key[0], "r") as src:
                ds = src[key[1]]
                self._shapes[key] = (tuple(int(n) for n in ds.shape), ds.dtype)
        return self._shapes[key]

    def _frame_shape_of(self, result: FrameResult) -> tuple[int, ...]:
        source = result.frame.geometry or self.geometry
        if self.mode == "vds" and not getattr(source, "stacked", False):
            shape, _ = self._source_shape(result)
            return shape[1:] if result.frame.meta.get("h5_index") is not None else shape
        if source is not None:
            return tuple(source.as_slab().slab_shape)
        return tuple(result.frame.panels[0].shape)

    def accepts(self, result: FrameResult) -> bool:
        """False when the frame cannot join this file (not linkable, or another frame shape)."""
        if self.mode == "vds" and not _linkable(result):
            return False
        return self.frame_shape is None or self._frame_shape_of(result) == self.frame_shape

    # ---- writing ----------------------------------------------------------------------------

    def _create(self, shape: tuple[int, ...]) -> None:
        h5, chunk = self.h5, (1, *shape)
        if self.mode == "copy":
            # HDF5's built-in shuffle before deflate (every HDF5 reader, CrystFEL's included,
            # has both): measured on one frame each, deflate alone against shuffled, write /
            # read ms and size: real CSPAD 121 / 41 ms, 31 % against 90 / 34 ms, 23 %; real
            # Pilatus 6M 277 / 121 ms, 21 % against 201 / 94 ms, 16 %; a simulated ePix10k2M hit
            # 268 / 44 ms, 92 % against 188 / 32 ms, 84 %
            self._ds["data"] = h5.create_dataset(DATA_PATH, shape=(0, *shape),
                                                 maxshape=(None, *shape), dtype=np.float32,
                                                 chunks=chunk, shuffle=True, compression="gzip",
                                                 compression_opts=1)
        self._ds["mask"] = h5.create_dataset(MASK_PATH, shape=(0, *shape), maxshape=(None, *shape),
                                             dtype=np.uint8, chunks=chunk, compression="gzip",
                                             compression_opts=1)
        grp = h5.create_group(PEAK_GROUP)
        self._ds["nPeaks"] = grp.create_dataset("nPeaks", shape=(0,), maxshape=(None,),
                                                dtype=np.int32, chunks=(1024,))
        for name in PEAK_COLUMNS:
            self._ds[name] = grp.create_dataset(name, shape=(0, self.max_peaks),
                                                maxshape=(None, None), dtype=np.float32,
                                                chunks=(1, self.max_peaks), compression="gzip",
                                                compression_opts=1)
            if name in PEAK_UNITS:
                self._ds[name].attrs["units"] = PEAK_UNITS[name]
        keys = h5.require_group(KEY_GROUP)
        for name in ("source", "event"):
            self._ds[name] = keys.create_dataset(name, shape=(0,), maxshape=(None,),
                                                 dtype=h5py.string_dtype(), chunks=(256,))
        self._ds["hit"] = keys.create_dataset("hit", shape=(0,), maxshape=(None,), dtype=np.int8,
                                              chunks=(1024,))
        self._ds["energy"] = h5.create_dataset(PHOTON_ENERGY_PATH, shape=(0,), maxshape=(None,),
                                               dtype=np.float64, chunks=(1024,))
        if getattr(self.geometry, "camera_length_path", None):
            self._ds["clen"] = h5.create_dataset(CLEN_PATH, shape=(0,), maxshape=(None,),
                                                 dtype=np.float64, chunks=(1024,))
        for key in header_shifts(self.geometry):
            self._ds[key] = h5.create_dataset(f"{KEY_GROUP}/{key}", shape=(0,),
                                              maxshape=(None,), dtype=np.float64, chunks=(1024,))

    def add(self, result: FrameResult) -> None:
        frame = result.frame
        shape = self._frame_shape_of(result)
        if self.frame_shape is None:
            self.frame_shape = shape
            self._create(shape)
        row = self.n
        for ds in self._ds.values():
            ds.resize(row + 1, axis=0)
        layout = _stored_layout(frame, self.geometry)
        if self.mode == "copy":
            self._ds["data"][row] = _slab(frame, layout)
        else:
            source_shape, dtype = self._source_shape(result)
            source = frame.geometry or self.geometry
            self._sources.append((os.path.abspath(frame.meta["h5_file"]),
                                  frame.meta["h5_dataset"], frame.meta.get("h5_index"),
                                  source_shape,
                                  source.stacked_blocks() if source is not None and source.stacked
                                  else None))
            self._dtypes.append(dtype)
        masks: list[np.ndarray] | None
        if frame.panels:
            masks = _usable(frame.panels, frame.masks, frame.meta.get("dtype"))
        elif frame.masks is None and _linkable(result):
            masks = self._linked_masks(frame)  # the pipeline sends linked frames without pixels
        else:
            masks = frame.masks
        self._ds["mask"][row] = _mask_slab(frame, layout, shape, masks)
        peaks = result.peaks
        n = len(peaks)
        width = self._ds["peakXPosRaw"].shape[1]
        if n > width:  # grow in whole blocks of max_peaks, as Cheetah does
            width = -(-n // self.max_peaks) * self.max_peaks
            for name in PEAK_COLUMNS:
                self._ds[name].resize(width, axis=1)
        self._ds["nPeaks"][row] = n
        if n:
            _, columns = peak_columns([result], self.geometry, width)
            for cxi_name, values in columns.items():
                self._ds[cxi_name][row] = values[0]
        self._ds["source"][row] = frame.source
        self._ds["event"][row] = frame.event
        remember_input(self._inputs, frame.source)
        self._ds["hit"][row] = int(result.hit)
        energy = frame_photon_energy_eV(frame, self.geometry)
        self._ds["energy"][row] = energy
        if not np.isfinite(energy):
            self._warn_once("energy", f"{frame.source} {frame.event}: no photon energy known "
                            f"(neither the input nor the geometry gives one); {self.path.name} "
                            f"stores NaN at {PHOTON_ENERGY_PATH}, which indexamajig cannot use")
        if "clen" in self._ds:
            clen = _frame_value(frame, self.geometry.camera_length_path)
            self._ds["clen"][row] = clen
            if not np.isfinite(clen):
                self._warn_once("clen", f"{frame.source}: no camera length at "
                                f"{self.geometry.camera_length_path} (the geometry's clen); "
                                f"{self.path.name} stores NaN at {CLEN_PATH}: give the geometry a "
                                "numeric clen for indexamajig")
        for key, location in header_shifts(self.geometry).items():
            shift = _frame_value(frame, location)
            self._ds[key][row] = shift
            if not np.isfinite(shift):  # CrystFEL reads NaN as no shift
                self._warn_once(key, f"{frame.source}: no {key} at {location} (the "
                                f"geometry's); {self.path.name} stores NaN at "
                                f"{KEY_GROUP}/{key}, which indexamajig reads as no shift")
        self.n += 1

    def _linked_masks(self, frame: Frame) -> list[np.ndarray]:
        """A linked frame's usable pixels read again from its source (:func:`_usable`)."""
        meta = frame.meta
        events = "h5_frame" in meta  # read through the geometry's placeholders, by its place
        key = (meta["h5_file"], PLACEHOLDER if events else meta["h5_dataset"])
        reader = self._readers.get(key)
        if reader is None:
            reader = _Reader(key[0], frame.geometry or self.geometry,
                             None if events else key[1], None)
            self._readers[key] = reader
        index = meta["h5_frame"] if events else meta.get("h5_index") or 0
        panels = _split(reader.slab(index), reader.geometry)
        return _usable(panels, reader.masks(index, panels), meta.get("dtype"))

    def _close_readers(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message)

    def _write_vds(self) -> None:
        assert self.frame_shape is not None
        layout = h5py.VirtualLayout(shape=(self.n, *self.frame_shape),
                                    dtype=np.result_type(*self._dtypes))
        for row, (file, dataset, index, shape, blocks) in enumerate(self._sources):
            source = h5py.VirtualSource(file, dataset, shape=shape)
            frame = () if index is None else (index,)
            if blocks is None:
                layout[row] = source[index] if index is not None else source
                continue
            for block, offset in blocks:  # a stacked layout's modules, one below another
                ss, fs = (b for b in block if isinstance(b, slice))
                layout[row, offset:offset + ss.stop, :fs.stop] = source[(*frame, *block)]
        self.h5.create_virtual_dataset(DATA_PATH, layout, fillvalue=0)

    def finish(self) -> None:
        """Lay out the virtual dataset, close, and give the file its final name.  A write HDF5
        cannot make (a full disk: its buffers are flushed here) is a :class:`CXIWriteError`."""
        self._close_readers()
        try:
            if self.mode == "vds" and self.n:
                self._write_vds()
            self.h5.attrs["creator"] = "peaknet-xtal"
            if self.geometry_name:
                self.h5.attrs[GEOMETRY_ATTR] = self.geometry_name
            if self.settings is not None:
                self.h5.attrs[SETTINGS_ATTR] = json.dumps(dict(self.settings), sort_keys=True)
            if self._inputs:
                self.h5.attrs[INPUTS_ATTR] = json.dumps(self._inputs, sort_keys=True)
            self.h5.close()
        except (OSError, RuntimeError) as exc:  # h5py words a failed flush as either
            self.abort()
            raise CXIWriteError.of(self.path, exc) from exc
        except BaseException:
            self.abort()
            raise
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the file: nothing appears under its name.  Closing a file whose writes failed
        (a full disk) fails again in HDF5 ("Can't decrement id ref count"); that second error
        would replace the one that says what happened, so it is dropped with the file."""
        self._close_readers()
        try:
            self.h5.close()
        except (OSError, RuntimeError, ValueError) as exc:
            log.debug("%s: closing the dropped file failed too (%s)", self.path, exc)
        finally:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_cxi(path: str | os.PathLike[str], results: Sequence[FrameResult], geometry: Any = None,
              *, mode: str = "auto", max_peaks: int = DEFAULT_MAX_PEAKS) -> str:
    """Write one CXI file (images, masks, photon energies, peak table) atomically; returns the
    mode actually used.

    ``mode``: ``"vds"`` links to the original HDF5 frames, ``"copy"`` stores the pixels,
    ``"auto"`` links when every frame came from an HDF5 file that still exists.
    """
    if mode not in ("auto", "vds", "copy"):
        raise ValueError(f"mode must be auto, vds or copy, not {mode!r}")
    if not results:
        raise ValueError(f"{path}: nothing to write")
    used = mode if mode != "auto" else ("vds" if _can_link(results) else "copy")
    out = _CXIFile(Path(path), geometry, used, max_peaks)
    try:
        for result in results:
            out.add(result)
    except BaseException:
        out.abort()
        raise
    out.finish()
    return used


def cxi_geometry(geometry: Any, *, adu_per_photon: float | None = None) -> Any:
    """The geometry of the CXI files this module writes, for indexamajig and dials.import.

    Data at :data:`DATA_PATH` as a ``%, ss, fs`` stack, the per-frame good-pixel mask at
    :data:`MASK_PATH` (1 = good: every mask of the input, bad regions, flags and trusted ranges
    already applied), the per-frame photon energy at :data:`PHOTON_ENERGY_PATH`, a path-valued
    camera length copied to :data:`CLEN_PATH`, path-valued detector shifts copied beside it
    (:data:`SHIFT_KEYS`: the ``.geom`` named the input's location, which the CXI files lacked,
    and indexamajig reads every location from the file it is given), and the peak table.
    Masks the input geometry named are dropped: the CXI mask already holds them.  Saturation
    maps are dropped too, and the writer says so (:func:`saturation_map_note`).  A stacked
    layout (EuXFEL-style modules along a fixed dimension) is stored as one slab
    (``Geometry.as_slab``), since CrystFEL places CXI peaks by their slab position alone.
    """
    from dataclasses import replace

    def keep(key: str) -> bool:
        return not (key.startswith(("mask", "saturation_map")) or re.fullmatch(r"dim\d+", key)
                    or key in ("photon_energy", "wavelength", "electron_voltage", "data",
                               "clen"))

    geometry = geometry.as_slab()
    panels = []
    for p in geometry.panels:
        extra = {k: v for k, v in p.extra.items() if keep(k) and k != "badrow_direction"}
        panels.append(replace(p, dims=["%", "ss", "fs"], extra=extra))
    keys = {k: v for k, v in geometry.keys.items() if keep(k)}
    keys.update({"photon_energy": PHOTON_ENERGY_PATH, "data": DATA_PATH, "mask": MASK_PATH,
                 "mask_good": "0x1", "mask_bad": "0x0", "peak_list": PEAK_GROUP,
                 "peak_list_type": "cxi", "dim0": "%", "dim1": "ss", "dim2": "fs"})
    if geometry.camera_length_path is not None:
        unit = geometry.camera_length_path.split()[1:] or ["mm"]  # CrystFEL: no unit is mm
        panels = [replace(p, clen_path=f"{CLEN_PATH} {unit[0]}") for p in panels]
    for key, location in header_shifts(geometry).items():  # copied beside the frames
        keys[key] = " ".join([f"{KEY_GROUP}/{key}", *location.split()[1:]])  # no unit: m
    if adu_per_photon is not None:
        keys["adu_per_photon"] = repr(float(adu_per_photon))
        keys.pop("adu_per_eV", None)
        panels = [replace(p, adu_per_photon=float(adu_per_photon), adu_per_eV=None)
                  for p in panels]
    elif all(p.adu_per_photon is None and p.adu_per_eV is None for p in panels):
        log.warning("the geometry declares no detector gain, which CrystFEL requires: writing "
                    "adu_per_photon = 1 (CrystFEL uses it only for error estimates)")
        keys["adu_per_photon"] = "1"
        panels = [replace(p, adu_per_photon=1.0) for p in panels]
    return replace(geometry, panels=panels, keys=keys, data=DATA_PATH, mask=MASK_PATH,
                   mask_file=None, mask_good=1, mask_bad=0, peak_list=PEAK_GROUP,
                   peak_list_type="cxi", photon_energy_path=PHOTON_ENERGY_PATH,
                   photon_energy_path_unit="eV", photon_energy_eV=None, wavelength_A=None)


def saturation_map_note(geometry: Any, geom_path: str | os.PathLike[str]) -> str | None:
    """What to tell a user whose geometry names a saturation map (``saturation_map``, global
    or per panel), which :func:`cxi_geometry` drops: the CXI files do not hold it, so
    indexamajig would no longer reject reflections with a pixel above it.  None without one."""
    where = [f"saturation_map = {geometry.keys['saturation_map']}"] \
        if "saturation_map" in geometry.keys else []
    where += [f"{p.name}/saturation_map = {p.extra['saturation_map']}"
              for p in geometry.panels if "saturation_map" in p.extra]
    if not where:
        return None
    return (f"{geom_path}: the input geometry's saturation map ({where[0]}"
            f"{f' and {len(where) - 1} more' if len(where) > 1 else ''}) is not carried over: "
            "the CXI files do not hold it, so indexamajig will not reject reflections with a "
            "pixel above it; where one map serves every input, add its saturation_map line "
            "and saturation_map_file = THE_FILE_HOLDING_IT to that file")


def write_cxi_geometry(cxi_path: str | os.PathLike[str], geometry: Any,
                       geom_path: str | os.PathLike[str] | None = None, *,
                       gain_measured: bool = False, replace: bool = False,
                       **options: Any) -> Path:
    """Write the ``.geom`` (see :func:`cxi_geometry`) for CXI files written here; atomic.

    By default beside ``cxi_path`` with its stem.  An existing file for another geometry is
    refused rather than replaced: the CXI files already written beside it need it.  With
    ``gain_measured`` (the ``adu_per_photon`` option was measured from the data), one that differs
    only in its gain is kept: a resumed run measures the gain again, on other first frames.
    ``replace`` writes over an existing file (its writer's own, before any CXI file needs it).
    """
    target = Path(geom_path) if geom_path is not None else Path(cxi_path).with_suffix(".geom")
    text = cxi_geometry(geometry, **options).to_text()
    if target.exists() and not replace:
        try:
            old = target.read_text()
        except (OSError, UnicodeDecodeError):
            old = None
        if old == text or (gain_measured and old is not None
                           and geometry_placement(old) == geometry_placement(text)):
            return target
        raise FormatError(target, "already exists and describes another geometry (or was not "
                          "written here); use a new output folder or remove it")
    write_text_atomic(target, text)
    return target


def geometry_placement(text: str) -> str:
    """A geometry file's text less its gain lines (``adu_per_photon``, ``adu_per_eV``, global
    or per panel): what places the pixels, by which two geometries of one detector compare
    equal whatever gain was measured for each."""
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"\s*(\w+/)?adu_per_(photon|eV)\s*=", line))


def written_placement(geometry: Any) -> str:
    """:func:`geometry_placement` of the ``.geom`` written for CXI files of ``geometry``
    (:func:`cxi_geometry`): how two inputs compare when they would share an output folder.
    The gain given here is a placeholder that the comparison drops; it keeps
    :func:`cxi_geometry` from warning, once per input, of a missing gain that the ``.geom``
    actually written declares (measured from the data, or said once when it is written)."""
    return geometry_placement(cxi_geometry(geometry, adu_per_photon=1.0).to_text())


def other_detector_error(source: str | os.PathLike[str] | None, origin: str) -> FormatError:
    """The error for a frame of ``source`` whose geometry differs (:func:`written_placement`)
    from ``origin``'s (e.g. "that of the first input, a.cxi"): one output folder holds one
    geometry.  One wording wherever the folder's geometry is checked: the writer, and the Ray
    pipeline's sources, which check it before a frame is found."""
    return FormatError(source, f"its detector geometry differs from {origin}; one output folder "
                       "holds one geometry: process each detector into its own output folder "
                       "(-o) (what is already written is kept)")


#: root attribute of a CXI file: the settings its peaks were found with (JSON), so the file
#: says how it was made, and a rerun into its folder can refuse other settings
SETTINGS_ATTR = "peaknet_settings"


#: root attribute of a CXI file: the input files its frames were read from, as they were
#: then (``{source: [absolute path, size, modification time in ns]}``, JSON), so that a rerun
#: does not skip the frames of an input that has changed since (:func:`check_inputs_unchanged`)
INPUTS_ATTR = "peaknet_inputs"


def _json_record(path: str | os.PathLike[str], attr: str, what: str) -> dict[str, Any] | None:
    """A JSON object kept in a CXI file's root attribute ``attr``; None where the file has none
    (an older run's, or not ours); a record that is not a JSON object is a FormatError
    (damaged: it cannot vouch for the file)."""
    try:
        with h5py.File(path, "r") as h5:
            text = h5.attrs.get(attr)
    except OSError as exc:
        raise FormatError(path, f"cannot read it as HDF5: {exc}") from exc
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise FormatError(path, f"its {attr} attribute is not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise FormatError(path, f"its {attr} attribute is not a record of {what} "
                          f"(a JSON {type(record).__name__}); the file is damaged")
    return record


def read_settings(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The settings a CXI file's peaks were found with (:data:`SETTINGS_ATTR`); None where the
    file does not say; a damaged record is a FormatError."""
    return _json_record(path, SETTINGS_ATTR, "settings")


def file_identity(path: str | os.PathLike[str]) -> list[Any] | None:
    """``[absolute path, size, modification time in ns]`` of a file, None if it is not one:
    what tells a file rewritten under the same name (a regenerated run) from the one read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [os.path.abspath(path), int(stat.st_size), int(stat.st_mtime_ns)]


def remember_input(inputs: dict[str, list[Any]], source: str) -> None:
    """Add ``source``'s :func:`file_identity` to ``inputs`` (:data:`INPUTS_ATTR`'s record) the
    first time a frame of it is kept, as first read."""
    if source and source not in inputs:
        identity = file_identity(source)
        if identity is not None:
            inputs[source] = identity


def check_inputs_unchanged(path: str | os.PathLike[str],
                           sources: Iterable[str | os.PathLike[str]] | None = None) -> None:
    """Refuse to resume from a CXI file whose frames came from an input that has changed since
    (:data:`INPUTS_ATTR`): a rerun skips finished frames by (file, event), so a run regenerated
    under the same name would keep the earlier file's peaks, and a linked (vds) file would now
    show the new pixels beside them.  With ``sources`` (this run's input files) only those are
    judged: a run of other inputs skips none of the changed one's frames.  An input that is
    gone is not judged (its frames are not read again); a file without the record (an older
    run's) neither.

    Raises a FormatError naming the input, the CXI file, what differs and what to do."""
    record = _json_record(path, INPUTS_ATTR, "input files")
    judged = None if sources is None else {os.path.abspath(s) for s in sources}
    for source, then in (record or {}).items():
        if not (isinstance(then, list) and len(then) == 3):
            raise FormatError(path, f"its {INPUTS_ATTR} entry for {source} is not [path, size, "
                              "mtime]; the file is damaged")
        if judged is not None and then[0] not in judged:
            continue
        now = file_identity(then[0])
        if now is None or now[1:] == then[1:]:
            continue
        change = (f"{then[1]} bytes then, {now[1]} now" if now[1] != then[1]
                  else "modified since")
        raise FormatError(source, f"has changed since its frames were found into {path} "
                          f"({change}): that file holds the earlier input's peaks. Process it "
                          f"into another output folder (-o), or delete {Path(path).name} to "
                          "find its frames again (with those of any other input it holds; the "
                          "rest of the folder is kept)")


def check_same_settings(files: Sequence[Path], settings: Mapping[str, Any]) -> None:
    """Refuse to add peaks found with other settings to a folder whose finished files were
    found with these: a rerun continues a run (finished frames are skipped by key), so its
    frames must be found as the earlier ones were, or one output would mix two models or two
    thresholds with nothing to tell them apart.  Every finished file is compared (one record
    each: a header read); settings one side does not record are not compared.  Files that
    record none are an older version's and are not judged while no file before them records
    any; one without a record after one with it is refused (damaged, or not this program's).
    Where both sides record a ``NAME_sha256`` and it is the same, ``NAME`` is not compared: the
    same weights named by another path (``default`` or the shipped file, a folder or its
    model.safetensors) are the same model.

    Raises a FormatError naming the first file that differs and every setting that does, both
    values."""
    recorded = False
    for path in files:
        earlier = read_settings(path)
        if earlier is None:
            if recorded:
                raise FormatError(path, "records no finding settings, though the files before "
                                  "it do (damaged, or not written by this run's peaknet2cxi); "
                                  "use another output folder (-o) (what is in this one is "
                                  "kept)")
            continue
        recorded = True
        common = set(earlier) & set(settings)
        same_content = {key[:-len("_sha256")] for key in common
                        if key.endswith("_sha256") and earlier[key] is not None
                        and earlier[key] == settings[key]}
        differ = [f"{key} {earlier[key]!r} there, {settings[key]!r} now"
                  for key in sorted(common - same_content) if earlier[key] != settings[key]]
        if differ:
            raise FormatError(path, "its peaks were found with other settings ("
                              + "; ".join(differ) + "); one output folder holds one run's "
                              "settings: use another output folder (-o) for these, or the same "
                              "settings to continue this run (what is in it is kept)")


# --------------------------------------------------------------------------------------------
# the rolling writer


def unfinished_files(directory: Path, prefix: str) -> list[Path]:
    """The CXI files and non-hit records a writer of ``prefix`` left in progress in
    ``directory`` (written under ``.PREFIX-NNNNN.cxi.*.part`` and
    ``.PREFIX-nonhits-NNNNN.h5.*.part`` until finished): a run stopped before it could close
    them."""
    return sorted([*directory.glob(f".{prefix}-*.cxi.*.part"),
                   *directory.glob(f".{prefix}{NONHITS_INFIX}*.h5.*.part")])


#: Name part of the files that record the frames a ``hits_only`` writer left out:
#: ``PREFIX-nonhits-NNNNN.h5``.
NONHITS_INFIX = "-nonhits-"


def write_nonhits(path: str | os.PathLike[str], keys: Sequence[tuple[str, str]],
                  settings: Mapping[str, Any] | None, inputs: Mapping[str, list[Any]]) -> None:
    """Record, atomically, the frames a ``hits_only`` run looked at and left out (not hits):
    their keys where a CXI file keeps its frames' (``KEY_GROUP``/source, event), and the
    settings and input files a CXI file records, so that :meth:`CXIWriter.done_keys` counts
    them done and a rerun with other settings or over a changed input is refused as for a CXI
    file.  Why: a hit-finding run writes a few per cent of its frames; without this record an
    interrupted run found every blank again when resumed.  A write HDF5 cannot make (a full
    disk) is a :class:`CXIWriteError`; nothing appears under the name then."""
    try:
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            group = h5.require_group(KEY_GROUP)
            for column, name in enumerate(("source", "event")):
                group.create_dataset(name, data=[key[column] for key in keys],
                                     dtype=h5py.string_dtype())
            h5.attrs["creator"] = "peaknet-xtal"
            h5.attrs["peaknet_nonhits"] = "frames examined and left out as not hits"
            if settings is not None:
                h5.attrs[SETTINGS_ATTR] = json.dumps(dict(settings), sort_keys=True)
            if inputs:
                h5.attrs[INPUTS_ATTR] = json.dumps(dict(inputs), sort_keys=True)
    except (OSError, RuntimeError) as exc:
        raise CXIWriteError.of(Path(path), exc) from exc


_NONHITS_NAME = re.compile(re.escape(NONHITS_INFIX) + r"(\d{5})\.h5$")


def nonhit_files(directory: Path, prefix: str) -> list[Path]:
    """The non-hit records (:func:`write_nonhits`) in ``directory`` of writers of ``prefix``,
    in order; as for CXI files, those of writers named after it too (a Ray run's
    ``peaks-w1``)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{prefix}-*.h5") if _NONHITS_NAME.search(p.name))


def count_nonhits(directory: Path, prefix: str) -> int:
    """Frames the non-hit records in ``directory`` hold (:func:`nonhit_files`), from their
    datasets' lengths: a summary need not read a long run's keys."""
    total = 0
    for path in nonhit_files(directory, prefix):
        try:
            with h5py.File(path, "r") as h5:
                total += len(h5[f"{KEY_GROUP}/source"])
        except (OSError, KeyError) as exc:
            raise FormatError(path, f"cannot read it as a non-hit record: {exc}") from exc
    return total


def read_nonhits(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The keys a non-hit record holds (:func:`write_nonhits`); a damaged one is a
    FormatError naming it."""
    try:
        with h5py.File(path, "r") as h5:
            if f"{KEY_GROUP}/source" not in h5:
                raise FormatError(path, "records no frames: not a non-hit record of "
                                  "peaknet2cxi, or damaged")
            return _read_keys(h5)
    except OSError as exc:
        raise FormatError(path, f"cannot read it as HDF5: {exc}") from exc


class CXIWriter:
    """A ``PeakWriter`` (see hookspecs): rolling CXI files ``<prefix>-NNNNN.cxi`` plus one
    ``.geom`` for all of them.

    Each frame goes to disk as it arrives (memory stays flat however large ``frames_per_file``);
    a file takes its final name once ``frames_per_file`` frames are in it, so a crash loses only
    the frames of the file in progress, and :meth:`done_keys` reads the keys of finished files so
    a rerun skips them.  With ``hits_only`` the frames left out are recorded in
    ``<prefix>-nonhits-NNNNN.h5`` (:func:`write_nonhits`), one file each time a CXI file is
    finished and at :meth:`close`, and after every ``10 * frames_per_file`` non-hits in between
    (a long stretch of blanks), so that a rerun skips them too.  The folder holds one geometry
    (:meth:`check_geometry`).
    """

    name = "cxi"
    _pattern = re.compile(r"-(\d{5})\.cxi$")

    def __init__(self, path: str | os.PathLike[str], geometry: Any = None, *,
                 frames_per_file: int = 1000, mode: str = "auto",
                 max_peaks: int = DEFAULT_MAX_PEAKS, write_geometry: bool = True,
                 geometry_name: str | None = None, adu_per_photon: float | None = None,
                 hits_only: bool = False, settings: Mapping[str, Any] | None = None,
                 inputs: Iterable[str] | None = None) -> None:
        if isinstance(geometry, (str, os.PathLike)):
            from peaknet_xtal.formats.geometry import read_geometry

            geometry = read_geometry(geometry)
        if mode not in ("auto", "vds", "copy"):
            raise ValueError(f"mode must be auto, vds or copy, not {mode!r}")
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
        self.geometry_path = self.directory / (geometry_name or f"{self.prefix}.geom")
        self.adu_per_photon = adu_per_photon
        self.hits_only = hits_only
        #: how the peaks were found, kept in every file (:data:`SETTINGS_ATTR`); a folder's
        #: files share them (:func:`check_same_settings`)
        self.settings = None if settings is None else dict(settings)
        #: the run's input files, the only ones whose change since a finished file was
        #: written refuses a resume (None: every input it records; :meth:`done_keys`)
        self.inputs = None if inputs is None else [os.fspath(i) for i in inputs]
        records = self.nonhit_files()
        if self.settings is not None:
            check_same_settings([*self.finished_files(), *records], self.settings)
        self._file: _CXIFile | None = None
        self._next_index = self._first_free_index()
        #: the frames left out (not hits) since the last non-hit record, with their inputs
        self._nonhits: list[tuple[str, str]] = []
        self._nonhit_inputs: dict[str, list[Any]] = {}
        self._next_nonhits = self._first_free_index(records)
        #: the geometry and measured gain written by this writer while no finished file needs
        #: them yet (see :meth:`_ensure_geometry`)
        self._provisional: tuple[Any, float] | None = None
        self._last: FrameResult | None = None
        #: the folder's placement (:func:`written_placement`) and where it came from, and the
        #: last geometry judged with the verdict (see :meth:`check_geometry`)
        self._placement, self._origin = self._earlier_placement()
        self._judged: tuple[Any, bool] | None = None
        self.files: list[Path] = []
        for stale in unfinished_files(self.directory, self.prefix):
            stale.unlink()  # a file in progress when an earlier run was killed

    def finished_files(self) -> list[Path]:
        """Files completed by this or an earlier run, in order."""
        found = [p for p in self.directory.glob(f"{self.prefix}-*.cxi")
                 if self._pattern.search(p.name) and p.name[len(self.prefix)] == "-"]
        return sorted(found)

    def foreign_files(self) -> list[Path]:
        """Files named like ours that this writer did not make (no per-frame keys)."""
        return [p for p in self.finished_files() if not has_frame_keys(p)]

    def nonhit_files(self) -> list[Path]:
        """The records of frames left out as not hits (:func:`write_nonhits`) of this or an
        earlier run, in order (:func:`nonhit_files`)."""
        return nonhit_files(self.directory, self.prefix)

    def _first_free_index(self, files: Sequence[Path] | None = None) -> int:
        if files is None:
            found = [self._pattern.search(p.name) for p in self.finished_files()]
        else:
            found = [_NONHITS_NAME.search(p.name) for p in files]
        indices = [int(m.group(1)) for m in found if m is not None]
        return max(indices) + 1 if indices else 0

    def done_keys(self) -> set[tuple[str, str]]:
        """``(source, event)`` of every frame in a finished file, and of every frame recorded
        as left out (not a hit, :func:`write_nonhits`).  A file whose inputs have changed
        since it was written is refused (:func:`check_inputs_unchanged`): its frames would be
        skipped as done, with the earlier input's peaks."""
        keys: set[tuple[str, str]] = set()
        for path in self.finished_files():
            try:
                table = read_cxi_peaks(path)
            except FormatError:
                continue  # not one of ours: it will not be overwritten either
            check_inputs_unchanged(path, self.inputs)
            keys.update(table.keys)
        for path in self.nonhit_files():
            check_inputs_unchanged(path, self.inputs)
            keys.update(read_nonhits(path))
        return keys

    def _earlier_placement(self) -> tuple[str | None, str]:
        """The placement of the ``.geom`` an earlier run left here (the CXI files it wrote are
        indexed with it), and its origin; None where there is none (or this writer writes
        none), or it cannot be read (not ours to judge: writing it again refuses it,
        :meth:`_ensure_geometry`)."""
        if not self.write_geometry or not self.geometry_path.exists():
            return None, ""
        try:
            text = self.geometry_path.read_text()
        except (OSError, UnicodeDecodeError):
            return None, ""
        return geometry_placement(text), f"{self.geometry_path}, written by an earlier run"

    def check_geometry(self, frame: Frame) -> None:
        """Refuse a frame whose geometry would need another ``.geom`` than the folder's: its
        peaks would be indexed with the wrong one.

        The folder's geometry is the one an earlier run wrote here, else the first frame's.
        Geometries compare as written (:func:`written_placement`: less the gain, which is not
        placement and is measured from the data where an input declares none), so one
        detector's inputs at different wavelengths or gains share a folder.  Every frame is
        checked, not only one that starts a file: frames of the same panel shapes placed
        otherwise would join the file in progress.  :meth:`write` calls this before anything
        of the frame is written, so a refused frame leaves that file whole; a caller may call
        it earlier, before spending the time to find the frame (peaknet2cxi does).  Frames of
        one input share one geometry object, so only a new object is compared; only the last
        is kept, however many inputs a run reads.  With the writer's own geometry, that one is
        written for every frame.

        Raises a FormatError naming the frame's file (or the writer's geometry file), where
        the folder's geometry came from, and what to do."""
        geometry = self.geometry or frame.geometry
        if geometry is None:
            return
        if self._judged is not None and self._judged[0] is geometry:
            same = self._judged[1]
        else:
            text = written_placement(geometry)
            if self._placement is None:
                self._placement = text
                self._origin = f"that of the first input, {frame.source}"
            same = text == self._placement
            self._judged = (geometry, same)
        if same:
            return
        if self.geometry is not None:  # only an earlier run's can differ from it
            raise FormatError(getattr(geometry, "path", None) or frame.source
                              or self.geometry_path,
                              f"this geometry (-g) differs from the one in {self.geometry_path}, "
                              "written by an earlier run; one output folder holds one geometry: "
                              "use another output folder (-o) for it (what is in this one is "
                              "kept)")
        raise other_detector_error(frame.source or self.geometry_path, self._origin)

    def _ensure_geometry(self, geometry: Any, result: FrameResult) -> None:
        """The one ``.geom`` of the folder, with the gain the finder measured from the data
        where the input declared none or a placeholder (CSPAD CBFs say 1 for about 30 ADU per
        photon: indexamajig and peaknet-integrate read the gain from this file).  The first
        frame's measurement is provisional: the run pools its first frames' (finding/gain.py),
        so the geometry is written again with the run's value when the folder's first file is
        finished, as long as no earlier file needs it."""
        if self.write_geometry and geometry is not None:
            gain, measured = self.adu_per_photon, False
            if gain is None and result.meta.get("gain_measured"):
                gain, measured = result.meta.get("adu_per_photon"), True
            fresh = not self.geometry_path.exists() and not self.finished_files()
            try:
                write_cxi_geometry(self.geometry_path.with_suffix(".cxi"), geometry,
                                   self.geometry_path, gain_measured=measured,
                                   adu_per_photon=gain)
            except FormatError as exc:  # the frame's, not the folder's, is the odd one out
                raise FormatError(result.frame.source or self.geometry_path,
                                  f"its detector geometry differs from the one in "
                                  f"{self.geometry_path} (another detector, or another -g); "
                                  "one output folder holds one geometry: write this one to "
                                  "another folder (what is already written is kept)") from exc
            if fresh and measured and gain is not None:
                self._provisional = (geometry, float(gain))
            if fresh and (note := saturation_map_note(geometry, self.geometry_path)):
                log.warning(note)

    def _settle_geometry(self, result: FrameResult | None) -> None:
        """Before the first file is finished: the geometry with the run's latest measured
        gain, where it moved from the provisional one."""
        if self._provisional is None or result is None or not result.meta.get("gain_measured"):
            return
        geometry, written = self._provisional
        gain = float(result.meta["adu_per_photon"])
        if gain != written:
            write_cxi_geometry(self.geometry_path.with_suffix(".cxi"), geometry,
                               self.geometry_path, gain_measured=True, adu_per_photon=gain,
                               replace=True)
            self._provisional = (geometry, gain)

    def write(self, result: FrameResult) -> None:
        # before anything of it is written, and for a frame left out too: a check before the
        # frame is found (peaknet2cxi's) cannot know which frames are hits
        self.check_geometry(result.frame)
        if self.hits_only and not result.hit:
            self._leave_out(result.frame)
            return
        if self._file is not None and not self._file.accepts(result):
            self.flush()  # a frame that cannot be linked, or of another shape: a new file
        if self._file is None:
            geometry = self.geometry or result.frame.geometry
            self._ensure_geometry(geometry, result)  # first: a finished .cxi has its .geom
            mode = self.mode if self.mode != "auto" else (
                "vds" if _linkable(result) else "copy")
            target = self.directory / f"{self.prefix}-{self._next_index:05d}.cxi"
            self._file = _CXIFile(target, geometry, mode, self.max_peaks,
                                  self.geometry_path.name if self.write_geometry else None,
                                  self.settings)
        try:
            self._file.add(result)
        except BaseException:
            self._file.abort()
            self._file = None
            raise
        self._last = result
        if self._file.n >= self.frames_per_file:
            self.flush()

    def _leave_out(self, frame: Frame) -> None:
        """Remember a frame left out as not a hit, for the next non-hit record."""
        self._nonhits.append((frame.source, frame.event))
        remember_input(self._nonhit_inputs, frame.source)
        if len(self._nonhits) >= 10 * self.frames_per_file:
            self._record_nonhits()

    def _record_nonhits(self) -> Path | None:
        """Write the frames left out since the last record (:func:`write_nonhits`)."""
        if not self._nonhits:
            return None
        path = self.directory / f"{self.prefix}{NONHITS_INFIX}{self._next_nonhits:05d}.h5"
        write_nonhits(path, self._nonhits, self.settings, self._nonhit_inputs)
        self._next_nonhits += 1
        self._nonhits, self._nonhit_inputs = [], {}
        return path

    def flush(self) -> Path | None:
        """Finish the file in progress now (it takes its final name), and record the frames
        left out since the last record."""
        self._record_nonhits()
        if self._file is None:
            return None
        current, self._file = self._file, None
        if current.n == 0:
            current.abort()
            return None
        if self._provisional is not None:  # the folder's first file: nothing else needs it yet
            self._settle_geometry(self._last)
            self._provisional = None
        current.finish()
        self._next_index += 1
        self.files.append(current.path)
        return current.path

    def abort(self) -> None:
        """Drop the file in progress (after an error that makes its frames untrustworthy)."""
        if self._file is not None:
            self._file.abort()
            self._file = None

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> CXIWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def has_frame_keys(path: Path) -> bool:
    """Whether ``path`` is a CXI file this package wrote (it keeps each frame's key and peak
    count); anything else named like one, or unreadable, is not."""
    try:
        with h5py.File(path, "r") as h5:
            return f"{KEY_GROUP}/source" in h5 and f"{PEAK_GROUP}/nPeaks" in h5
    except (OSError, KeyError, RuntimeError):
        return False
