"""The commands' end-of-run pictures: written atomically, never failing a run, cheap for long
runs, and drawn from the data they are given."""
from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from matplotlib.collections import PathCollection, QuadMesh
from matplotlib.figure import Figure

from peaknet_xtal.run_plots import (
    MAX_POINTS,
    MAX_SCATTER,
    density,
    integration_figure,
    peaks_figure,
    running_mean,
    write_plot,
)


def _run(frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Peak counts and hit flags of a run: a tenth of its frames are hits of 40-60 peaks."""
    rng = np.random.default_rng(seed)
    hits = rng.random(frames) < 0.1
    return np.where(hits, rng.integers(40, 60, frames), rng.integers(0, 5, frames)), hits


def test_a_plot_is_written_whole_or_not_at_all_and_a_failure_is_one_warning(
        tmp_path, monkeypatch, caplog):
    path = tmp_path / "run.png"
    (tmp_path / ".run.png.x1y2.part").write_bytes(b"\x89PNG")  # a run killed while writing
    counts, hits = _run(50)
    assert write_plot(path, lambda: peaks_figure(counts, hits, 10)) == path
    height, width, channels = matplotlib.image.imread(path).shape
    assert width > height > 100 and channels in (3, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]
    before = path.read_bytes()

    def half_written(self, where, **kwargs):  # a disk that fills mid-write
        with open(where, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with caplog.at_level("WARNING"):
        assert write_plot(path, lambda: peaks_figure(counts, hits, 10)) is None
    (warned,) = [r.getMessage() for r in caplog.records]
    assert str(path) in warned and "No space left on device" in warned
    assert path.read_bytes() == before  # the earlier picture stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.png"]  # no partial file

    caplog.clear()
    with caplog.at_level("WARNING"):  # a figure that cannot be made: the same one warning
        assert write_plot(tmp_path / "other.png", lambda: integration_figure(
            [np.nan], [1.0], [np.nan], [1.0])) is None
    (warned,) = [r.getMessage() for r in caplog.records]
    assert "other.png" in warned and "no spot has a finite" in warned

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a stop is not swallowed
        write_plot(tmp_path / "stopped.png", interrupted)


def test_running_mean_and_density_count_what_they_are_given():
    flags = np.array([1, 0, 0, 1, 1], bool)
    np.testing.assert_allclose(running_mean(flags, 2), [1, 0.5, 0, 0.5, 1])
    np.testing.assert_allclose(running_mean(flags, 10), [1, 1 / 2, 1 / 3, 2 / 4, 3 / 5])
    counts, x_edges, y_edges = density(np.array([0, 0, 3, 1, 3, 3]), 3)
    assert counts.shape == (3, 4) and counts.sum() == 6
    np.testing.assert_array_equal(counts, [[2, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 2]])
    assert (len(x_edges), len(y_edges)) == (4, 5)
    big, _, y_edges = density(np.arange(1000), 10)  # many peak counts: at most 200 rows
    assert big.shape == (10, 200) and big.sum() == 1000


def _collections(axes, kind):
    return [c for c in axes.collections if isinstance(c, kind)]


def test_a_short_run_draws_each_frame_and_a_long_one_a_density():
    counts, hits = _run(300)
    fig = peaks_figure(counts, hits, 10, title="t")
    over, rate, spread = fig.axes
    drawn = sum(len(c.get_offsets()) for c in _collections(over, PathCollection))
    assert drawn == 300  # one point a frame
    assert over.get_ylabel() == "peaks per frame" and rate.get_ylabel() == "hit rate (%)"
    assert "frame" in rate.get_xlabel() and spread.get_xlabel() == "peaks per frame"
    threshold = [line for line in over.get_lines() if "min_peaks 10" in line.get_label()]
    assert threshold and list(threshold[0].get_ydata()) == [10, 10]
    assert any("overall" in line.get_label() for line in rate.get_lines())

    counts, hits = _run(MAX_POINTS * 40)
    over = peaks_figure(counts, hits, 10).axes[0]
    assert not _collections(over, PathCollection) and len(_collections(over, QuadMesh)) == 1


def test_a_hits_only_run_says_its_rate_over_every_frame():
    counts, hits = np.array([12, 40, 33]), np.ones(3, bool)
    rate = peaks_figure(counts, hits, 10, left_out=97).axes[1]
    (note,) = rate.texts
    assert "97 frames left out" in note.get_text() and "3.0 % (3 of 100 frames)" in \
        note.get_text()
    assert not rate.get_lines()


def test_the_integration_scatter_places_negative_and_leaves_out_unfinished_spots():
    rng = np.random.default_rng(3)
    n = MAX_SCATTER + 500
    truth = rng.exponential(40, n)
    lik, summed = truth + rng.normal(0, 6, n), truth + rng.normal(0, 7, n)
    lik[:10] = np.nan  # fits that failed
    fig = integration_figure(lik, np.full(n, 6.0), summed, np.full(n, 7.0), title="run")
    left, right = fig.axes
    title = fig._suptitle.get_text()  # matplotlib 3.6 has no get_suptitle
    assert title.startswith("run") and "10 without a finite estimate left out" in title
    assert (right.get_xscale(), right.get_yscale()) == ("symlog", "symlog")
    assert "photons" in right.get_xlabel() and "photons" in right.get_ylabel()
    (points,) = _collections(right, PathCollection)
    assert len(points.get_offsets()) == MAX_SCATTER  # sampled, and the legend says so
    assert f"{MAX_SCATTER} of {n - 10} drawn" in points.get_label()
    assert (summed < 0).any() and points.get_offsets()[:, 0].min() < 0  # negatives placed
    assert any(line.get_label() == "identity" for line in right.get_lines())
    assert left.get_ylabel() == "spots" and "I/sigma" in left.get_xlabel()


def test_running_mean_is_the_mean_of_each_value_and_those_before_it() -> None:
    values = np.array([4.0, 2.0, 6.0, 0.0, 10.0])
    expected = [np.mean(values[max(0, i - 2):i + 1]) for i in range(len(values))]
    assert np.allclose(running_mean(values, 3), expected)
