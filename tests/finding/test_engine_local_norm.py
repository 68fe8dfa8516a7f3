"""The engine with a locally normalised model: whole panels are normalised once, before tiling.

The model here is a real torch module whose peak logit is a fixed function of the normalised
pixel (z above 2.5 is a peak), so the peaks it gives are known exactly from its input; that makes
any dependence of the input on tile cuts, layout or a smooth gradient visible as changed peaks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from peaknet_xtal.finding.engine import InferenceEngine
from peaknet_xtal.finding.peaks import PeakParams
from peaknet_xtal.model.layers.local_norm import NOISE_SCALES, local_normalise
from peaknet_xtal.sim.artifacts import correlated_noise
from peaknet_xtal.types import Frame


class LocalThreshold(nn.Module):
    """Peak logit ``8 * (z - 2.5)`` of the locally normalised input ``z``."""

    def __init__(self, noise_scale: str = "pixel") -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.config = {"input_norm": "local", "norm_block": 16, "norm_noise": noise_scale}
        self.calls: list[bool] = []

    def normalise(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return local_normalise(x, valid, 16, self.config["norm_noise"])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                normalised: bool = False) -> torch.Tensor:
        self.calls.append(normalised)
        valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        z = x if normalised else self.normalise(x, valid)
        peak = torch.where(valid, 8 * (z - 2.5) * self.scale, torch.full_like(z, -30.0))
        return torch.cat([torch.zeros_like(z), peak], dim=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def strong_panel(rng: np.random.Generator, shape: tuple[int, int],
                 spots: int = 25) -> np.ndarray:
    """A Rayonix-like panel: 2,500-3,800 ADU, a wave and a ramp, 33 ADU correlated noise,
    sharp spots 150-1,500 ADU high."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    image = 2500 + 900 * np.sin(xx / 150.0) + 600 * yy / shape[0]
    image = image + 33 * correlated_noise(rng, shape, 0.6)
    for _ in range(spots):
        cy, cx = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
        height, sigma = rng.uniform(150, 1500), rng.uniform(0.5, 1.2)
        image += height * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    return image.astype(np.float32)


def peak_set(peaks: np.ndarray, dy: float = 0.0, dx: float = 0.0) -> set[tuple[float, float]]:
    return {(round(float(p["ss"]) - dy, 3), round(float(p["fs"]) - dx, 3)) for p in peaks}


def find(panel: np.ndarray, mask: np.ndarray | None = None, noise_scale: str = "pixel",
         bright: bool = False, **engine: object) -> np.ndarray:
    """Peaks of the threshold model; ``bright``: at a declared 1 ADU per photon, so that these
    2,500-ADU backgrounds are bright everywhere and the box significance decides with the model
    (finding/bright_background.py); otherwise that test is off (without a declared gain the gain
    measured from the data would differ between a panel alone and a larger layout)."""
    model = LocalThreshold(noise_scale)
    gain = {"adu_per_photon": 1.0} if bright else {"peak_params": PeakParams(bright_photons=None)}
    eng = InferenceEngine(model, device="cpu", min_snr=0, **gain,  # type: ignore[arg-type]
                          **engine)
    frame = Frame(panels=[panel], masks=None if mask is None else [mask])
    peaks = next(iter(eng.find_frames([frame]))).peaks
    assert model.calls and all(model.calls), "tiles must arrive normalised"
    return peaks


@pytest.mark.parametrize("bright", [False, True], ids=["model", "bright"])
@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_whole_and_tiled_give_identical_peaks(noise_scale, bright):
    panel = strong_panel(np.random.default_rng(1), (300, 420))
    whole = find(panel, noise_scale=noise_scale, bright=bright)
    tiled = find(panel, noise_scale=noise_scale, bright=bright, tile_size=96, tile_overlap=32)
    assert len(whole) >= 15
    assert peak_set(whole) == peak_set(tiled)


@pytest.mark.parametrize("bright", [False, True], ids=["model", "bright"])
@pytest.mark.parametrize("noise_scale", NOISE_SCALES)
def test_panel_embedded_in_a_larger_layout_gives_identical_peaks(noise_scale, bright):
    rng = np.random.default_rng(2)
    panel = strong_panel(rng, (185, 194))
    layout = np.zeros((512, 640), np.float32)
    good = np.zeros(layout.shape, bool)
    y0, x0 = 160, 224  # the layout's panels start on the 16-px cells
    layout[y0:y0 + 185, x0:x0 + 194] = panel
    good[y0:y0 + 185, x0:x0 + 194] = True
    other = strong_panel(rng, (185, 194)) * 3.0  # a much brighter neighbour panel
    # the decorrelation and the bright test's box spreads are one per image (a panel's own)
    if noise_scale != "decorrelated" and not bright:
        layout[y0:y0 + 185, 448:642 - 2] = other[:, :192]
        good[y0:y0 + 185, 448:640] = True
    alone = find(panel, noise_scale=noise_scale, bright=bright)
    inside = [p for p in find(layout, good, noise_scale, bright, tile_size=256, tile_overlap=64)
              if x0 <= p["fs"] < x0 + 194]
    assert len(alone) >= 10
    assert peak_set(alone) == peak_set(np.array(inside), dy=y0, dx=x0)


