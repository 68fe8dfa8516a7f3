"""The held-out acceptance frames (peaknet_xtal/evaluation/held_out.py): 30 frames on each of
four detectors, seeds apart from each other and from the model-selection ones."""
from __future__ import annotations

from pathlib import Path

import pytest

from peaknet_xtal.evaluation import selection
from peaknet_xtal.evaluation.held_out import DETECTORS, held_out_seeds


def test_thirty_frames_a_detector_with_their_own_seeds(real_data: Path):
    seeds_by_detector = held_out_seeds()
    assert list(seeds_by_detector) == list(DETECTORS)
    for name in seeds_by_detector:
        assert (real_data / "crystfel_geometry" / name).exists(), name
    seeds = [s for v in seeds_by_detector.values() for s in v]
    assert all(len(v) >= 30 for v in seeds_by_detector.values())
    assert len(seeds) == len(set(seeds))
    assert min(seeds) > max(selection.SELECTION_SEED_RANGE)  # never a selection frame
    # a smaller set is the first frames of the full one (a quick look never sees other frames)
    assert held_out_seeds(5)["om_lcls_rayonix.geom"] == seeds_by_detector[
        "om_lcls_rayonix.geom"][:5]


@pytest.mark.parametrize("per_detector", [0, 1000])
def test_more_frames_than_the_seed_block_holds_is_an_error(per_detector):
    with pytest.raises(ValueError, match="per_detector"):
        held_out_seeds(per_detector)


def test_each_detector_is_a_run_of_its_own(real_data: Path):
    """What an engine learns over a run (pixel defects, a measured gain) must not carry from one
    held-out detector to the next: each starts with ``new_run()``, as peaknet2cxi would."""
    from types import SimpleNamespace

    from peaknet_xtal.evaluation.held_out import held_out_triples_by_detector
    from peaknet_xtal.types import empty_peaks

    calls: list[object] = []

    class Recorder:
        def new_run(self) -> None:
            calls.append("new run")

        def find_frames(self, frames):
            for frame in frames:
                calls.append(len(frame.panels))
                yield SimpleNamespace(peaks=empty_peaks())

    by_detector = held_out_triples_by_detector(Recorder(), real_data / "crystfel_geometry", 1)
    assert len(by_detector["all"]) == len(DETECTORS)
    assert calls[::2] == ["new run"] * len(DETECTORS)
    assert all(isinstance(n, int) and n > 0 for n in calls[1::2])
