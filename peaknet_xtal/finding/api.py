"""``PeakFinder``: the Python API for plain scripts, cctbx and DIALS users.

One object, built once from a model name or weights file, answers ``find(image)`` for whatever a
script has in hand: a 2-D numpy array, a list (or 3-D stack) of per-panel arrays, scitbx ``flex``
arrays, or a dxtbx ImageSet plus an image index.  It returns the package's peak table
(:data:`peaknet_xtal.types.PEAK_DTYPE`, 0-based pixel-centre panel coordinates) or, with
:meth:`PeakFinder.find_reflections`, a DIALS ``flex.reflection_table`` of strong spots ready for
``dials.index``.  dxtbx, scitbx and DIALS are imported only when such objects are used, so the
API works in any Python that has numpy and torch.

Example::

    from peaknet_xtal.finding import PeakFinder
    finder = PeakFinder("default", threshold=0.5, min_peaks=10)
    peaks = finder.find(image)                       # numpy (ss, fs)
    peaks = finder.find(imageset, 3)                 # dxtbx ImageSet, image 3
    strong = finder.find_reflections(imageset, 3)    # flex.reflection_table
    for peaks in finder.find_run(imageset):          # every image of a run, in order
        ...

A finder counts every image it is given towards one run, as ``peaknet2cxi`` and the DIALS
plugin do: pixels that spike in most images are learned as defects (hot pixels) and never
reported, and the gain of data that declare none is measured from their background
(:mod:`peaknet_xtal.finding.defects`, :mod:`peaknet_xtal.finding.gain`).  ``find_run`` also
reads a run's first images ahead so that its hot pixels are known from the first image on;
``defect_masks()`` / ``save_defects(folder)`` give the run's defect mask to reuse, and
``new_run()`` forgets what was learned before another detector or experiment.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from peaknet_xtal.errors import require_dials
from peaknet_xtal.finding.engine import InferenceEngine, Predictor
from peaknet_xtal.finding.peaks import is_hit
from peaknet_xtal.finding.settings import DEFAULTS, check_device
from peaknet_xtal.formats.dials_tables import CORNER_OFFSET
from peaknet_xtal.types import Frame


class PeakFinder:
    """Find Bragg peaks in images with a PeakNet model (see the module docstring).

    ``tile_size``: the largest panel side the model sees whole (:data:`DEFAULTS`: every panel
    whole); a larger panel is cut into overlapping tiles of at most that side, which saves
    memory on large panels at the price of a few peaks (the comment on
    ``FindingDefaults.tile_size``)."""

    def __init__(self, model: Any = DEFAULTS.model, device: str = DEFAULTS.device,
                 threshold: float = DEFAULTS.threshold, batch_size: int = DEFAULTS.batch_size,
                 min_peaks: int = DEFAULTS.min_peaks, max_peaks: int | None = DEFAULTS.max_peaks,
                 *, min_snr: float = DEFAULTS.min_snr, min_height: float = DEFAULTS.min_height,
                 rescue_prob: float = DEFAULTS.rescue_prob,
                 rescue_height: float = DEFAULTS.rescue_height,
                 faint_support: int = DEFAULTS.faint_support,
                 adu_per_photon: float | None = None,
                 threads: int | None = None, predictor: Predictor | None = None,
                 precision: str = DEFAULTS.precision,
                 tile_size: int = DEFAULTS.tile_size) -> None:
        if predictor is None:  # a predictor brings its own model and device
            if model is None:
                raise TypeError("model must be a registered model name ('default'), a weights "
                                "file or folder, or a model object, got None")
            check_device(device)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            # 0 meant the default and -2 failed inside torch at the first image
            raise ValueError(f"threads must be a whole number >= 1 (None: as many as the "
                             f"cores free), got {threads!r}")
        self.engine = InferenceEngine(model, device=device, threads=threads, precision=precision,
                                      batch_size=batch_size, tile_size=tile_size,
                                      threshold=threshold, min_snr=min_snr,
                                      min_height=min_height, rescue_prob=rescue_prob,
                                      rescue_height=rescue_height,
                                      faint_support=faint_support,
                                      min_peaks=min_peaks, max_peaks=max_peaks,
                                      adu_per_photon=adu_per_photon, predictor=predictor)
        self.engine.sanitised.reported_in = "PeakFinder.unusable_pixels()"
        #: files of imagesets whose frames are known to be all readable through dxtbx
        self._whole_files: set[str] = set()
        #: images given so far, which name an image without a file in warnings
        self._given = 0

    @property
    def min_peaks(self) -> int:
        return self.engine.peak_params.min_peaks

    def is_hit(self, peaks: np.ndarray) -> bool:
        """At least ``min_peaks`` peaks (default :data:`DEFAULTS` ``.min_peaks``; the hit rule of
        :mod:`peaknet_xtal.finding.settings`, the same as ``peaknet2cxi`` and the Ray pipeline
        apply)."""
        return is_hit(peaks, self.min_peaks)

    def find(self, data: Any, index: int = 0, *, mask: Any = None, geometry: Any = None,
             wavelength_A: float | None = None, with_bbox: bool = False) -> Any:
        """Peak table of one image, counted towards the finder's run (module docstring).

        ``data``: 2-D array, list/tuple of per-panel 2-D arrays, 3-D ``(panel, ss, fs)`` array,
        scitbx flex array(s), or a dxtbx ImageSet (``index`` picks the image; its corrected data,
        mask, detector and beam are used, so 1/d is filled, and the data count photons as far as
        the format's gain says, for the shot noise in each peak's SNR; warnings name the image's
        file, and an image file shorter than its header says, or an Eiger master whose data
        files dxtbx cannot all read, is a FormatError naming it; an image without a file, an
        array above all, is named ``PeakFinder image N``: the N-th image, from 0, that this
        finder was given).  ``mask`` (True = good)
        takes the same forms as ``data``; ``geometry`` (a CrystFEL
        :class:`~peaknet_xtal.formats.geometry.Geometry`) fills 1/d for array input.  ``with_bbox``
        also returns the ``(N, 4)`` boxes ``fs0, fs1, ss0, ss1`` (end exclusive) that
        :func:`reflection_table` takes.
        """
        peaks, boxes = self._find(data, index, mask, geometry, wavelength_A)
        return (peaks, boxes) if with_bbox else peaks

    def find_run(self, images: Any, *, mask: Any = None, geometry: Any = None,
                 wavelength_A: float | None = None, with_bbox: bool = False) -> Iterator[Any]:
        """Peak tables (pairs with ``with_bbox``) of a run's images, in order.

        ``images``: a dxtbx ImageSet (each of its images) or an iterable of images in any form
        :meth:`find` takes (``mask``, ``geometry``, ``wavelength_A`` apply to each: one mask for
        the run; an image with its own mask comes as a numpy masked array).  As
        ``peaknet2cxi`` finds a run: the first images are read ahead and counted by the defect
        filter, so a hot pixel is not reported on the run's first image either; from the image
        after the read-ahead on, :meth:`find` one image at a time gives the same peaks.
        """
        if (isinstance(images, np.ndarray) and images.ndim < 3) or hasattr(images,
                                                                          "as_numpy_array"):
            # one image: iterating it would hand its rows in as images
            raise TypeError("find_run takes a dxtbx ImageSet or an iterable of images (a list, "
                            "a 3-D stack of one-panel images, a generator); for one image use "
                            "find")
        sources: deque[tuple[Any, int]] = deque()

        def frames() -> Iterator[Frame]:
            pairs: Iterable[tuple[Any, int]] = (
                ((images, i) for i in range(len(images))) if _is_imageset(images)
                else ((image, 0) for image in images))
            for data, index in pairs:
                sources.append((data, index))
                yield self._frame(data, index, mask, geometry, wavelength_A)

        for result in self.engine.find_frames(frames(), with_bbox=True):
            data, index = sources.popleft()
            peaks = self._with_resolution(result.peaks, data, index)
            yield (peaks, result.peak_boxes) if with_bbox else peaks

    def find_reflections(self, data: Any, index: int = 0, *, mask: Any = None) -> Any:
        """Strong spots as a DIALS ``flex.reflection_table`` (needs DIALS).

        Columns as :func:`peaknet_xtal.formats.dials_tables.strong_reflection_table` writes
        them (the components' own boxes; z = the image's frame number + 0.5), which is what
        ``dials.index`` reads from ``strong.refl``.  An imageset's frame numbers are DIALS':
        its scan's first array index plus ``index`` (image 0 of ``image_range=5,7`` is frame
        4), so that the spots of a scan's slice map to its rotation angles.  Without DIALS, a
        :class:`~peaknet_xtal.errors.DialsUnavailable` (an ImportError) says so before the
        image is searched, as it does for a DIALS that fails to load: the import failed after
        the model's work, and the image had been counted towards the run.  (DIALS is imported
        here in a child process, once a process, and in this one after the search: imported
        before the model first runs, it would limit it to one thread.)
        """
        require_dials("PeakFinder.find_reflections (a DIALS reflection table)",
                      "dials.array_family.flex",
                      otherwise="use find, which gives a numpy peak table", load=False)
        peaks, boxes = self._find(data, index, mask, None, None)
        return reflection_table(peaks, boxes, z=frame_number(data, index)
                                if _is_imageset(data) else 0)

    def defect_masks(self) -> list[np.ndarray] | None:
        """Per panel, True where a pixel is good and False on the run's pixel defects (hot,
        stuck, flickering: :mod:`peaknet_xtal.finding.defects`); None before enough images."""
        return self.engine.defects.tracker.good_masks()

    def save_defects(self, folder: Any, geometry: Any = None) -> list[Any]:
        """Write the run's defect mask into ``folder`` as ``peaknet2cxi`` does beside its output
        (``pixel_defects.h5`` for a mask slot ``geometry`` leaves free, ``maskN_file`` with N
        from 1 to 7, as the log says; ``pixel_defects.mask`` for DIALS where DIALS is
        importable); the paths written (none before enough images)."""
        return self.engine.defects.save(folder, geometry)

    def unusable_pixels(self) -> dict[str, int]:
        """Counts over every image this finder was given: the images with unusable pixels
        (non-finite, absurd, gap or bad-pixel marks, panels of one value: masked) or without
        data (every pixel one value), and those pixels by kind (``finding.sanitise``).  The
        warnings name the first images only, then point here."""
        return self.engine.sanitised.as_dict()

    def new_run(self) -> None:
        """Forget the run so far (its pixel defects and measured gain): the next image starts
        a new run, e.g. on another detector."""
        self.engine.new_run()

    # ---- internals ---------------------------------------------------------------------------
    def _frame(self, data: Any, index: int, mask: Any, geometry: Any,
               wavelength_A: float | None) -> Frame:
        """One image as the finding pipeline's frame: panels, good-pixel masks, declared gain."""
        gain, dtype, source, event = None, None, "", "//"
        number, self._given = self._given, self._given + 1
        if _is_imageset(data):
            from peaknet_xtal.finding.sanitise import implied_dtype
            from peaknet_xtal.formats.dxtbx_images import CORRECTED_GAIN, check_every_linked_frame

            # a caller's index, said as that: dxtbx's own words were an internal assertion (or
            # an OverflowError, a boost ArgumentError), wrapped as a file that cannot be read
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                raise TypeError(f"index {index!r}: an image number of the imageset, an int")
            if not 0 <= int(index) < len(data):
                raise IndexError(f"index {index}: the imageset holds {len(data)} image(s), "
                                 f"numbered 0 to {len(data) - 1}")

            source, event = image_source(data, index)
            if source and source not in self._whole_files:
                check_every_linked_frame(data, source)
                self._whole_files.add(source)
            panels, masks = imageset_panels(data, index)
            dtype = implied_dtype(panels)  # what marks gaps: dxtbx says no type
            gain = CORRECTED_GAIN  # dxtbx divided by the format's gain: photons, as DIALS sees
        else:
            if index != 0:  # silently the image itself otherwise, whatever index asked for
                raise ValueError(f"index {index} picks an image of a dxtbx ImageSet; an array "
                                 "input is one image (a 3-D array: its panels), so give that "
                                 "image with index 0")
            data, masks = _unmasked(data)
            panels = _panels_of(data, geometry, "the image")
            if masks is not None:
                masks = _panels_of(masks, geometry, "the image's own mask")
            from peaknet_xtal.finding.sanitise import implied_dtype

            # floats of whole numbers mark gaps as the imageset's do (get_corrected_data
            # hands a Pilatus frame's -1 gaps over as -1.0: 283 peaks where the imageset
            # itself gave 493); an integer array says its type itself
            dtype = implied_dtype(panels)
        if mask is not None:
            try:
                given = [_good_pixels(m) for m in _panels_of(mask, geometry, "mask")]
            except ValueError as exc:  # e.g. a list of per-image masks given to find_run
                raise ValueError(f"mask: {exc}; mask is one image's good pixels (a 2-D array, a "
                                 "3-D stack of panels or a list of per-panel arrays), the same "
                                 "for every image of find_run; give images their own masks as "
                                 "numpy masked arrays (numpy.ma, masked = bad)") from None
            if masks is not None and len(given) != len(masks):
                raise ValueError(f"mask: {len(given)} panel(s), where the image has "
                                 f"{len(masks)}; give one good-pixel array per panel")
            masks = given if masks is None else [a & b for a, b in zip(masks, given, strict=True)]
        if not source:  # an array, or an imageset in memory: its place in the finder's images
            source, event = f"PeakFinder image {number}", ""
        return Frame(panels=panels, masks=masks, geometry=geometry, source=source, event=event,
                     meta={"wavelength_A": wavelength_A, "adu_per_photon": gain,
                           "dtype": dtype})

    def _find(self, data: Any, index: int, mask: Any, geometry: Any,
              wavelength_A: float | None) -> tuple[np.ndarray, np.ndarray]:
        frame = self._frame(data, index, mask, geometry, wavelength_A)
        (result,) = self.engine.find_frames([frame], with_bbox=True)
        assert result.peak_boxes is not None  # with_bbox
        return self._with_resolution(result.peaks, data, index), result.peak_boxes

    @staticmethod
    def _with_resolution(peaks: np.ndarray, data: Any, index: int) -> np.ndarray:
        """``peaks`` with 1/d from the imageset's models (array input: from ``geometry``)."""
        if _is_imageset(data) and len(peaks):
            peaks["one_over_d"] = dxtbx_one_over_d(data, index, peaks)
        return peaks


