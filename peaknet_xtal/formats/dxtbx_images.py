"""Images DIALS can read (CBF, miniCBF ``.cbf.bz2``/``.gz``, NeXus, SMV...), through dxtbx.

dxtbx already knows hundreds of detector formats, their trusted ranges and their static masks
(Pilatus module gaps, for instance), so rather than re-implementing any of that we ask it for an
imageset and turn each image into a :class:`~peaknet_xtal.types.Frame`: one float32 array and one
mask (True = good) per dxtbx panel.

The detector model is also translated into a CrystFEL geometry (:func:`geometry_text_from_dxtbx`),
with the panels stacked along ``ss`` in one slab, so everything downstream (1/d, CXI peak tables,
streams) works the same for DIALS-readable images as for CXI stacks.

dxtbx is imported lazily: it only exists where DIALS is installed; where it cannot be imported,
opening a file says so, naming it (:func:`~peaknet_xtal.errors.require_dials`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peaknet_xtal.errors import FormatError, GeometryError, ImageRefused, require_dials
from peaknet_xtal.finding.sanitise import implied_dtype
from peaknet_xtal.formats.geometry import HC_EV_A
from peaknet_xtal.types import Frame, event_index

#: Suffixes dxtbx reads that the CXI source does not claim (cheap sniffing, no file opened).
DXTBX_SUFFIXES = (".cbf", ".cbf.gz", ".cbf.bz2", ".img", ".img.gz", ".img.bz2", ".mccd",
                  ".smv", ".nxs", ".h5", ".tif", ".tiff")
#: Of those, the formats of one image a file (CBF, SMV, MarCCD): counted without opening, as
#: opening a CSPAD CBF to count it took 0.4-1 s, so a progress line over more than a few such
#: files lost its total and ETA (a user trial).  NeXus, HDF5 and TIFF stacks can hold several.
ONE_IMAGE_SUFFIXES = (".cbf", ".cbf.gz", ".cbf.bz2", ".img", ".img.gz", ".img.bz2", ".mccd",
                      ".smv")


def open_imageset(path: str | os.PathLike[str]) -> Any:
    """The dxtbx imageset of ``path`` (a still, a sequence or a multi-image container)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "file not found")
    require_dials(f"reading {path} through dxtbx", "dxtbx.model.experiment_list")
    from dxtbx.model.experiment_list import ExperimentListFactory

    try:
        experiments = ExperimentListFactory.from_filenames([path])
    except MemoryError:  # the machine's limit, not the file's fault: said as that
        raise
    except Exception as exc:  # dxtbx raises many kinds for unknown or broken files
        if isinstance(exc, ValueError) and "filename template" in str(exc):
            # dxtbx numbers a rotation image from its file name: frame.cbf has none, and a
            # sound file was said to be damaged or truncated
            raise ImageRefused(path, "DIALS takes an image's number from its file name, and "
                               "this name holds none (dxtbx: Could not determine filename "
                               "template); the file itself may be sound: link or copy it under "
                               "a name with its image number, e.g. NAME_0001"
                               f"{''.join(Path(path).suffixes)}") from exc
        raise FormatError(path, f"dxtbx cannot read this image ({type(exc).__name__}: {exc})"
                          ) from exc
    imagesets = experiments.imagesets()  # type: ignore[attr-defined]
    if not imagesets:
        raise FormatError(path, "dxtbx found no image format that understands this file")
    if len(imagesets) == 1:
        check_every_linked_frame(imagesets[0], path)
        return imagesets[0]
    # Stills in one container (a NeXus file of still shots): DIALS makes an imageset of each
    # image, and the first alone was all of the file (3 images read as 1, exit 0).  One
    # imageset of every image, with the same models, as dxtbx's factory makes of the file.
    from dxtbx.imageset import ImageSetFactory

    total = sum(len(s) for s in imagesets)
    try:
        whole = ImageSetFactory.new([path])
    except Exception:  # noqa: BLE001 - said below, with the count
        whole = []
    if len(whole) == 1 and len(whole[0]) == total:
        check_every_linked_frame(whole[0], path)
        return whole[0]
    raise ImageRefused(path, f"DIALS reads this file as {len(imagesets)} image sets of {total} "
                      "images in all, which cannot be read as one; split it, or find spots "
                      "with dials.find_spots")


#: The data files of a DECTRIS-style master: ``/entry/data/data_000001``, ``data_000002``, ...
#: links to the files holding the frames (the DECTRIS filewriter's layout).
_DATA_LINK = re.compile(r"data_\d{6}")


