"""``Integrator``: photons per spot with posterior uncertainties, from images and positions.

    from peaknet_xtal.integration import Integrator
    integ = Integrator()                                  # the shipped default, CPU or CUDA
    table = integ.integrate(frame, panel, fs, ss, gain=1.0, read_noise=0.1)

``table`` (:data:`INTEGRATION_DTYPE`) holds the variational posterior mean and standard deviation
of the spot's photons and of the background per pixel, the likelihood-only estimate of the photons
(``lik_photons``/``lik_sigma``: profile fitting with the learned profile, no intensity prior; what
a merger with its own prior should get, see ``VIIntegrator.likelihood_photons``), a profile
summary (centroid and width of the fitted profile, panel coordinates) and, side by side, the
background-subtracted summation of the same shoebox.  Positions follow the package convention
(panel-relative pixel centres).  Pass all the spots of a frame in one call: pixels nearer to
another spot than to this one are left out of its VI fit (``shoebox.owned_pixels``), so
neighbours do not leak into each other.  The weights' config carries everything the posterior
needs, the selected ``profile_noise`` included, so every caller of the API gets the same
calibrated sigma.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from peaknet_xtal.integration.shoebox import Shoeboxes, extract_shoeboxes
from peaknet_xtal.integration.summation import summation

#: One row per integrated spot.
INTEGRATION_DTYPE = np.dtype([
    ("photons", "f8"), ("photons_sigma", "f8"),  # VI posterior mean and std of the photons
    ("lik_photons", "f8"), ("lik_sigma", "f8"),  # VI likelihood alone (profile fit): for mergers
    ("background", "f8"), ("background_sigma", "f8"),  # VI, photons per pixel
    ("profile_fs", "f8"), ("profile_ss", "f8"),  # profile centroid, panel pixel centres
    ("profile_sigma_fs", "f8"), ("profile_sigma_ss", "f8"),  # profile width (pixels)
    ("profile_observed", "f8"),  # fraction of the profile on valid pixels
    ("sum_photons", "f8"), ("sum_sigma", "f8"),  # background-subtracted summation
])

log = logging.getLogger(__name__)


class Integrator:
    """A loaded variational integrator plus the summation baseline over the same shoeboxes."""

    def __init__(self, weights: Any = "default", *, device: str = "cpu",
                 batch_size: int = 4096) -> None:
        from peaknet_xtal.integration.weights import load_integrator

        self.model = weights if hasattr(weights, "summary") else load_integrator(weights, device)
        self.device = device
        self.batch_size = int(batch_size)

    @property
    def radius(self) -> int:
        return int(self.model.side) // 2

    def integrate_boxes(self, boxes: Shoeboxes) -> np.ndarray:
        """Integrate ready-made shoeboxes (sides must match the model's)."""
        from peaknet_xtal.integration.train import posterior

        if len(boxes) and boxes.side != self.model.side:
            raise ValueError(f"shoeboxes are {boxes.side} px wide; the integrator expects "
                             f"{self.model.side}")
        table = np.zeros(len(boxes), INTEGRATION_DTYPE)
        if len(boxes) == 0:
            return table
        post = posterior(self.model, boxes, batch_size=self.batch_size, device=self.device)
        base = summation(boxes)
        for name in ("photons", "photons_sigma", "background", "background_sigma",
                     "profile_sigma_fs", "profile_sigma_ss", "profile_observed"):
            table[name] = post[name]
        table["profile_fs"] = np.floor(boxes.fs + 0.5) + post["profile_dfs"]
        table["profile_ss"] = np.floor(boxes.ss + 0.5) + post["profile_dss"]
        table["lik_photons"] = post["photons_lik"]
        table["lik_sigma"] = post["photons_lik_sigma"]
        table["sum_photons"] = base["photons"]
        table["sum_sigma"] = base["photons_sigma"]
        failed = int(np.count_nonzero(np.isnan(table["photons"]) | np.isnan(table["lik_photons"])))
        if failed:
            # said once per call, with the reason: a NaN in a table is otherwise a mystery
            log.warning("%d of %d spots: no photons measured (no usable pixel under the spot, "
                        "or posterior moments that came out non-positive or not finite: "
                        "non-finite pixels or a fit that failed); written as NaN (the summation "
                        "columns are kept)", failed, len(boxes))
        return table

    def integrate(self, frame: Any, panel: Any, fs: Any, ss: Any, *, gain: float = 1.0,
                  read_noise: float = 0.0, one_over_d: Any = None,
                  wavelength_A: float | None = None, clen_m: float | None = None) -> np.ndarray:
        """Integrate spots at ``(panel, fs, ss)`` of one :class:`~peaknet_xtal.types.Frame`,
        or of an image given as ``PeakFinder.find`` takes one (a 2-D array, a stack of panels,
        a list of per-panel arrays, numpy or flex), whose peaks' columns can be passed as they
        are.

        ``gain`` is ADU per photon, ``read_noise`` the Gaussian read noise in photons.  The
        frame's pixels are used as the finder uses them (``finding.sanitise``): a gap's marked
        value (65535 in uint16 Eiger frames) or a NaN is no count in any shoebox.
        """
        from peaknet_xtal.finding.sanitise import sanitise_frame
        from peaknet_xtal.types import Frame

        if not isinstance(frame, Frame):  # the image as the finder takes it (README's example)
            from peaknet_xtal.finding.api import to_panels

            frame = Frame(panels=to_panels(frame))

        masks = sanitise_frame(frame.panels, frame.masks, frame.meta.get("dtype"))[1]
        boxes = extract_shoeboxes(frame.panels, masks, np.asarray(panel), np.asarray(fs),
                                  np.asarray(ss), gain=gain, read_noise=read_noise,
                                  one_over_d=one_over_d, geometry=frame.geometry,
                                  wavelength_A=wavelength_A or frame.meta.get("wavelength_A"),
                                  clen_m=clen_m, radius=self.radius)
        return self.integrate_boxes(boxes)