def to_panels(data: Any) -> list[np.ndarray]:
    """Per-panel 2-D numpy arrays from numpy or flex input (one array, a stack or a sequence)."""
    if hasattr(data, "as_numpy_array"):  # a single scitbx flex array
        return [_two_d(data.as_numpy_array(), 0)]
    if isinstance(data, np.ndarray):
        if data.ndim == 2:
            return [_two_d(data, 0)]
        if data.ndim == 3:
            return [_two_d(panel, i) for i, panel in enumerate(data)]
        raise ValueError(f"an image must be 2-D (ss, fs) or 3-D (panel, ss, fs), got {data.shape}")
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return [_two_d(p.as_numpy_array() if hasattr(p, "as_numpy_array") else np.asarray(p), i)
                for i, p in enumerate(data)]
    raise TypeError(f"cannot read an image from {type(data).__name__}; give a numpy array, "
                    "a list of per-panel arrays, flex arrays or a dxtbx ImageSet")


def _two_d(array: np.ndarray, panel: int) -> np.ndarray:
    if array.ndim != 2:
        raise ValueError(f"panel {panel} must be 2-D (ss, fs), got shape {array.shape}")
    if array.size == 0:  # found 0 peaks and said nothing
        raise ValueError(f"panel {panel} is empty (shape {array.shape})")
    return array


