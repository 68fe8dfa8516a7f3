"""File formats, one module each (``read_*`` / ``write_*``): CXI/HDF5 stacks and peak tables
(:mod:`.cxi`), CrystFEL geometries (:mod:`.geometry`, their rules :mod:`.geometry_rules`) and
streams (:mod:`.stream`), DIALS reflection tables (:mod:`.dials_tables`), images through dxtbx
(:mod:`.dxtbx_images`).  Importing the package makes the HDF5 compression filters of detector
data (bitshuffle/LZ4 and others) readable (:mod:`.hdf5_filters`)."""
from peaknet_xtal.formats.hdf5_filters import register_hdf5_filters

register_hdf5_filters()