@pytest.mark.parametrize("bright", [False, True], ids=["model", "bright"])
def test_a_large_smooth_gradient_keeps_the_spots(bright):
    panel = strong_panel(np.random.default_rng(3), (256, 384), spots=30)
    yy, xx = np.mgrid[0:256, 0:384]
    ramp = (4000.0 * xx / 384 + 2000.0 * yy / 256).astype(np.float32)
    flat, tilted = find(panel, bright=bright), find(panel + ramp, bright=bright)
    strong = flat[flat["max_value"] > 400]  # background-subtracted brightest pixel
    kept = sum(np.hypot(tilted["ss"] - p["ss"], tilted["fs"] - p["fs"]).min() < 0.5
               for p in strong)
    assert len(strong) >= 15
    assert kept >= 0.95 * len(strong)


def test_panels_normalised_together_equal_panels_normalised_alone():
    """The engine normalises panels of one shape in one batch (per-call overhead on a CSPAD's 64
    ASICs); each panel must still get its own normalisation (to float32 rounding: vectorised
    sums of another batch size), masks included."""
    rng = np.random.default_rng(7)
    panels = [strong_panel(rng, (185, 194)) for _ in range(3)] + [strong_panel(rng, (96, 130))]
    masks = [np.ones(p.shape, bool) for p in panels]
    masks[1][40:60, 10:90] = False
    engine = InferenceEngine(LocalThreshold(), device="cpu")
    together = engine.predict_panels(panels, masks)
    for panel, mask, prob in zip(panels, masks, together, strict=True):
        alone = engine.predict_panels([panel], [mask])[0]
        np.testing.assert_allclose(prob, alone, rtol=1e-5, atol=1e-7)
    assert (together[1][40:60, 10:90] == 0).all()


def counting_panel(rng: np.random.Generator, shape: tuple[int, int],
                   spots: int = 80) -> np.ndarray:
    """Exact photon counts (a Pilatus-like panel, which the normalisation dithers): half a
    photon of background a pixel and spots of 30-300 photons."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    mean = np.full(shape, 0.5)
    for _ in range(spots):
        cy, cx = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
        mean += rng.uniform(30, 300) / (2 * np.pi) * np.exp(
            -((yy - cy) ** 2 + (xx - cx) ** 2) / 2)
    return rng.poisson(mean).astype(np.float32)


@pytest.mark.parametrize("counting", [False, True], ids=["float", "counts"])
@pytest.mark.parametrize("masked", ["border 3", "first row and column"])
def test_a_thin_mask_along_the_edges_moves_no_peak_away_from_it(masked, counting):
    """DIALS' ``border=3``, or a mask of the first row and column, moved where the engine
    anchors the normalisation's cells, the count dither's blocks and the model's padding (the
    valid region's start), and so nearly every spot of the image (16 of 469 real Pilatus 6M
    spots kept their place).  A margin that thin keeps the panel's own edge: every peak beyond
    the cells and blocks the mask touches is where it was."""
    from peaknet_xtal.model.layers.local_norm import DITHER_BLOCK

    rng = np.random.default_rng(30)
    shape = (448, 576)
    panel = counting_panel(rng, shape) if counting else strong_panel(rng, shape, 80)
    mask = np.ones(shape, bool)
    if masked == "border 3":
        mask[:3] = mask[-3:] = False
        mask[:, :3] = mask[:, -3:] = False
    else:
        mask[0] = mask[:, 0] = False
    reach = DITHER_BLOCK + 3 * 16  # a touched block, and three 16-px cells of the background

    def inner(peaks: np.ndarray) -> set[tuple[float, float]]:
        keep = ((peaks["ss"] >= reach) & (peaks["ss"] < shape[0] - reach)
                & (peaks["fs"] >= reach) & (peaks["fs"] < shape[1] - reach))
        return peak_set(peaks[keep])

    whole = find(panel)
    assert len(inner(whole)) >= 10
    assert inner(find(panel, mask)) == inner(whole)