def _unmasked(data: Any) -> tuple[Any, Any]:
    """``(data, good)``: numpy masked arrays (one, or some of a list of panels) as their values
    and True where a value is not masked; ``good`` is None when nothing is masked that way.
    Why: a masked array is an ndarray, so its masked values (1e6 under a mask, a real trial's
    saturated pixels) went to the model as pixels and came out as peaks."""
    if isinstance(data, np.ma.MaskedArray):
        return np.ma.getdata(data), ~np.ma.getmaskarray(data)
    if (isinstance(data, Sequence) and not isinstance(data, (str, bytes))
            and any(isinstance(p, np.ma.MaskedArray) for p in data)):
        return ([np.ma.getdata(p) if isinstance(p, np.ma.MaskedArray) else p for p in data],
                [~np.ma.getmaskarray(p) if isinstance(p, np.ma.MaskedArray)
                 else np.ones(np.shape(p), bool) for p in data])
    return data, None


def _panels_of(data: Any, geometry: Any, what: str) -> list[np.ndarray]:
    """Per-panel arrays of ``data``; with a geometry, its panels: one frame's raw array in the
    geometry's layout (``slab_shape``) is split as ``peaknet2cxi`` splits it, and panels handed
    one by one must be as many, and of the shapes, the geometry says.  Why: a CSPAD slab with
    its 64-panel geometry was found as one panel, every peak on panel 0 with a wrong 1/d."""
    if geometry is None:
        return to_panels(data)
    if np.shape(data) == tuple(geometry.slab_shape) and (
            geometry.n_panels > 1 or len(geometry.slab_shape) != 2):
        return list(geometry.split_slab(np.asarray(data)))
    panels = to_panels(data)
    shapes = [tuple(np.shape(p)) for p in panels]
    wanted = [tuple(p.shape) for p in geometry.panels]
    if shapes != wanted:
        raise ValueError(
            f"{what} does not fit the geometry{' ' + str(geometry.path) if geometry.path else ''}"
            f": {len(shapes)} panel(s) of shape(s) {sorted(set(shapes))}, where it has "
            f"{len(wanted)} panel(s) of shape(s) {sorted(set(wanted))} or one array of its "
            f"layout {tuple(geometry.slab_shape)}")
    return panels