def linked_frames(path: str) -> list[tuple[str, int | str]]:
    """``(name, frames)`` of each ``/entry/data/data_NNNNNN`` of an HDF5 master file, in order;
    where a link's data file cannot be opened, ``frames`` is the file it names.  Empty for a
    file that is not HDF5 or has no such links."""
    import h5py

    try:
        if not h5py.is_hdf5(path):
            return []
        with h5py.File(path, "r") as h5:
            group = h5.get("/entry/data")
            if not isinstance(group, h5py.Group):
                return []
            out: list[tuple[str, int | str]] = []
            for name in sorted(n for n in group if _DATA_LINK.fullmatch(n)):
                try:
                    dataset = group[name]
                except (KeyError, OSError):  # a dangling external link
                    link = group.get(name, getlink=True)
                    out.append((name, str(getattr(link, "filename", "?"))))
                    continue
                if isinstance(dataset, h5py.Dataset) and dataset.ndim >= 3:
                    out.append((name, int(dataset.shape[0])))
            return out
    except OSError:  # unreadable as HDF5: dxtbx's own error says why
        return []


def check_every_linked_frame(imageset: Any, path: str | None = None) -> None:
    """Refuse, naming the master, an imageset of a master file whose frames lie in several
    data files (``/entry/data/data_000001``, ``data_000002``, ...: the DECTRIS filewriter's
    layout) when dxtbx cannot read them all.

    Why: dxtbx's NXmx reader (``FormatNXmx``, dxtbx 3.12) reads the first dataset of
    ``/entry/data`` alone.  A still-shot master of 5 frames in two data files was read as 3
    images, and 3 frames were written, exit 0; a rotation master (its scan says 5) was read
    to image 3 and then failed as if the file were damaged.  The frames of every link are
    counted and the first frame of each later data file is read through dxtbx, so a dxtbx that
    reads them all passes."""
    if path is None:
        path = _imageset_path(imageset, 0)
    links = linked_frames(path)
    if len(links) < 2:
        return
    where = ", ".join(f"{name}: {frames}" if isinstance(frames, int)
                      else f"{name}: its data file {frames} cannot be opened"
                      for name, frames in links)
    missing = [name for name, frames in links if not isinstance(frames, int)]
    counts = [frames for _, frames in links if isinstance(frames, int)]
    if missing:
        raise ImageRefused(path, f"{len(links)} data files linked ({where}): the frames of "
                          f"{', '.join(missing)} cannot be read (a data file missing or moved?)")
    try:  # the file's images as dxtbx sees them (an imageset may be a slice, or one still)
        reader = imageset.get_format_class().get_instance(path)
        seen = int(reader.get_num_images())
    except Exception:  # noqa: BLE001 - not a multi-image format after all: its imageset
        reader, seen = imageset, len(imageset)
    total, readable, start = sum(counts), seen, 0
    for count in counts[:-1]:
        start += count
        if start >= seen:
            break
        try:
            reader.get_raw_data(start)
        except Exception:  # noqa: BLE001 - dxtbx cannot reach this data file's frames
            readable = start
            break
    if readable < total:
        only = ("only the first data file" if readable == counts[0]
                else f"only {readable} of those frames")
        raise ImageRefused(path, f"{total} frames in the data files ({where}), DIALS reads "
                          f"{readable}: this dxtbx reads {only} of a master whose frames lie in "
                          f"several; refused rather than {total - readable} frames lost (read "
                          "the data files themselves with -g, or use a DIALS whose dxtbx reads "
                          "them all)")


#: Bytes per pixel of the SMV ``TYPE`` values dxtbx reads (it assumes unsigned_short without).
_SMV_TYPE_BYTES = {"unsigned_short": 2, "signed_short": 2, "unsigned_int": 4,
                   "signed_int": 4, "unsigned_long": 4, "signed_long": 4, "float": 4}


