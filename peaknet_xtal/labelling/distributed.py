"""Ray scheduling of the data engine: batches of frames as tasks, peak fits inside them elastic.

Two levels, as the work is lopsided (a frame may hold 5 peaks or 2,000):

- the driver keeps at most ``max_batches_in_flight`` batch tasks running and submits the next batch
  each time one finishes (``ray.wait(num_returns=1)``), so memory stays bounded on huge runs;
- inside a batch, windows are fitted in chunks by ``fit_chunk`` tasks with at most
  ``max_fits_in_flight`` pending, so idle CPUs pick up fits from busy batches.

Ray itself is started and stopped by :func:`peaknet_xtal.pipeline.ray_session.ray_session`, the
one helper the inference pipeline uses too.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from peaknet_xtal.labelling.batch import Batch, BatchLabeler, BatchSummary
from peaknet_xtal.labelling.pvoigt import FitOutcome, Window, fit_windows

log = logging.getLogger(__name__)


def _remote_fit_chunk() -> Any:
    import ray

    @ray.remote(num_cpus=1)
    def fit_chunk(windows: list[Window], config: dict[str, Any]) -> list[FitOutcome]:
        return fit_windows(windows, config)

    return fit_chunk


def as_completed(submit: Callable[[Any], Any], items: Iterable[Any],
                 max_in_flight: int) -> Iterator[tuple[int, Any]]:
    """``(position, result)`` of ``submit(item)`` (an ObjectRef) for every item as each task
    finishes, never more than ``max_in_flight`` pending: each finished task makes room for the
    next, so memory stays bounded however many items there are."""
    import ray

    pending: dict[Any, int] = {}
    queue = iter(enumerate(items))

    def submit_next() -> None:
        for index, item in queue:
            pending[submit(item)] = index
            return

    for _ in range(max(int(max_in_flight), 1)):
        submit_next()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        result = ray.get(done[0])
        submit_next()
        yield index, result


def elastic_map(submit: Callable[[Any], Any], items: list[Any], max_in_flight: int) -> list[Any]:
    """Results of ``submit(item)`` for every item, in order (:func:`as_completed` bounds them)."""
    results: list[Any] = [None] * len(items)
    for index, result in as_completed(submit, items, max_in_flight):
        results[index] = result
    return results


def ray_fit_map(max_in_flight: int) -> Callable[[list[list[Window]], dict[str, Any]],
                                                 list[list[FitOutcome]]]:
    """A ``fit_map`` for :class:`BatchLabeler` that spreads chunks over Ray workers."""
    def fit_map(chunks: list[list[Window]], config: dict[str, Any]) -> list[list[FitOutcome]]:
        fit_chunk = _remote_fit_chunk()
        return elastic_map(lambda chunk: fit_chunk.remote(chunk, config), chunks, max_in_flight)

    return fit_map


def _remote_label_batch() -> Any:
    import ray

    @ray.remote(num_cpus=1)
    def label_batch(labeler: BatchLabeler, batch: Batch, part: str,
                    max_fits_in_flight: int) -> BatchSummary:
        return labeler.run(batch, part, ray_fit_map(max_fits_in_flight))

    return label_batch


def run_batches_ray(labeler: BatchLabeler, batches: list[tuple[Batch, str]],
                    on_done: Callable[[BatchSummary], None], *, max_batches_in_flight: int = 2,
                    max_fits_in_flight: int = 4) -> None:
    """Run ``(batch, part_path)`` pairs as Ray tasks; ``on_done`` sees each summary as it lands."""
    import ray

    label_batch = _remote_label_batch()
    labeler_ref = ray.put(labeler)  # shared state (config, geometries) goes to the store once

    def submit(pair: tuple[Batch, str]) -> Any:
        batch, part = pair
        return label_batch.remote(labeler_ref, batch, os.fspath(part), max_fits_in_flight)

    for _, summary in as_completed(submit, batches, max_batches_in_flight):
        on_done(summary)