def _good_pixels(mask: Any) -> np.ndarray:
    """A panel's good-pixel mask as booleans.  Anything but booleans or 0/1 is refused: it was
    cast (0.5, NaN and a CrystFEL bad bit such as 2 all read as good), so a pixel-status map,
    which marks the bad pixels, passed as a good-pixel mask without a word."""
    values = np.asarray(mask)
    if values.dtype == bool:
        return values
    odd = ~((values == 0) | (values == 1))
    if odd.any():
        example = values[odd].flat[0]
        raise ValueError(f"mask: {int(odd.sum())} value(s) other than 0 and 1 (e.g. "
                         f"{example!r}); the mask is the good pixels, True or 1 where a pixel "
                         "is good (a pixel-status or bad-pixel map is its inverse: pass "
                         "status == 0)")
    return values.astype(bool)


def _is_imageset(data: Any) -> bool:
    return hasattr(data, "get_corrected_data") and hasattr(data, "get_detector")


def image_source(imageset: Any, index: int) -> tuple[str, str]:
    """The file and CrystFEL event of image ``index`` of an imageset, which name it in warnings
    as ``peaknet2cxi`` names it: ``//N`` for image N of a file of several (a NeXus master),
    ``//`` for a file of one image (a one-shot NeXus file too); ``("", "//")`` for an imageset
    without files.  Why: the warnings of images found through an ImageSet read ``frame //:
    masked ...``, naming no file."""
    try:
        path = str(imageset.get_path(index))
    except Exception:  # noqa: BLE001 - an imageset without paths (in memory)
        return "", "//"
    try:
        from dxtbx.format.FormatMultiImage import FormatMultiImage

        format_class = imageset.get_format_class()
        if issubclass(format_class, FormatMultiImage) and \
                format_class.get_instance(path).get_num_images() > 1:
            return path, f"//{int(imageset.indices()[index])}"
    except Exception:  # noqa: BLE001 - no format class to ask: the file alone names it
        pass
    return path, "//"


