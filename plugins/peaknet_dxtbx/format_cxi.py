"""dxtbx Format for CXI stacks with a CrystFEL geometry beside them, so DIALS imports them.

``dials.import run.cxi`` works when ``run.cxi`` has image data at the geometry's ``data``
path (``/entry_1/data_1/data`` when it names none; a stack of frames, or one frame, in the raw
slab layout) and a CrystFEL geometry either named by the file attribute ``peaknet_geometry``
(relative to the file's folder; ``peaknet-sim`` and ``peaknet2cxi`` write it) or sitting beside it
with the same stem (``run.geom``).  The geometry must give the camera length as a number; the
photon energy may be a number or an HDF5 path holding one value per frame (what ``peaknet2cxi``
writes).  The data and masks are checked and read as the library reads them
(``formats.cxi.inspect_cxi``): the same errors, and the same warnings, as peaknet2cxi and the
Python API; every mask of the geometry (masks 0-7, in the file or a mask file, with CrystFEL's
bits) and its value flags (``flag_lessthan`` etc.) mask the pixels they mask there.

Bad input: a file that is not of this format is declined (``understand`` is False, the reason
logged at debug level, or at info level for CXI image data without a geometry, so
``dials.import`` says why it cannot handle it).  A file carrying the ``peaknet_geometry``
attribute is the project's and is always claimed.  A file this format claims but cannot read
(no geometry, a malformed one, a data dataset that is missing or 1-D, data that do not fit the
geometry, unreadable frames, a wrong-shaped mask) raises ``libtbx.utils.Sorry``, DIALS' user
error, whose message names the file and what is wrong; DIALS prints it without a traceback.
A mask dataset the geometry names but the file lacks is warned about and skipped, as
peaknet2cxi does (CrystFEL would stop).

Frames: CrystFEL lab coordinates (+z along the beam, +y up) become DIALS lab coordinates
(the beam travels along -z, +y up) by a half turn about y: ``(x, y, z) -> (-x, y, -z)``, in mm.
A panel's DIALS origin is the outer corner of its first pixel, exactly CrystFEL's ``corner_x/y``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
from dxtbx.format.FormatHDF5 import FormatHDF5
from dxtbx.format.FormatStill import FormatStill

from peaknet_xtal.formats.cxi import DATA_PATH, GEOMETRY_ATTR, geometry_path, mask_good
from peaknet_xtal.formats.geometry import HC_EV_A
from peaknet_xtal.types import count_range

#: Pixel values beyond +-TRUSTED (and non-finite ones) are untrusted: DIALS masks them.
TRUSTED = 1e9
#: What a pixel of a per-frame mask's bad pixels reads as: below the trusted range, so masked.
MASKED_VALUE = -2 * TRUSTED

#: A child of DIALS' "dxtbx" logger, so dials.import shows the reasons it logs.
log = logging.getLogger("dxtbx.format.peaknet_cxi")


@contextlib.contextmanager
def user_errors(image_file: str, doing: str) -> Iterator[None]:
    """Re-raise any failure as DIALS' user error (``Sorry``), naming the file: DIALS prints a
    Sorry as one line, and every other exception as a crash to report to its developers."""
    from libtbx.utils import Sorry

    from peaknet_xtal.errors import PeakNetError

    try:
        yield
    except Sorry:
        raise
    except PeakNetError as exc:  # already names the file (and line or dataset)
        raise Sorry(f"{exc}") from None  # from None: DIALS prints the one line, no chain
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, TypeError) as exc:
        raise Sorry(f"{image_file}: cannot {doing}: {exc}") from None


def _hdf5_signature(path: str) -> bool:
    """The file starts with HDF5's format signature (at offset 0; user blocks aside)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def orthonormal_axes(fast: np.ndarray, slow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit fast and slow axes, slow made exactly perpendicular to fast (Gram-Schmidt).

    Refined metrology in real .geom files (the ePix10k2M, say) leaves fs and ss a few 1e-4 rad
    off perpendicular; dxtbx panels must be orthogonal to machine precision.
    """
    f_hat = fast / np.linalg.norm(fast)
    s_perp = slow - np.dot(slow, f_hat) * f_hat
    return f_hat, s_perp / np.linalg.norm(s_perp)


def to_dials(vector: np.ndarray) -> tuple[float, float, float]:
    """CrystFEL lab vector -> DIALS lab vector (a half turn about +y)."""
    from peaknet_xtal.formats.geometry import crystfel_to_dials

    return crystfel_to_dials(vector)


def _geometry_data_path(geom_path: str) -> str:
    """The ``data`` line of a geometry (cheap: ``understand`` runs on every file DIALS sees)."""
    data = DATA_PATH
    with open(geom_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            key, _, value = line.split(";", 1)[0].partition("=")
            if key.strip() == "data" and value.strip():
                data = value.strip()
    return data


def _no_geometry(image_file: str) -> str:
    """Why a file has no geometry: the one its attribute names is not there, nor NAME.geom."""
    beside = os.path.splitext(os.path.basename(image_file))[0] + ".geom"
    named = None
    with contextlib.suppress(Exception):
        with h5py.File(image_file, "r") as h5:
            named = h5.attrs.get(GEOMETRY_ATTR)
    if isinstance(named, bytes):
        named = named.decode(errors="replace")
    if named:
        return (f"no CrystFEL geometry: its '{GEOMETRY_ATTR}' attribute names {named}, which is "
                f"not in its folder, and there is no {beside} beside it")
    return f"no CrystFEL geometry beside it ({beside}) or named by its '{GEOMETRY_ATTR}' attribute"


class _ToDxtbx(logging.Handler):
    """Passes the library's log records to this format's logger, which DIALS prints."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= log.getEffectiveLevel():
            log.handle(record)


