"""Synthetic Gaussian-blob frames written as real stream2labels-layout HDF5 files (tests only)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest


def blob_frames(n: int, shape: tuple[int, int], seed: int, gain: float = 25.0,
                spots: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson background plus Gaussian spots; label = spot pixels above half maximum."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((n, h, w), np.float32)
    labels = np.zeros((n, h, w), bool)
    masks = np.ones((n, h, w), bool)
    for i in range(n):
        photons = rng.poisson(2.0, size=shape).astype(np.float64)
        for _ in range(spots):
            cy, cx = rng.uniform(4, h - 4), rng.uniform(4, w - 4)
            sigma, amp = rng.uniform(0.8, 1.5), rng.uniform(40, 400)
            profile = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
            photons += rng.poisson(amp * profile)
            labels[i] |= profile >= 0.5
        images[i] = photons * gain - 50.0
        masks[i, :, rng.integers(w)] = False
    return images, masks, labels & masks


def write_label_file(path: Path, n: int = 6, shape: tuple[int, int] = (72, 80),
                     seed: int = 0) -> Path:
    images, masks, labels = blob_frames(n, shape, seed)
    with h5py.File(path, "w") as handle:
        handle["images"] = images
        handle["masks"] = masks
        handle["labels"] = labels.astype(np.uint8)
    return path


@pytest.fixture
def label_file(tmp_path: Path) -> Path:
    return write_label_file(tmp_path / "labels.h5")


@pytest.fixture
def make_blobs():
    """The synthetic frame generator, for tests that need held-out frames."""
    return blob_frames
