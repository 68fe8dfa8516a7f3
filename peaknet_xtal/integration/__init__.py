"""Photons per spot with honest uncertainties: an amortised variational integrator (issue 18).

- :mod:`.shoebox`: fixed-size pixel boxes around spots, in photons, with mask and metadata;
- :mod:`.model`: the generative model, the variational family and the ELBO (torch);
- :mod:`.train`: ELBO training on unlabelled shoeboxes, batched posterior inference;
- :mod:`.summation`: the background-subtracted summation baseline;
- :mod:`.api`: :class:`Integrator`; :mod:`.files`: CXI peak tables, CrystFEL streams, DIALS;
- :mod:`.simdata` and :mod:`.evaluation`: simulated shoeboxes with truth and the checks on them.

Torch is imported only when a model is built or used.
"""
from __future__ import annotations

from peaknet_xtal.integration.api import INTEGRATION_DTYPE, Integrator
from peaknet_xtal.integration.shoebox import Shoeboxes, extract_shoeboxes
from peaknet_xtal.integration.summation import summation

__all__ = ["INTEGRATION_DTYPE", "Integrator", "Shoeboxes", "extract_shoeboxes", "summation"]