@contextlib.contextmanager
def _library_warnings() -> Iterator[None]:
    """While the library checks a file, its warnings (a mask dataset the geometry names but the
    file lacks, say) reach DIALS' output: DIALS logs only its own and dxtbx's loggers.  Where
    the library's logger already has somewhere to go (peaknet2cxi, pytest), it is left alone."""
    library = logging.getLogger("peaknet_xtal")
    if library.hasHandlers():
        yield
        return
    handler = _ToDxtbx()
    library.addHandler(handler)
    try:
        yield
    finally:
        library.removeHandler(handler)


class FormatCXIPeakNet(FormatHDF5, FormatStill):
    """A CXI stack of stills (``/entry_1/data_1/data``) described by a CrystFEL geometry."""

    @staticmethod
    def understand(image_file: str) -> bool:
        """Ours: an HDF5 file carrying the project's geometry attribute (peaknet-sim and
        peaknet2cxi write it), or one with image data (a frame or a stack of them) at its
        geometry's ``data`` path and a geometry beside it.  A file of ours that cannot be read
        (the geometry names a missing dataset, 1-D data, no geometry) is claimed here, and
        ``_start`` raises the reason as DIALS' ``Sorry``: declining it would leave DIALS
        saying only "Unable to handle the following arguments"."""
        geom = geometry_path(image_file)
        try:
            data_path = DATA_PATH if geom is None else _geometry_data_path(geom)
        except Exception:  # a geometry we cannot read: __init__ would say why, if we claimed it
            data_path = DATA_PATH
        try:
            h5py.File(image_file, "r").close()
        except OSError as exc:
            if _hdf5_signature(image_file):
                # An HDF5 file HDF5 cannot open (truncated, damaged): no format can read it, and
                # the next HDF5 format in dxtbx's search would crash on it; say so, as DIALS'
                # user error.  (dxtbx tries FormatHDF5's children in name order; this is first.)
                from libtbx.utils import Sorry

                raise Sorry(f"{image_file}: damaged or truncated HDF5 file ({exc})") from None
            log.debug("%s: not an HDF5 file (%s)", image_file, exc)
            return False
        try:
            with h5py.File(image_file, "r") as h5:
                ours = GEOMETRY_ATTR in h5.attrs
                try:
                    data = h5.get(data_path)
                except Exception:  # broken links: _start names them, for a file of ours
                    data = None
                ndim = data.ndim if isinstance(data, h5py.Dataset) else 0
        except Exception as exc:  # not HDF5, truncated, broken links: not ours to read
            log.debug("%s: not a readable HDF5 file (%s)", image_file, exc)
            return False
        if ours:
            return True  # the project's file: _start reads it, or says what is wrong
        if ndim < 2:
            log.debug("%s: no image data at %s; not a PeakNet CXI file", image_file, data_path)
            return False
        if geom is None:
            log.info("%s: CXI image data, but no CrystFEL geometry beside it (%s) or named "
                     "by its '%s' attribute; the PeakNet CXI format needs one",
                     image_file, os.path.splitext(os.path.basename(image_file))[0] + ".geom",
                     GEOMETRY_ATTR)
            return False
        return True

    def __init__(self, image_file: str, **kwargs: object) -> None:
        self._geometry: Any = None
        self._n_images = 0
        self._detector_cache = None
        self._beam_cache = None
        self._mask_cache: tuple[Any, ...] | None = None
        #: every mask the library reads the frames with (formats.cxi's mask plan)
        self._masks: tuple[Any, ...] = ()
        self._data_path = DATA_PATH
        self._stacked = True
        self._dtype = np.dtype(np.float32)
        self._trusted: tuple[float, float] | None = None
        super().__init__(image_file, **kwargs)

    def _start(self) -> None:
        with user_errors(self._image_file, "open it"):
            self._check()

    def _check(self) -> None:
        """Everything that can be checked without reading pixels, so DIALS fails at import.

        The image data and masks are checked by the library's own ``inspect_cxi``, so DIALS
        refuses (and warns about) exactly what peaknet2cxi and the Python API do: a missing or
        1-D data dataset is an error, a single frame is read as a one-frame stack, and a mask
        dataset the geometry names but the file lacks is warned about and skipped."""
        from peaknet_xtal.errors import FormatError, GeometryError
        from peaknet_xtal.formats.cxi import inspect_cxi
        from peaknet_xtal.formats.geometry import read_geometry

        image_file = self._image_file
        path = geometry_path(image_file)
        if path is None:  # a file of ours (its attribute) whose geometry is not there
            raise FormatError(image_file, _no_geometry(image_file))
        self._geometry = read_geometry(path)
        with _library_warnings():
            info = inspect_cxi(image_file, self._geometry)
        if info.frames:
            raise FormatError(image_file, f"the data path of the geometry {path} has '%' "
                              "placeholders (a dataset per event), which the DIALS format "
                              "does not read; run peaknet2cxi on it and import the CXI files "
                              "it writes", dataset=info.dataset)
        self._data_path = info.dataset
        self._stacked = info.stacked
        self._dtype = np.dtype(info.dtype)
        self._n_images = int(info.n_frames)
        self._masks = tuple(info.masks)
        if self._n_images == 0:
            raise FormatError(image_file, "the image stack holds no frames",
                              dataset=self._data_path)
        # Frames larger than the geometry's slab are read as the library reads them (the
        # panels' pixels; CrystFEL ignores the rest); smaller ones inspect_cxi refused.
        energy_path = self._geometry.photon_energy_path
        with h5py.File(image_file, "r") as h5:
            wavelength = self._geometry.wavelength_A or h5.attrs.get("wavelength_A")
            self._wavelengths = None
            if energy_path and isinstance(h5.get(energy_path.split()[0]), h5py.Dataset):
                energies = np.ravel(h5[energy_path.split()[0]][()]).astype(float)
                if (energies.size not in (1, self._n_images)
                        or not np.all(np.isfinite(energies) & (energies > 0))):
                    raise FormatError(image_file, "does not hold one positive photon energy "
                                      "(eV) per frame", dataset=energy_path.split()[0])
                self._wavelengths = HC_EV_A / np.resize(energies, self._n_images)
                wavelength = float(self._wavelengths[0])
        try:
            self._wavelength = float(wavelength) if wavelength is not None else None
        except (TypeError, ValueError):
            self._wavelength = None
        if not self._wavelength or not np.isfinite(self._wavelength) or self._wavelength <= 0:
            raise GeometryError(path, f"no positive numeric photon energy or wavelength, and "
                                f"{image_file} has no usable wavelength_A attribute")
        for panel in self._geometry.panels:
            if panel.clen_m is None:
                raise GeometryError(path, f"panel {panel.name} has no numeric camera length",
                                    line=panel.line)

    def get_num_images(self) -> int:
        return self._n_images

    def get_image_file(self, index: int | None = None) -> str:
        return self._image_file

    def _read(self, dataset: h5py.Dataset, index: int) -> np.ndarray:
        """Frame ``index`` of a stack, or the one frame of a single-frame file."""
        return np.asarray(dataset[index] if self._stacked else dataset[()])

    def _mask_good(self, per_frame: bool, index: int) -> list[np.ndarray] | None:
        """Good pixels per panel from the masks of the library's plan: the static ones (one
        mask of the frame shape), or those with one mask per frame (frame ``index``'s).  A
        mask of some panels only leaves the others' pixels good, as the library reads it."""
        n_dims = len(self._geometry.slab_shape)
        good: list[np.ndarray] | None = None
        for source in self._masks:
            with h5py.File(source.file or self._image_file, "r") as h5:
                stored = h5[source.dataset]
                if (stored.ndim == n_dims + 1) != per_frame:
                    continue
                raw = np.asarray(stored[index] if per_frame else stored[()])
            pieces = mask_good(raw, source.spec, source.panels, self._geometry)
            good = ([np.array(p, dtype=bool) for p in pieces] if good is None
                    else [g & p for g, p in zip(good, pieces, strict=True)])
        return good

    def get_raw_data(self, index: int | None = None) -> tuple:
        from scitbx.array_family import flex

        from peaknet_xtal.formats.cxi import flagged_ok, panel_flags

        index = index or 0
        with user_errors(self._image_file, f"read frame {index} of {self._data_path}"):
            with h5py.File(self._image_file, "r") as h5:
                slab = self._read(h5[self._data_path], index).astype(np.float64)
            frame_good = self._mask_good(True, index) if self._stacked else None
        low, high = self._trusted_range()
        with np.errstate(invalid="ignore"):
            untrusted = int(np.count_nonzero(~((slab > low) & (slab < high))))
        if untrusted:  # DIALS masks them by the trusted range; say so rather than silently
            log.warning("%s frame %d: %d pixels non-finite or at or beyond the trusted "
                        "range's ends, %g and %g, are masked%s", self._image_file, index,
                        untrusted, low, high,
                        "" if (low, high) == (-TRUSTED, TRUSTED) else
                        " (its ends: the largest value of the data's integer type, or -1 and "
                        "-2 in signed counts, which detector writers put in gaps and "
                        "defective or overloaded pixels)")
        panels = [np.array(p, dtype=np.float64) for p in self._geometry.split_slab(slab)]
        flags = panel_flags(self._geometry)
        if flags is not None:  # CrystFEL's flag_lessthan/morethan/equal, as the library reads
            for panel, panel_flag in zip(panels, flags, strict=True):
                panel[~flagged_ok(panel, panel_flag)] = MASKED_VALUE
        if frame_good is not None:
            # A mask per frame: dxtbx's static mask is one for the whole imageset, so this
            # frame's bad pixels are set below the trusted range, which DIALS (and
            # imageset.get_mask) masks frame by frame.
            for panel, good in zip(panels, frame_good, strict=True):
                panel[~good] = MASKED_VALUE
        return tuple(flex.double(np.ascontiguousarray(p)) for p in panels)

    def _trusted_range(self) -> tuple[float, float]:
        """DIALS keeps a pixel when ``low < value < high``: the values the data use for counts
        (``types.count_range``, which the library's other entry points mask by too), within
        +-TRUSTED.  Signed data are judged by their first frame (a trusted range is one per
        detector)."""
        if self._trusted is None:
            least = None
            if self._dtype.kind == "i":  # signed: the marks depend on the values held
                with user_errors(self._image_file, f"read frame 0 of {self._data_path}"):
                    with h5py.File(self._image_file, "r") as h5:
                        least = float(np.min(self._read(h5[self._data_path], 0)))
            low, high = count_range(self._dtype, least)
            self._trusted = (max(-TRUSTED, low), min(TRUSTED, high))
        return self._trusted

    def get_detector(self, index: int | None = None):
        if self._detector_cache is None:
            self._detector_cache = self._build_detector()
        return self._detector_cache

    def get_beam(self, index: int | None = None):
        if self._wavelengths is not None:  # one photon energy per frame
            return self._beam_factory.simple(float(self._wavelengths[index or 0]))
        if self._beam_cache is None:
            self._beam_cache = self._beam_factory.simple(float(self._wavelength or 0.0))
        return self._beam_cache

    def get_goniometer(self, index: int | None = None):
        return None

    def get_scan(self, index: int | None = None):
        return None

    def _build_detector(self):
        from dxtbx.model.detector import Detector

        detector = Detector()
        root = detector.hierarchy()
        # ADU per photon as every reader resolves it (finding.settings.resolve_gain: adu_per_photon,
        # else adu_per_eV at the beam's energy; a panel's own value first), else 1.
        from peaknet_xtal.finding.settings import resolve_gain

        def panel_gain(index: int) -> float:
            return float(resolve_gain(geometry=self._geometry, wavelength_A=self._wavelength,
                                      panel=index) or 1.0)
        origins, _, _ = self._geometry.panel_planes()  # the package's one placement model
        for index, panel in enumerate(self._geometry.panels):
            res = float(panel.res)
            corner = origins[index] * 1000.0
            fast = np.asarray(panel.fs, dtype=float)
            slow = np.asarray(panel.ss, dtype=float)
            pixel_mm = float(np.linalg.norm(fast)) / res * 1000.0
            p = root.add_panel()
            p.set_type("SENSOR_PAD")
            p.set_name(panel.name)
            p.set_image_size((panel.width, panel.height))
            p.set_pixel_size((pixel_mm, float(np.linalg.norm(slow)) / res * 1000.0))
            p.set_trusted_range(self._trusted_range())
            p.set_gain(panel_gain(index))
            f_hat, s_hat = orthonormal_axes(fast, slow)
            p.set_local_frame(to_dials(f_hat), to_dials(s_hat), to_dials(corner))
        return detector

    def get_static_mask(self, index: int | None = None):
        """Good pixels: the geometry's bad regions and its static masks (CrystFEL bits)."""
        from scitbx.array_family import flex

        if self._mask_cache is None:
            masks = [np.asarray(m, dtype=bool) for m in self._geometry.bad_pixel_masks()]
            with user_errors(self._image_file, "read its mask"):
                good = self._mask_good(False, 0)  # a mask per frame acts in get_raw_data
            if good is not None:
                masks = [m & g for m, g in zip(masks, good, strict=True)]
            self._mask_cache = tuple(flex.bool(np.ascontiguousarray(m)) for m in masks)
        return self._mask_cache