def imageset_panels(imageset: Any, index: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Corrected pixels and trusted-pixel masks of image ``index``, as DIALS spot finding sees
    them (:func:`peaknet_xtal.formats.dxtbx_images.image_arrays`)."""
    from peaknet_xtal.formats.dxtbx_images import image_arrays

    return image_arrays(imageset, index)


def frame_number(imageset: Any, index: int) -> int:
    """DIALS' frame number of image ``index`` of an imageset: its scan's first array index plus
    ``index`` (an imageset without a scan, a still: ``index``)."""
    scan = imageset.get_scan() if hasattr(imageset, "get_scan") else None
    return (int(scan.get_array_range()[0]) if scan is not None else 0) + int(index)


def dxtbx_one_over_d(imageset: Any, index: int, peaks: np.ndarray) -> np.ndarray:
    """1/d (1/Angstrom) of each peak from the imageset's detector and beam models; NaN where
    the imageset has no beam model (DIALS finds spots without one)."""
    detector, beam = imageset.get_detector(index), imageset.get_beam(index)
    if beam is None or detector is None:
        return np.full(len(peaks), np.nan)
    s0 = beam.get_s0()
    out = np.empty(len(peaks))
    columns = zip(peaks["panel"], peaks["fs"], peaks["ss"], strict=True)
    for k, (panel, fs, ss) in enumerate(columns):
        d = detector[int(panel)].get_resolution_at_pixel(
            s0, (float(fs) + CORNER_OFFSET, float(ss) + CORNER_OFFSET))
        out[k] = 1.0 / d if d > 0 else np.nan
    return out


def reflection_table(peaks: np.ndarray, boxes: np.ndarray, z: int = 0,
                     experiment_id: int = 0) -> Any:
    """A DIALS strong-spot ``flex.reflection_table`` from a peak table and its boxes
    (:func:`peaknet_xtal.formats.dials_tables.strong_reflection_table`)."""
    from peaknet_xtal.formats.dials_tables import strong_reflection_table

    return strong_reflection_table([peaks], boxes=[boxes], z0=z, experiment_ids=[experiment_id])