def check_whole_file(imageset: Any, index: int) -> None:
    """Refuse, naming the file and the byte counts, an SMV or Rayonix ``.mccd`` image shorter
    than its header says: dxtbx reads the missing pixels as zeros (a truncated ADSC image's
    missing half came out as the pedestal's negative, -16.7 after the gain, unmasked, and the
    file gave 128 peaks instead of 236, exit 0).

    Both say their size in a header dxtbx itself reads: SMV's ``HEADER_BYTES`` + ``SIZE1`` x
    ``SIZE2`` pixels of ``TYPE``; a Rayonix TIFF's ``StripOffsets`` + ``ImageWidth`` x
    ``ImageLength`` pixels of ``BitsPerSample``.  Compressed copies (``.gz``, ``.bz2``) are
    not checked: their size says nothing without inflating them."""
    try:
        path = str(imageset.get_path(index))
        fmt = imageset.get_format_class()
    except Exception:  # noqa: BLE001 - an imageset without files (in memory): nothing to check
        return
    if not os.path.isfile(path) or path.lower().endswith((".gz", ".bz2", ".xz")):
        return
    from dxtbx.format.FormatSMV import FormatSMV
    from dxtbx.format.FormatTIFFRayonix import FormatTIFFRayonix

    try:
        if issubclass(fmt, FormatSMV):
            header_bytes, header = FormatSMV.get_smv_header(path)
            pixel_type = header.get("TYPE", "unsigned_short")
            compressed = str(header.get("COMPRESSION", "none")).lower() != "none"
            if pixel_type not in _SMV_TYPE_BYTES or compressed:
                return
            rows, cols = int(header["SIZE2"]), int(header["SIZE1"])
            expected = header_bytes + rows * cols * _SMV_TYPE_BYTES[pixel_type]
            what = (f"its SMV header says ({expected}: {header_bytes} header bytes + "
                    f"{cols} x {rows} {pixel_type} pixels)")
        elif issubclass(fmt, FormatTIFFRayonix):
            from dxtbx.format.FormatTIFFHelpers import read_basic_tiff_header

            cols, rows, bits, offset, _ = read_basic_tiff_header(path)
            expected = int(offset) + int(cols) * int(rows) * int(bits) // 8
            what = (f"its TIFF header says ({expected}: pixels from byte {offset} on, "
                    f"{cols} x {rows} of {bits} bits)")
        else:
            return
    except Exception:  # noqa: BLE001 - a header dxtbx cannot parse either: its error says so
        return
    size = os.path.getsize(path)
    if size < expected:
        raise ImageRefused(path, f"truncated: {size} bytes, {expected - size} short of what "
                          f"{what}; dxtbx would read the missing pixels as zeros")


def _to_numpy(flex_array: Any) -> np.ndarray:
    return np.asarray(flex_array.as_numpy_array())


#: ADU per photon of dxtbx's corrected data: dxtbx subtracts the format's pedestal and divides by
#: its gain, so the pixels count photons as far as the format knows its gain.
CORRECTED_GAIN = 1.0


