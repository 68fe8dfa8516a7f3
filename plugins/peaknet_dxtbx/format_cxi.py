"""dxtbx Format for CXI stacks with a CrystFEL geometry beside them (work in progress)."""
from __future__ import annotations

from dxtbx.format.FormatHDF5 import FormatHDF5
from dxtbx.format.FormatStill import FormatStill


class FormatCXIPeakNet(FormatHDF5, FormatStill):
    """Placeholder: understands nothing yet."""

    @staticmethod
    def understand(image_file):
        return False
