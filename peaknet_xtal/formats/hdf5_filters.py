"""The HDF5 compression filters detector data are written with, available to every reader here.

Why: DECTRIS Eiger file writers, Jungfraujoch and most facility HDF5 writers store frames with
bitshuffle + LZ4 (HDF5 filter 32008), some with LZ4 (32004), Blosc or Zstd.  HDF5 itself decodes
only gzip, szip, shuffle and fletcher32; CrystFEL and DIALS read the others through plugins found
on ``HDF5_PLUGIN_PATH``, which the HDF5 inside h5py's wheels (and Debian's libhdf5) do not ship.
Without them such a file opens, lists its datasets, and fails on the first frame read.  The
``hdf5plugin`` package (a dependency) builds these filters and registers them with the HDF5
library h5py loaded, in this process: importing :mod:`peaknet_xtal.formats` calls
:func:`register_hdf5_filters`, so ``peaknet2cxi``, the dxtbx format and the Python API read such
files as they are, and so does DIALS wherever the project's DIALS plugin is imported.  A filter
neither h5py nor ``hdf5plugin`` knows is still one clear error naming the file and the filter
(``formats.cxi.check_image_dataset``).
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

#: Filters detector data use and their HDF5 ids (registered by ``hdf5plugin``).
DETECTOR_FILTERS = {"bitshuffle": 32008, "lz4": 32004, "blosc": 32001, "zstd": 32015,
                    "bzip2": 307}


@functools.cache
def register_hdf5_filters() -> tuple[str, ...]:
    """Make the compression filters of ``hdf5plugin`` available to h5py (once a process); the
    names of :data:`DETECTOR_FILTERS` h5py can decode afterwards.  Without ``hdf5plugin``
    installed nothing changes (logged at debug level)."""
    import h5py

    try:
        import hdf5plugin  # noqa: F401  # registers its filters on import
    except ImportError:
        log.debug("hdf5plugin is not installed: HDF5 filters come from HDF5_PLUGIN_PATH only")
    return tuple(name for name, code in DETECTOR_FILTERS.items() if h5py.h5z.filter_avail(code))
