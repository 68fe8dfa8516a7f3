"""The held-out acceptance frames (peaknet_xtal/evaluation/held_out.py): seeds apart from the
model-selection ones and from each other, the larger set on four detectors."""
from __future__ import annotations

from pathlib import Path

from peaknet_xtal.evaluation import selection
from peaknet_xtal.evaluation.held_out import HELD_OUT, LARGE_DETECTORS, large_held_out_seeds


def test_larger_set_has_its_own_seeds_on_four_detectors(real_data: Path):
    large = large_held_out_seeds(30)
    assert list(large) == list(LARGE_DETECTORS)
    for name in large:
        assert (real_data / "crystfel_geometry" / name).exists(), name
    seeds = [s for v in large.values() for s in v]
    assert len(seeds) == 120 == len(set(seeds))
    small = {s for v in HELD_OUT.values() for s in v}
    assert not small & set(seeds)
    assert min(seeds) > max(selection.SELECTION_SEED_RANGE)  # never a selection frame
    assert large_held_out_seeds(5)["om_lcls_rayonix.geom"] == large["om_lcls_rayonix.geom"][:5]
