"""dxtbx Format for CXI stacks with a CrystFEL geometry beside them, so DIALS imports them.

``dials.import run.cxi`` works when ``run.cxi`` has ``/entry_1/data_1/data`` (frames, then the raw
slab layout) and a CrystFEL geometry either named by the file attribute ``peaknet_geometry``
(relative to the file's folder; ``peaknet-sim`` writes it) or sitting beside it with the same stem
(``run.geom``).  The geometry must give the camera length and photon energy as numbers.

Frames: CrystFEL lab coordinates (+z along the beam, +y up) become DIALS lab coordinates
(the beam travels along -z, +y up) by a half turn about y: ``(x, y, z) -> (-x, y, -z)``, in mm.
A panel's DIALS origin is the outer corner of its first pixel, exactly CrystFEL's ``corner_x/y``.
"""
from __future__ import annotations

import os

import h5py
import numpy as np
from dxtbx.format.FormatHDF5 import FormatHDF5
from dxtbx.format.FormatStill import FormatStill

DATA_PATH = "/entry_1/data_1/data"
MASK_PATH = "/entry_1/data_1/mask"
GEOMETRY_ATTR = "peaknet_geometry"


def geometry_path(image_file: str) -> str | None:
    """The CrystFEL geometry that belongs to ``image_file``, or None."""
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
    candidates.append(os.path.splitext(image_file)[0] + ".geom")
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


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


class FormatCXIPeakNet(FormatHDF5, FormatStill):
    """A CXI stack of stills (``/entry_1/data_1/data``) described by a CrystFEL geometry."""

    @staticmethod
    def understand(image_file: str) -> bool:
        try:
            with h5py.File(image_file, "r") as h5:
                data = h5.get(DATA_PATH)
                if not isinstance(data, h5py.Dataset) or data.ndim < 3:
                    return False
        except OSError:
            return False
        return geometry_path(image_file) is not None

    def __init__(self, image_file: str, **kwargs: object) -> None:
        self._geometry = None
        self._n_images = 0
        self._detector_cache = None
        self._beam_cache = None
        self._mask_cache = None
        super().__init__(image_file, **kwargs)

    def _start(self) -> None:
        from peaknet_xtal.formats.geometry import read_geometry

        path = geometry_path(self._image_file)
        self._geometry = read_geometry(path)
        with h5py.File(self._image_file, "r") as h5:
            data = h5[DATA_PATH]
            self._n_images = int(data.shape[0])
            slab = tuple(self._geometry.slab_shape)
            if tuple(data.shape[1:]) != slab:
                raise ValueError(f"{self._image_file}: dataset {DATA_PATH} frames have shape "
                                 f"{data.shape[1:]}, but {path} describes {slab}")
            self._wavelength = self._geometry.wavelength_A or h5.attrs.get("wavelength_A")
        if not self._wavelength:
            raise ValueError(f"{path}: no numeric photon energy or wavelength, and "
                             f"{self._image_file} has no wavelength_A attribute")
        for panel in self._geometry.panels:
            if panel.clen_m is None:
                raise ValueError(f"{path}: panel {panel.name} has no numeric camera length")

    def get_num_images(self) -> int:
        return self._n_images

    def get_image_file(self, index: int | None = None) -> str:
        return self._image_file

    def get_raw_data(self, index: int | None = None) -> tuple:
        from scitbx.array_family import flex

        with h5py.File(self._image_file, "r") as h5:
            slab = h5[DATA_PATH][index or 0]
        return tuple(flex.double(np.ascontiguousarray(p, dtype=np.float64))
                     for p in self._geometry.split_slab(slab))

    def get_detector(self, index: int | None = None):
        if self._detector_cache is None:
            self._detector_cache = self._build_detector()
        return self._detector_cache

    def get_beam(self, index: int | None = None):
        if self._beam_cache is None:
            self._beam_cache = self._beam_factory.simple(float(self._wavelength))
        return self._beam_cache

    def get_goniometer(self, index: int | None = None):
        return None

    def get_scan(self, index: int | None = None):
        return None

    def _build_detector(self):
        from dxtbx.model.detector import Detector

        detector = Detector()
        root = detector.hierarchy()
        # The gain stays adu_per_photon (else 1), ignoring adu_per_eV, as the simulator does
        # (sim.simulate.resolve_beam): its stacks are written at that gain.  Both move to
        # finding.settings.resolve_gain together.
        gain = self._geometry.adu_per_photon or 1.0
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
            p.set_trusted_range((-1e9, 1e9))
            p.set_gain(float(panel.adu_per_photon or gain))
            f_hat, s_hat = orthonormal_axes(fast, slow)
            p.set_local_frame(to_dials(f_hat), to_dials(s_hat), to_dials(corner))
        return detector

    def get_static_mask(self, index: int | None = None):
        """Good pixels: the geometry's bad regions and its static mask dataset (CrystFEL bits)."""
        from peaknet_xtal.formats.cxi import mask_bits_ok
        from scitbx.array_family import flex

        if self._mask_cache is None:
            masks = self._geometry.bad_pixel_masks()
            with h5py.File(self._image_file, "r") as h5:
                stored = h5.get(self._geometry.mask or MASK_PATH)
                if isinstance(stored, h5py.Dataset) and stored.shape == tuple(
                        self._geometry.slab_shape):
                    good = self._geometry.split_slab(mask_bits_ok(stored[()], self._geometry))
                    masks = [m & g for m, g in zip(masks, good)]
            self._mask_cache = tuple(flex.bool(np.ascontiguousarray(m)) for m in masks)
        return self._mask_cache
