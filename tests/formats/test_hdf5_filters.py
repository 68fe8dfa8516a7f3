"""formats.hdf5_filters: detector data compressed as Eiger and Jungfraujoch write it (bitshuffle
+ LZ4) read as they are once the package is imported; a filter nobody provides is one clear
error naming the file and the filter."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from peaknet_xtal.errors import FormatError
from peaknet_xtal.formats.cxi import check_image_dataset
from peaknet_xtal.formats.hdf5_filters import DETECTOR_FILTERS, register_hdf5_filters

FRAMES = np.random.default_rng(0).poisson(3.0, (2, 64, 80)).astype(np.uint16)


def write(path: Path, **compression: object) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=FRAMES, chunks=(1, 64, 80), **compression)
    return path


@pytest.mark.parametrize("name, compression", [
    ("bitshuffle", hdf5plugin.Bitshuffle(cname="lz4")), ("lz4", hdf5plugin.LZ4()),
    ("zstd", hdf5plugin.Zstd())])
def test_a_fresh_process_reads_compressed_frames_after_importing_the_formats(
        tmp_path, name, compression):
    path = write(tmp_path / f"{name}.h5", **compression)
    with h5py.File(path) as h5:
        code = h5["entry/data/data"].id.get_create_plist().get_filter(0)[0]
    assert code == DETECTOR_FILTERS[name]
    script = (
        "import sys, h5py, numpy\n"
        f"before = h5py.h5z.filter_avail({code})\n"
        "import peaknet_xtal.formats\n"
        f"after = h5py.h5z.filter_avail({code})\n"
        "with h5py.File(sys.argv[1]) as h5:\n"
        "    frames = h5['entry/data/data'][...]\n"
        "numpy.save(sys.argv[2], frames)\n"
        "print(before, after)\n")
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "f.npy")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "True"
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), FRAMES)


def test_every_detector_filter_is_registered():
    assert set(register_hdf5_filters()) == set(DETECTOR_FILTERS)


def test_a_filter_this_hdf5_lacks_names_the_file_and_the_filter(tmp_path, monkeypatch):
    path = write(tmp_path / "eiger.h5", **hdf5plugin.Bitshuffle(cname="lz4"))
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda code: code != 32008)
    with h5py.File(path) as h5, pytest.raises(FormatError) as err:
        check_image_dataset(str(path), "/entry/data/data", h5["entry/data/data"])
    message = str(err.value)
    assert str(path) in message and "32008" in message and "HDF5_PLUGIN_PATH" in message
