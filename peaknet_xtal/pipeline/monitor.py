"""Live and final view of a pipeline run: queue depths, frames/s in and out, worker busy fraction.

The same JSON file is rewritten every ``interval`` during the run (``"live": true``, worker pids
and counts included) and once more, complete with the sample history, at the end.

Everything comes from the queues' own statistics (frames *in* = accepted by the frame queue,
frames *out* = acknowledged by a writer; workers piggy-back their busy time, and their counts
of frames, hits and peaks found, on each lease), so monitoring adds no actor and no extra round
trip per frame.

The progress line says what the single-process ``peaknet2cxi`` line says, under its label
(``label``) and in its words (``progress.finding_counts``: hits, peaks per frame), then the
pipeline's own rates, queue depths and busy workers.  Its hits and peaks are the workers'
counts of the batches they finished (each reports one as it leases the next), whose frames may
still be on their way to a writer while the line's count is of frames written; a worker that
died keeps the counts it reported, and the frames it held are counted again by the worker that
finds them.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any, TextIO

from peaknet_xtal.atomic import write_json_atomic
from peaknet_xtal.progress import Progress, finding_counts

#: Samples kept for the JSON report; older ones are thinned to every other one.
MAX_SAMPLES = 2000
#: Seconds the rates in and out average over.  Frames come back a worker's batch at a time, so
#: the rate between two samples a second apart read a batch a second, or none: "out 7.8/s"
#: beside a run of 0.8 frames/s (a user trial, two workers, batches of 8).
RATE_WINDOW = 30.0


class PipelineMonitor:
    """Turns successive queue statistics into rates, a progress line and a JSON summary."""

    def __init__(self, total: int | None = None, *, progress: bool = True,
                 stream: TextIO | None = None, interval: float | None = None,
                 live_path: str | None = None, initial: int = 0,
                 label: str = "pipeline") -> None:
        """``total``: the run's frames, where known up front (the line then gives the share
        done and an ETA, as the single-process run's does); ``initial``: those of them an
        earlier run finished, counted as done from the first line on (not in the rate);
        ``label``: the line's first word (the command's name, where a command runs it)."""
        self.bar = Progress(total, "frames", desc=label, stream=stream, interval=interval,
                            enabled=progress, initial=initial)
        self.t0 = time.perf_counter()
        self.samples: list[dict[str, Any]] = []
        self.workers: dict[str, dict[str, Any]] = {}
        #: (time, frames in, frames out) of the samples within RATE_WINDOW, and one before
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque(
            [(self.t0, 0, 0)])
        self.peak_depth = 0
        self.peak_results_depth = 0
        self.frames_in = self.frames_out = 0
        self.live_path = live_path
        self.interval = interval or 1.0
        self._last_write = 0.0

    def sample(self, frames_q: dict[str, Any],
               result_qs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Record one observation and refresh the progress line; returns the sample."""
        now = time.perf_counter()
        put, acked = int(frames_q["put"]), int(frames_q["acked"])
        self._recent.append((now, put, acked))
        while len(self._recent) > 2 and self._recent[1][0] <= now - RATE_WINDOW:
            self._recent.popleft()
        last_t, last_in, last_out = self._recent[0]
        dt = max(now - last_t, 1e-9)
        self.workers.update(frames_q.get("reports", {}))
        found = {key: sum(int(r.get(key, 0)) for r in self.workers.values())
                 for key in ("frames", "hits", "peaks")}
        results_depth = sum(int(q["depth"]) for q in result_qs)
        self.peak_depth = max(self.peak_depth, int(frames_q["depth"]) + int(frames_q["in_flight"]))
        self.peak_results_depth = max(self.peak_results_depth, results_depth)
        delta = acked - self.frames_out
        self.frames_in, self.frames_out = put, acked
        sample = {"t": round(now - self.t0, 3), "frames_in": put, "frames_out": acked,
                  "in_per_s": round((put - last_in) / dt, 2),
                  "out_per_s": round((acked - last_out) / dt, 2),
                  "depth": int(frames_q["depth"]), "in_flight": int(frames_q["in_flight"]),
                  "capacity": int(frames_q["capacity"]), "results_depth": results_depth,
                  "found": found["frames"], "hits": found["hits"], "peaks": found["peaks"],
                  "busy": {w: r.get("busy_fraction", 0.0) for w, r in self.workers.items()}}
        self.bar.update(delta, extra=self.line(sample))
        self._keep(sample)
        if self.live_path and now - self._last_write >= self.interval:
            self._write_live(now)
        return sample

    def _write_live(self, now: float) -> None:
        """The summary so far (without the sample history), for people and tools watching a run."""
        live = self.summary(live=True)
        live.pop("samples")
        live["last"] = self.samples[-1] if self.samples else None
        if self.live_path is not None:
            write_json_atomic(self.live_path, live)
        self._last_write = now

    @staticmethod
    def line(sample: dict[str, Any]) -> str:
        """What the progress line says after the count and rate (module docstring)."""
        busy = " ".join(f"{w}:{100 * b:.0f}%" for w, b in sorted(sample["busy"].items()))
        return (f"{finding_counts(sample['hits'], sample['found'], sample['peaks'])} | "
                f"in {sample['in_per_s']:.1f}/s out {sample['out_per_s']:.1f}/s | "
                f"q1 {sample['depth']}+{sample['in_flight']}/{sample['capacity']} "
                f"q2 {sample['results_depth']} | busy {busy or '-'}")

    def _keep(self, sample: dict[str, Any]) -> None:
        self.samples.append(sample)
        if len(self.samples) > MAX_SAMPLES:
            self.samples = self.samples[::2]

    def summary(self, **extra: Any) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t0
        return {"elapsed_s": round(elapsed, 3), "frames_in": self.frames_in,
                "frames_out": self.frames_out,
                "mean_out_per_s": round(self.frames_out / elapsed, 3) if elapsed > 0 else 0.0,
                "peak_queue_depth": self.peak_depth,
                "peak_results_depth": self.peak_results_depth,
                "workers": self.workers, **extra, "samples": self.samples}

    def close(self, path: str | None = None, **extra: Any) -> dict[str, Any]:
        """Final progress line; the summary, also written atomically as JSON if ``path`` is set."""
        self.bar.close()
        summary = self.summary(**extra)
        if path:
            write_json_atomic(path, summary)
        return summary
