"""benchmarks/tile_dependence.py: a panel embedded in a larger masked layout comes back in its
own coordinates, and peaks are matched one to one within a pixel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peaknet_test_support import load_script
from torch import nn

from peaknet_xtal.types import peaks_from_columns

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    return load_script(ROOT / "benchmarks" / "tile_dependence.py")


class Pointwise(nn.Module):
    """Peak logit ``4 * (x - 20)`` of the raw pixel: no context, so no layout can change it."""

    pad_multiple = 32

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        peak = 4 * (x - 20) * self.scale
        if mask is not None:
            peak = torch.where(mask.bool(), peak, torch.full_like(peak, -30.0))
        return torch.cat([torch.zeros_like(peak), peak], dim=1)


def test_embedded_peaks_come_back_in_panel_coordinates(script):
    rng = np.random.default_rng(0)
    panels = [rng.poisson(2.0, (70, 90)).astype(np.float32) for _ in range(2)]
    for panel, (y, x) in zip(panels, [(10, 20), (50, 70)], strict=True):
        panel[y - 1:y + 2, x - 1:x + 2] += np.array([[20, 40, 20], [40, 80, 40], [20, 40, 20]])
    masks = [np.ones(p.shape, bool) for p in panels]
    direct = script.find(Pointwise(), panels, masks)
    inside = script.embedded(Pointwise(), panels, masks)
    assert len(direct) == 2
    assert script.shared(direct, inside) == len(direct) == len(inside)
    np.testing.assert_allclose(np.sort(inside["fs"]), np.sort(direct["fs"]))
    np.testing.assert_array_equal(np.sort(inside["panel"]), [0, 1])


def test_peaks_are_matched_one_to_one_within_a_pixel(script):
    a = peaks_from_columns(panel=np.array([0, 0, 1]), fs=np.array([10.0, 10.5, 3.0]),
                           ss=np.array([5.0, 5.0, 3.0]))
    b = peaks_from_columns(panel=np.array([0, 1, 0]), fs=np.array([10.2, 3.0, 40.0]),
                           ss=np.array([5.0, 3.5, 5.0]))
    assert script.shared(a, b) == 2  # one of the two close peaks on panel 0 is left unmatched
    assert script.shared(a, b[2:]) == 0


def test_the_overlap_reaches_every_tiled_engine(script, monkeypatch, capsys):
    """``--overlap`` is the tile overlap of every variant and of the default (whole panels have
    no cut, but take it too)."""
    seen = []

    def spy(model, panels, masks, **engine):
        seen.append((engine.get("tile_size"), engine.get("tile_overlap")))
        return peaks_from_columns(panel=np.zeros(0, np.int32), fs=np.zeros(0), ss=np.zeros(0))

    panels = [np.zeros((64, 64), np.float32)]
    monkeypatch.setattr(script, "frames", lambda count: iter([("tiny", panels,
                                                                 [np.ones((64, 64), bool)])]))
    monkeypatch.setattr(script, "find", spy)
    assert script.main(["--overlap", "128"]) == 0
    assert "tile overlap 128 px" in capsys.readouterr().out
    # the default (whole panels), 1024-px tiles, 512-px tiles, embedded
    assert seen == [(None, 128), (1024, 128), (512, 128), (None, 128)]
