"""Pipeline test fixtures: real CXI stacks on disk, and a reader of the CXI files it writes."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from peaknet_xtal.formats.cxi import read_cxi_peaks

SHAPE = (32, 48)


def write_stack(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` small frames with a few bright pixels each (frame i has i % 4 + 1 peaks)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(5.0, 1.0, size=(n, *SHAPE)).astype(np.float32)
    for i in range(n):
        for j in range(i % 4 + 1):
            data[i, 4 + 6 * j, 5 + 9 * j] = 500.0 + i
    with h5py.File(path, "w") as h5:
        h5.create_dataset("/entry_1/data_1/data", data=data)
    return path


def written_keys(directory: Path) -> Counter:
    """How many times each ``(source, event)`` appears across every finished CXI file."""
    counts: Counter = Counter()
    for path in sorted(Path(directory).rglob("*.cxi")):
        counts.update(tuple(k) for k in read_cxi_peaks(path).keys)
    return counts


def expected_keys(path: Path, n: int) -> set[tuple[str, str]]:
    return {(str(Path(path).resolve()), f"//{i}") for i in range(n)}


@pytest.fixture()
def stacks() -> SimpleNamespace:
    """The helpers above, as one fixture (test modules here cannot import each other)."""
    return SimpleNamespace(write=write_stack, written=written_keys, expected=expected_keys)
