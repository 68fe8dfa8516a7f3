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
from collections.abc import Callable
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


def elastic_map(submit: Callable[[Any], Any], items: list[Any], max_in_flight: int) -> list[Any]:
    """Results of ``submit(item)`` (an ObjectRef) for every item, in order, never more than
    ``max_in_flight`` pending at once: each finished task makes room for the next."""
    import ray

    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    queue = iter(enumerate(items))
    for index, item in queue:
        pending[submit(item)] = index
        if len(pending) >= max_in_flight:
            break
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done[0])] = ray.get(done[0])
        for index, item in queue:
            pending[submit(item)] = index
            break
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
    pending: dict[Any, Batch] = {}
    todo = iter(batches)

    def submit_next() -> None:
        for batch, part in todo:
            ref = label_batch.remote(labeler_ref, batch, os.fspath(part), max_fits_in_flight)
            pending[ref] = batch
            return

    for _ in range(max(max_batches_in_flight, 1)):
        submit_next()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        pending.pop(done[0])
        on_done(ray.get(done[0]))
        submit_next()