def image_arrays(imageset: Any, index: int, path: str | None = None, *, raw: bool = False
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Corrected float32 pixels and trusted-pixel masks of image ``index``, per dxtbx panel.

    The one choice of dxtbx pixels for every adapter (``DxtbxSource``, ``PeakFinder``, and
    DIALS, which hands its threshold step the same corrected data): pedestal and gain applied,
    static masks and the trusted range folded into the masks.  Their gain is
    :data:`CORRECTED_GAIN`.  ``raw``: the values the file holds instead (no pedestal, no gain),
    for images read through a CrystFEL geometry, whose gain is that of the file's values.  An
    image file shorter than its header says is refused (:func:`check_whole_file`).
    """
    check_whole_file(imageset, index)
    try:
        data = imageset.get_raw_data(index) if raw else imageset.get_corrected_data(index)
        mask = imageset.get_mask(index)
    except MemoryError:  # the machine's limit, not the file's fault: said as that
        raise
    except Exception as exc:
        raise FormatError(path or _imageset_path(imageset, index),
                          f"cannot read image {index} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, tuple):
        data = (data,)
    panels = [np.asarray(_to_numpy(a), dtype=np.float32) for a in data]
    masks = [np.asarray(_to_numpy(m), dtype=bool) for m in mask]
    return panels, masks


def _imageset_path(imageset: Any, index: int) -> str:
    try:
        return str(imageset.get_path(index))
    except Exception:  # an imageset without paths (in memory)
        return "<imageset>"


def panel_summaries(detector: Any, beam: Any = None) -> list[dict[str, Any]]:
    """Per-panel facts people check first: size, pixel size, distance, beam centre, wavelength."""
    out = []
    for i, panel in enumerate(detector):
        fast, slow = panel.get_image_size()
        entry: dict[str, Any] = {
            "index": i, "name": panel.get_name() or f"p{i}",
            "shape": [int(slow), int(fast)],
            "pixel_size_mm": [float(v) for v in panel.get_pixel_size()],
            "distance_mm": float(panel.get_distance()),
            "origin_mm": [float(v) for v in panel.get_origin()],
            "trusted_range": [float(v) for v in panel.get_trusted_range()],
        }
        if beam is not None:
            entry["wavelength_A"] = float(beam.get_wavelength())
            try:
                entry["beam_centre_px"] = [float(v) for v in
                                           panel.get_beam_centre_px(beam.get_s0())]
            except RuntimeError:  # beam misses this panel's plane
                entry["beam_centre_px"] = None
        out.append(entry)
    return out


def _fmt_vec(v: np.ndarray) -> str:
    return f"{v[0]:+.9f}x {v[1]:+.9f}y {v[2]:+.9f}z"


def geometry_text_from_dxtbx(detector: Any, beam: Any) -> str:
    """A CrystFEL ``.geom`` describing a dxtbx detector; panels stacked along ``ss`` in one slab.

    dxtbx's lab frame has the beam along -z; CrystFEL's has it along +z, both with +y up, so
    x and z change sign (a rotation by 180 degrees about y, which keeps the frame right-handed).
    CrystFEL has no parallax correction, so positions match dxtbx's *uncorrected* millimetre
    coordinates (they differ from ``get_pixel_lab_coord`` by up to ~0.4 px on thick sensors).

    The geometry describes the pixels this module reads, dxtbx's corrected data, whose gain is
    :data:`CORRECTED_GAIN` whatever the format declares: writing the format's own gain (an
    ADSC's 2.4) had peaknet-integrate divide those pixels by it a second time (0.33x the
    photons), while the finder counted them as photons.
    """
    from peaknet_xtal.formats.geometry import CRYSTFEL_TO_DIALS

    flip = CRYSTFEL_TO_DIALS  # its own inverse: DIALS -> CrystFEL here
    pixel_m = [p.get_pixel_size()[0] / 1000.0 for p in detector]
    z_m = [float(flip[2] * p.get_origin()[2]) / 1000.0 for p in detector]
    clen = float(np.mean(z_m))
    declared = format_gain(detector)
    lines = [
        "; made by peaknet_xtal.formats.dxtbx_images from a dxtbx detector model",
        "; pixels: dxtbx's corrected data, the format's pedestal subtracted and divided by its "
        "gain" + ("" if declared is None else f" ({declared:g} ADU per photon)"),
        f"wavelength = {beam.get_wavelength():.8f} A",
        f"clen = {clen:.9f}",
        f"adu_per_photon = {CORRECTED_GAIN:g}",
        "dim0 = ss", "dim1 = fs", "",
    ]
    ss0 = 0
    for i, panel in enumerate(detector):
        fast, slow = panel.get_image_size()
        name = f"p{i}"
        origin_px = flip * np.array(panel.get_origin()) / 1000.0 / pixel_m[i]
        fs_vec = flip * np.array(panel.get_fast_axis())
        ss_vec = flip * np.array(panel.get_slow_axis())
        lines += [
            f"{name}/min_fs = 0", f"{name}/max_fs = {fast - 1}",
            f"{name}/min_ss = {ss0}", f"{name}/max_ss = {ss0 + slow - 1}",
            f"{name}/fs = {_fmt_vec(fs_vec)}", f"{name}/ss = {_fmt_vec(ss_vec)}",
            f"{name}/corner_x = {origin_px[0]:.6f}", f"{name}/corner_y = {origin_px[1]:.6f}",
            f"{name}/coffset = {z_m[i] - clen:.9f}",
            f"{name}/res = {1.0 / pixel_m[i]:.6f}", "",
        ]  # no max_adu: the trusted range is in each image's mask, which travels with it
        ss0 += slow
    return "\n".join(lines)


def format_gain(detector: Any) -> float | None:
    """The gain (ADU per photon) every panel of a dxtbx detector declares, which dxtbx divides
    the corrected data by (dxtbx's default is 1, as for most CBFs); None where panels differ."""
    gains = {float(p.get_gain()) for p in detector}
    return gains.pop() if len(gains) == 1 else None


def geometry_from_dxtbx(detector: Any, beam: Any, path: str | None = None) -> Any:
    """The CrystFEL Geometry of a dxtbx detector (see :func:`geometry_text_from_dxtbx`)."""
    from peaknet_xtal.formats.geometry import parse_geometry

    return parse_geometry(geometry_text_from_dxtbx(detector, beam), path=path)


class DxtbxSource:
    """A ``FrameSource`` (see hookspecs) over every image of one DIALS-readable file.

    ``geometry``: a CrystFEL geometry to read the images through, as indexamajig reads a CBF
    file with ``-g`` (:meth:`_read_through`); without it each frame has DIALS' panels and the
    geometry translated from DIALS' detector model (``with_geometry``)."""

    name = "dxtbx"

    def __init__(self, path: str | os.PathLike[str], *, with_geometry: bool = True,
                 geometry: Any = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.imageset = open_imageset(self.path)
        self.with_geometry = with_geometry
        self._geometry: Any = None
        self.through = geometry
        #: the through-geometry's masks that are the same on every image (bad regions,
        #: no_index, edges, mask files), made with the first image, and its value flags
        self._static: list[np.ndarray] | None = None
        self._layout = None if geometry is None else self._check_through()
        self._flags: list[dict[str, float]] | None = None
        if geometry is not None:
            from peaknet_xtal.formats.cxi import panel_flags

            self._flags = panel_flags(geometry)

    def __len__(self) -> int:
        return len(self.imageset)

    @property
    def geometry(self) -> Any:
        """CrystFEL geometry of the first image's detector (None if it cannot be expressed), or
        the geometry the images are read through."""
        if self.through is not None:
            return self.through
        if self._geometry is None and self.with_geometry:
            detector, beam = self.imageset.get_detector(0), self.imageset.get_beam(0)
            if detector is not None and beam is not None:
                self._geometry = geometry_from_dxtbx(detector, beam, path=self.path)
        return self._geometry

    def frame(self, index: int) -> Frame:
        # read through a geometry, the pixels are the file's own values, as indexamajig reads
        # them, so that the geometry's gain (ADU per photon of those values) is theirs: dxtbx's
        # corrected data of a format with a gain (an ADSC's 2.4) or a pedestal were written
        # under a user's geometry that gave the file's gain, and counted twice over
        through = self.through is not None
        panels, masks = image_arrays(self.imageset, index, self.path, raw=through)
        single = len(self.imageset) == 1
        detector, beam = self.imageset.get_detector(index), self.imageset.get_beam(index)
        meta = {"dxtbx_path": self.imageset.get_path(index), "dxtbx_index": index,
                # through a geometry, its gain (or one measured from the pixels) holds
                "adu_per_photon": None if through else CORRECTED_GAIN,
                "dtype": implied_dtype(panels),
                "format": self.imageset.get_format_class().__name__,
                "panels": panel_summaries(detector, beam)}
        if self.through is not None:
            panels, masks = self._read_through(panels, masks)
            energy = getattr(self.through, "photon_energy_eV", None)
            if energy:  # the geometry's own number, as indexamajig takes it; else the header's
                meta["wavelength_A"] = HC_EV_A / float(energy)
        return Frame(
            panels=panels, masks=masks, source=self.path,
            event="//" if single else f"//{index}", serial=index,
            geometry=self.geometry, meta=meta,
        )

    def _check_through(self) -> tuple[tuple[int, int], list[tuple[slice, slice]]]:
        """The one-array layout of this file's images, checked against the geometry they are
        read through before any pixel is read: a GeometryError naming the file says why not."""
        geometry = self.through
        where = getattr(geometry, "path", None) or "the geometry"
        detector = self.imageset.get_detector(0)
        layout = array_layout(detector)
        if layout is None:
            raise GeometryError(self.path, f"cannot be read through {where}: DIALS reads it as "
                              f"{len(detector)} panels that are not parts of one image array "
                              "(indexamajig cuts a CBF file's one array into the geometry's "
                              "panels); run without -g: the geometry DIALS reads from the file "
                              "is used and written for indexamajig")
        (rows, cols), _ = layout
        if geometry.stacked or len(geometry.slab_shape) != 2:
            raise GeometryError(self.path, f"cannot be read through {where}: its panels lie in a "
                              f"stack of modules {geometry.slab_shape}, an HDF5 layout, and "
                              f"this image is one {rows} x {cols} array")
        clen_path = getattr(geometry, "camera_length_path", None)
        if clen_path:
            distance = float(detector[0].get_distance()) / 1000.0
            raise GeometryError(self.path, f"cannot be read through {where}: its camera length "
                                f"is read from an HDF5 file (clen = {clen_path}), which this "
                                "image is not (indexamajig reads no headers from CBF files and "
                                "stops too); give clen as a number (this image's header puts "
                                f"the detector {distance:.4f} m from the sample)")
        height, width = geometry.slab_shape
        if height > rows or width > cols:
            raise GeometryError(self.path, f"the panels of {where} reach {height} x {width} "
                              f"pixels (ss x fs), past this image's {rows} x {cols}: a "
                              "geometry of another detector?")
        return layout

    def _read_through(self, panels: list[np.ndarray], masks: list[np.ndarray]
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The image cut into the through-geometry's panels, and their good pixels: DIALS'
        (trusted range, its static masks) and the geometry's (bad regions, ``no_index``, edge
        pixels, masks in mask files, value flags), as indexamajig masks the pixels it reads."""
        from peaknet_xtal.formats.cxi import flagged_ok, mask_file_masks

        geometry = self.through
        assert self._layout is not None
        image, good = one_array(panels, masks, self._layout)
        cut = geometry.split_slab(image)
        if self._static is None:
            static = geometry.bad_pixel_masks()
            for extra in mask_file_masks(geometry, self.path, image.shape):
                static = [s & e for s, e in zip(static, extra, strict=True)]
            self._static = static
        goods = [g & s for g, s in zip(geometry.split_slab(good), self._static, strict=True)]
        if self._flags is not None:
            goods = [g & flagged_ok(p, f) for g, p, f in zip(goods, cut, self._flags, strict=True)]
        return [np.ascontiguousarray(p) for p in cut], goods

    def frame_at(self, event: str) -> Frame:
        """Random access by event (``//N`` is image N, ``//`` the only one)."""
        index = event_index(event)
        if not 0 <= index < len(self.imageset):
            raise FormatError(self.path, f"event {event!r} names no image of its "
                              f"{len(self.imageset)}")
        return self.frame(index)

    def __iter__(self) -> Iterator[Frame]:
        for index in range(len(self.imageset)):
            yield self.frame(index)

    def close(self) -> None:
        """dxtbx keeps no file open between reads."""


def array_layout(detector: Any) -> tuple[tuple[int, int], list[tuple[slice, slice]]] | None:
    """Where DIALS' panels lie in the one image array their file holds: its ``(height, width)``
    and each panel's ``(rows, columns)`` in it; None where they are not parts of one array.

    Why: a CrystFEL geometry addresses pixels of that array (indexamajig reads a CBF file's
    array and cuts it into the geometry's panels), while dxtbx may cut it first: a Pilatus 12M
    CBF is one 5071 x 2463 array that DIALS reads as 24 modules, each placed by its raw-image
    offset, the rows between them left out.  A single panel is the array itself; panels whose
    places overlap (CSPAD CBF files, one array per sensor, all at offset 0) are not one array."""
    places = []
    for panel in detector:
        x, y = (int(v) for v in panel.get_raw_image_offset())
        fast, slow = (int(v) for v in panel.get_image_size())
        places.append((slice(y, y + slow), slice(x, x + fast)))
    height = max(rows.stop for rows, _ in places)
    width = max(cols.stop for _, cols in places)
    covered = np.zeros((height, width), np.int32)
    for place in places:
        covered[place] += 1
    if covered.max() > 1:
        return None
    return (height, width), places


def one_array(panels: Sequence[np.ndarray], masks: Sequence[np.ndarray],
              layout: tuple[tuple[int, int], list[tuple[slice, slice]]]
              ) -> tuple[np.ndarray, np.ndarray]:
    """An image's pixels as the one array its file holds (:func:`array_layout`), and its good
    pixels in that layout: what lies between panels (a Pilatus 12M's inter-module rows, which
    DIALS leaves out) is masked."""
    if len(panels) == 1:
        return panels[0], masks[0]
    shape, places = layout
    image = np.zeros(shape, np.float32)
    good = np.zeros(shape, bool)
    for place, panel, mask in zip(places, panels, masks, strict=True):
        image[place], good[place] = panel, mask
    return image, good


def read_dxtbx_image(path: str | os.PathLike[str], index: int = 0, *,
                     with_geometry: bool = True) -> Frame:
    """One image of a DIALS-readable file as a Frame (panels, masks, geometry, panel summary)."""
    return DxtbxSource(path, with_geometry=with_geometry).frame(index)


def iter_dxtbx_frames(path: str | os.PathLike[str], *, with_geometry: bool = True
                      ) -> Iterator[Frame]:
    """Every image of a DIALS-readable file, in order."""
    yield from DxtbxSource(path, with_geometry=with_geometry)


def sniff_dxtbx(path: str | os.PathLike[str]) -> bool:
    """Cheap: by name only (opening with dxtbx means importing DIALS and probing every format)."""
    return os.fspath(path).lower().endswith(DXTBX_SUFFIXES)
