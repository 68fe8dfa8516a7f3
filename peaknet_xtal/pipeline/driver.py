"""``run_pipeline(config)``: sources -> frame queue -> model workers -> result queues -> writers.

The driver owns no data; it starts the stages, watches them and keeps the books:

- **Back-pressure.**  The frame queue holds at most ``queue_capacity`` frames, pending or leased;
  result queues ``result_queue_capacity`` each.  A full queue blocks whoever feeds it.
- **Exactly once.**  A frame stays leased to its worker until a writer acknowledges it.  When a
  worker dies (killed, crashed, out of memory) its leases go back to the front of the queue and a
  replacement starts (``max_restarts``); a result that arrives twice is dropped by key at the writer
  (results are routed to writers by a stable hash of the key, so one writer sees every copy).
- **Ctrl-C and SIGTERM.**  The first SIGINT or SIGTERM (a batch scheduler's stop) aborts the
  frame queue (pending frames are dropped, never written), lets the batches already leased
  finish, and closes the writers, so everything done is on disk; the summary says
  ``interrupted`` and ``stop_signal``.  A second one stops at once.  The first only sets a flag
  that the loop reads: Python's default handler raises ``KeyboardInterrupt`` wherever the main
  thread is, and one raised inside a finaliser (a Ray object reference being freed) is printed
  and ignored, so a run could miss it.  The flag is set from before Ray starts until it is shut
  down, the defect mask written in between: a Ctrl-C while the mask was written, after the
  flag's handler had been taken down, was lost that way, and the run exited 0 as finished
  (:mod:`peaknet_xtal.stopping`).
- **Resume.**  Keys already in the writers' finished output are skipped by the sources, which
  count those frames' spiking pixels for the run's defect mask, as the single-process run
  counts them (``InferenceEngine.observe``): the mask is the whole run's however the earlier
  run ended.  The summary's ``written`` is the frames this run added to the output, counted
  from the output for a writer that could not say (its process ended by the stop:
  :meth:`Driver.count_unreported`); ``resumed_keys``, those it held before.
- **One geometry per output.**  The output folder's detector geometry is the first input's (in
  input order, as in the single-process run), whichever frame reaches a writer first: the
  sources refuse, before it is found, a frame whose geometry does not fit it, ending that input
  as an unreadable one ends it (:class:`~.actors.SameGeometry`).
- **An input that cannot be read** ends the run in error only once the other inputs' frames are
  written and the writers have finished their files (:meth:`Driver._source_failed`), the error
  being the input's own, naming it: nothing done is lost, and a rerun skips it.
- **Warnings.**  The project's warnings raised in a Ray stage process are shown by the driver,
  once each (:mod:`.worker_logs`); Ray itself prints nothing of its stage processes.
- **Run records.**  As each worker finishes, the driver collects what its engine learned (its
  pixel-defect counts) and the engine's resolved settings.  At the end -- after an error or a
  Ctrl-C too, as the single-process ``peaknet2cxi`` does -- the workers' counts are merged
  (:func:`pooled_defects`) and written as the run's ``pixel_defects.h5`` beside the output
  (:meth:`~peaknet_xtal.finding.defects.DefectTracker.save`); the summary records the settings
  under ``engine`` (``InferenceEngine.describe()``, as the single-process summary does) and
  the workers' counts of unusable pixels and frames without data, summed, under
  ``unusable_pixels`` (their warnings stop after each worker's first frames and point here;
  a worker that died took its counts with it, as its defect counts).
- **Progress.**  The progress line counts frames against the inputs' total where their sources
  can say it up front (the single-process run's total), the frames done before included, and
  says the hits and peaks per frame the workers found, as the single-process run's line does
  (:mod:`.monitor`).

``backend="ray"`` (default) runs every stage as a Ray actor, on a local Ray or the cluster at
``address``; ``backend="threads"`` runs the same classes on threads in this process (tests, and a
laptop without Ray).
"""
from __future__ import annotations

import logging
import os
import re
import signal
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peaknet_xtal.config import closest_key, deep_merge
from peaknet_xtal.errors import PeakNetError
from peaknet_xtal.finding.defects import DefectTracker
from peaknet_xtal.finding.sanitise import add_tallies
from peaknet_xtal.finding.settings import DEFAULTS as FINDING
from peaknet_xtal.finding.settings import check_min_peaks
from peaknet_xtal.pipeline.actors import (
    LearnedDefects,
    ModelWorker,
    ResultWriter,
    SameGeometry,
    SourceFeeder,
    ray_actor,
    ray_log_relay,
    ray_queue,
)
from peaknet_xtal.pipeline.monitor import PipelineMonitor
from peaknet_xtal.pipeline.queues import AsyncLeaseQueue, EventLoopThread, LocalQueueClient
from peaknet_xtal.pipeline.worker_logs import Record, WarningReplay, forget_local, remember_local
from peaknet_xtal.progress import count_within
from peaknet_xtal.stopping import stop_requests

log = logging.getLogger(__name__)
remember_local()  # this process's warnings, so that the stages' copies of them are not shown

#: Every key ``run_pipeline`` reads.  ``peaknet2cxi --workers N [--address A]`` fills these.
DEFAULTS: dict[str, Any] = {
    "inputs": [],  # paths, or {"path", "kind", "options"} mappings
    "source_kind": None,  # registry source type for plain paths (None: sniff)
    "source_options": {},  # e.g. {"geometry": "x.geom"} or {"count": 100, "seed": 1}
    "output": "peaknet-out",  # writer path; with writers > 1 each gets "-w<i>" added
    "writer": "cxi",  # registry writer type, or a factory(path, **options)
    "writer_options": {},  # e.g. {"frames_per_file": 1000, "geometry": ...}
    "writers": 1,
    "workers": 2,
    "threads_per_worker": 1,  # CPU thread budget of each worker
    "gpus_per_worker": None,  # None: 1 when device is cuda*, else 0
    "frame_finder": "engine",  # "engine" or a picklable factory(**frame_finder_options)
    "frame_finder_options": {},  # extra options for the frame finder
    "model": FINDING.model,
    "device": "cpu",
    "threshold": None,
    "batch_size": 8,  # frames per lease; the engine batches its tiles within it
    "queue_capacity": 3200,
    "result_queue_capacity": 1024,
    "source_chunk": 16,  # frames per put into the frame queue
    "send_images": "auto",  # results carry pixels only when the writer cannot link to them
    "address": None,  # Ray cluster address (None: start a local Ray)
    "num_cpus": None,  # CPUs of a local Ray
    "backend": "ray",
    "max_restarts": 3,  # worker replacements before the run fails
    "lease_timeout": 1.0,  # seconds a blocked lease waits before a worker reports in
    "monitor_interval": 1.0,
    "progress": True,
    "progress_label": "pipeline",  # the progress line's first word (peaknet2cxi: its name)
    "monitor_json": None,  # default: <output>.pipeline.json
    "resume": True,
}


class PipelineError(PeakNetError):
    """A stage failed for good (a source could not be read, workers kept dying, a writer broke).

    ``engine``: the workers' engine settings (``InferenceEngine.describe``), as the run's summary
    has them, so that a caller's record of a failed run says how its frames were found too;
    ``summary``: the run's summary as :func:`run_pipeline` returns it (written, resumed_keys...),
    where the run got as far as making one (None otherwise)."""

    def __init__(self, message: str, engine: Mapping[str, Any] | None = None,
                 summary: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.engine = dict(engine) if engine else None
        self.summary = dict(summary) if summary else None


def resolve_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    cfg = deep_merge(DEFAULTS, dict(config or {}))
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:  # a misspelt key would otherwise run with its default, unnoticed
        hints = [f"{key!r}" + (f" (did you mean {close!r}?)" if close else "")
                 for key in unknown for close in [closest_key(key, DEFAULTS)]]
        raise ValueError(f"run_pipeline: unknown settings {', '.join(hints)}")
    if not cfg["inputs"]:
        raise ValueError("run_pipeline: no inputs")
    if int(cfg["workers"]) < 1 or int(cfg["writers"]) < 1:
        raise ValueError("run_pipeline: need at least one worker and one writer")
    if cfg["frame_finder"] in (None, "engine") and "min_peaks" in cfg["frame_finder_options"]:
        # the hit rule is checked here, once, not by every worker building its engine
        try:
            check_min_peaks(cfg["frame_finder_options"]["min_peaks"])
        except ValueError as exc:
            raise ValueError(f"run_pipeline: frame_finder_options: {exc}") from None
    return cfg


def source_specs(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Normalise ``inputs`` into ``{"path", "kind", "options"}`` mappings."""
    specs = []
    for item in cfg["inputs"]:
        if isinstance(item, Mapping):
            spec = {"kind": cfg["source_kind"], "options": dict(cfg["source_options"]), **item}
        else:
            spec = {"path": os.fspath(item), "kind": cfg["source_kind"],
                    "options": dict(cfg["source_options"])}
        specs.append(spec)
    return specs


def writer_path(output: str, index: int, count: int) -> str:
    """``out.cxi`` -> ``out-w1.cxi`` (or ``dir`` -> ``dir/peaks-w1.cxi``) when there are several."""
    if count == 1:
        return str(output)
    path = Path(output)
    if path.suffix:
        return str(path.with_name(f"{path.stem}-w{index}{path.suffix}"))
    return str(path / f"peaks-w{index}.cxi")


def output_folder(output: str) -> Path:
    """The folder a run's output goes to (``out.cxi`` -> its folder; ``dir`` -> itself, as
    :func:`writer_path` reads it): where the run's pixel defect mask is written."""
    path = Path(output)
    return path.parent if path.suffix else path


def pooled_defects(learned: Sequence[LearnedDefects]) -> tuple[DefectTracker | None, Any]:
    """The run's defect tracker from the workers' (and the geometry to write it in): their
    counts added (:meth:`DefectTracker.merge`), so a pixel is a defect when it spikes in at
    least ``fraction`` of all the frames the workers found together, once they found
    ``min_frames`` together -- the tracker's own rule, over the whole run.

    Why not "defective for any worker that saw enough frames": spike counts are sums over
    frames, so the pooled counts are exactly those one engine keeps over the same frames, and
    the mask is the single-process run's whatever the number of workers or how the frames were
    dealt out.  A union of per-worker masks depends on the deal: a pixel spiking in 4 of one
    worker's 5 frames and in none of another's 95 (4 % of the run, far below three in four)
    would be written as a defect, and a worker that saw 4 frames would add nothing even where
    its frames make the run's count.

    Workers whose counts do not add to the others' (other panel shapes: another detector) are
    left out with a warning; the counts of the most frames are kept.  A worker that died took
    its counts with it: the frames it finished count for no one (those it held, re-queued, are
    counted by the worker that takes them)."""
    pooled: DefectTracker | None = None
    geometry = None
    for item in sorted(learned, key=lambda d: d.tracker.frames, reverse=True):
        if pooled is None:
            pooled = DefectTracker(item.tracker.fraction, item.tracker.min_frames,
                                   item.tracker.sigmas, item.tracker.lone)
        try:
            pooled.merge(item.tracker)
        except ValueError as exc:
            log.warning("pixel defects of %d frames left out of the run's mask: %s",
                        item.tracker.frames, exc)
            continue
        if geometry is None:
            geometry = item.geometry
    return pooled, geometry


def frame_finder_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    if cfg["frame_finder"] in (None, "engine"):
        base = {"model": cfg["model"], "device": cfg["device"],
                "threads": int(cfg["threads_per_worker"])}
        if cfg["threshold"] is not None:
            base["threshold"] = cfg["threshold"]
        return {**base, **cfg["frame_finder_options"]}
    return dict(cfg["frame_finder_options"])


# ------------------------------------------------------------------------------------------------
# backends: where the stage objects live


class ThreadBackend:
    """Every stage on a thread of this process (the classes are the same ones Ray hosts)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.loop = EventLoopThread()
        size = int(cfg["workers"]) + int(cfg["writers"]) + len(cfg["inputs"]) + 4
        self.pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="peaknet-stage")
        self.queues: list[Any] = []
        self.started: list[Future] = []

    def queue(self, capacity: int, name: str) -> Any:
        queue = LocalQueueClient(AsyncLeaseQueue(capacity, name), self.loop)
        self.queues.append(queue)
        return queue

    def make(self, cls: type, *args: Any, num_cpus: float = 0, num_gpus: float = 0,
             **kwargs: Any) -> Any:
        return cls(*args, **kwargs)

    def call(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method)(*args)

    def start(self, handle: Any, method: str, *args: Any) -> Future:
        future = self.pool.submit(getattr(handle, method), *args)
        self.started.append(future)
        return future

    def wait(self, futures: list[Any], timeout: float) -> list[Any]:
        done, _ = wait_futures(futures, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, future: Future) -> Any:
        return future.result()

    def kill(self, handle: Any) -> None:
        """Threads cannot be killed; a failed worker thread has already returned."""

    def alive(self) -> bool:
        """The threads live as long as this process."""
        return True

    def drain_logs(self) -> tuple[list[Record], int]:
        """The stages log in this process, straight to its handlers: nothing to relay."""
        return [], 0

    def close(self) -> None:
        """End the stages, then the queues' event loop.  After a second Ctrl-C the driver
        leaves stages running, waiting on their queues: those are aborted first (a stage that
        leases or puts gets its end), and the stages given a moment to return, since a stage
        still calling into a stopped loop would wait for ever (and the process's exit with it,
        which joins its threads)."""
        for queue in self.queues:
            try:
                queue.abort()
            except Exception as exc:  # noqa: BLE001 - a queue already gone ends nothing
                log.debug("closing: could not abort a queue: %s", exc)
        wait_futures(self.started, timeout=30)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.loop.stop()


class RayBackend:
    """Every stage a Ray actor; queues are async actors that reserve no CPU."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        from peaknet_xtal.pipeline.ray_session import ray_session

        # reuses a Ray the caller already started (and then leaves it running)
        self._session = ray_session(address=cfg["address"], num_cpus=cfg["num_cpus"])
        self.ray = self._session.__enter__()
        try:  # the stages' warnings reach the user through it (Ray prints none of theirs)
            self.log_relay = ray_log_relay()
        except BaseException:
            self._session.__exit__(None, None, None)
            raise

    def queue(self, capacity: int, name: str) -> Any:
        return ray_queue(capacity, name)

    def make(self, cls: type, *args: Any, num_cpus: float = 0, num_gpus: float = 0,
             **kwargs: Any) -> Any:
        return ray_actor(cls, *args, num_cpus=num_cpus, num_gpus=num_gpus,
                         log_relay=self.log_relay, **kwargs)

    def call(self, handle: Any, method: str, *args: Any) -> Any:
        return self._get(getattr(handle, method).remote(*args))

    def _get(self, ref: Any) -> Any:
        """``ray.get``, with the project's own error raised in a stage (a FormatError naming a
        file) given back as itself: Ray wraps it in a RayTaskError whose message is the
        remote traceback, which reached the user as the error."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, PeakNetError):
                raise exc.cause from None
            raise

    def start(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method).remote(*args)

    def wait(self, futures: list[Any], timeout: float) -> list[Any]:
        done, _ = self.ray.wait(futures, num_returns=1, timeout=timeout)
        if done:  # collect everything else already finished too
            more, _ = self.ray.wait(futures, num_returns=len(futures), timeout=0)
            done = list({*done, *more})
        return done

    def result(self, future: Any) -> Any:
        return self._get(future)

    def kill(self, handle: Any) -> None:
        try:
            self.ray.kill(handle, no_restart=True)
        except Exception:  # already gone
            pass

    def alive(self) -> bool:
        """Whether the local Ray this run started still has all its processes (GCS, raylet).
        A scheduler's SIGTERM reaches them too; without them no stage's end is ever reported
        (the driver waited on in vain, and Ray ended the process a minute later, before the
        run's record was written).  A cluster joined at an address counts as alive: its
        processes are not this job's.  Ray's node object is internal: where it cannot be
        asked, the cluster counts as alive (the run waits as it did)."""
        try:
            node = self.ray._private.worker._global_node
            return node is None or bool(node.remaining_processes_alive())
        except Exception:  # noqa: BLE001 - another Ray version: assume alive
            return True

    def drain_logs(self) -> tuple[list[Record], int]:
        """The project's warnings the stages raised since the last call
        (:mod:`.worker_logs`), and how many the relay had no room for."""
        records, dropped = self.ray.get(self.log_relay.drain.remote(), timeout=10)
        return list(records), int(dropped)

    def close(self) -> None:
        self._session.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------
# the driver


def stage_names(names: Iterable[str]) -> str:
    """Stage names for one line: each kind's numbered names as a count and a range where there
    are more than three (``source0, source1`` but ``500 sources (source0-source499)``), so a
    stop of a run over 500 inputs is said in one short line, not 5 kB of names."""
    kinds: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        match = re.fullmatch(r"(\D+?)(\d+)", name)
        kind, number = (match.group(1), int(match.group(2))) if match else (name, -1)
        kinds.setdefault(kind, []).append((number, name))
    parts = []
    for kind in sorted(kinds):
        named = sorted(kinds[kind])
        if len(named) > 3:
            parts.append(f"{len(named)} {kind}s ({named[0][1]}-{named[-1][1]})")
        else:
            parts.extend(name for _, name in named)
    return ", ".join(parts)


class Driver:
    """Starts the stages, replaces dead workers, closes queues in order, keeps the books."""

    def __init__(self, cfg: dict[str, Any], backend: Any) -> None:
        self.cfg = cfg
        self.backend = backend
        self.running: dict[Any, tuple[str, str, Any]] = {}  # future -> (role, name, handle)
        self.sources: list[dict[str, Any]] = []
        self.workers: dict[str, dict[str, Any]] = {}
        self.writers: list[dict[str, Any]] = []
        self.failures: list[str] = []
        #: what ends the run in error (a stage failed for good, an input could not be read):
        #: the message of the PipelineError raised once the writers have closed
        self.errors: list[str] = []
        #: the inputs that could not be read: the run goes on with the others, then fails
        self.failed_inputs: list[BaseException] = []
        self.source_paths: dict[str, str] = {}  # source stage name -> its input
        #: the stages' warnings, shown once each (Ray prints nothing of theirs: .worker_logs)
        self.warnings = WarningReplay()
        self.logs_gone = False  # the relay could not be read: the stages' warnings stay there
        self.restarts = 0
        self.workers_lost = 0  # workers that died: their defect counts died with them
        self.interrupted = False
        self.stop_requested = False  # set by the SIGINT/SIGTERM handler, acted on by the loop
        self.stop_signal: int | None = None  # the signal that asked for the stop
        self.queues_gone = False  # a queue's process ended by the stop (said once)
        #: the stop ended Ray's own processes: no stage can finish or be asked anything
        self.stages_lost = False
        #: the frame queue's last counts, for the summary where a stop ended its process
        self.last_frame_stats: dict[str, Any] = {
            "name": "frames", "capacity": int(cfg.get("queue_capacity") or 0), "put": 0,
            "leased": 0, "acked": 0, "depth": 0, "in_flight": 0, "requeued": 0,
            "duplicates": 0, "dropped": 0, "finished": False, "reports": {}}
        self.fatal: BaseException | None = None
        self.live_workers = 0
        self.results_closed = False
        self.learned: list[LearnedDefects] = []  # each finished worker's pixel-defect counts
        #: each finished worker's counts of unusable pixels and frames without data
        self.unusable: list[dict[str, int]] = []
        self.engine: dict[str, Any] | None = None  # the workers' resolved finder settings
        self.defects_written: list[Path] | None = None  # None until save_defects ran
        #: the spike counts of the frames the sources skipped (done by an earlier run)
        self.skipped_learned: list[LearnedDefects] = []
        #: whether the workers' frame finder counts pixel defects (None: no worker said)
        self.keeps_defects: bool | None = None
        #: each writer's output and the frames it held when the run started
        self.writer_starts: list[tuple[str, int]] = []

    # -- start --------------------------------------------------------------------------------
    def start(self) -> list[Any]:
        cfg = self.cfg
        n_writers = int(cfg["writers"])
        self.frames = self.backend.queue(int(cfg["queue_capacity"]), "frames")
        self.results = [self.backend.queue(int(cfg["result_queue_capacity"]), f"results-{i}")
                        for i in range(n_writers)]
        paths = [writer_path(cfg["output"], i, n_writers) for i in range(n_writers)]
        writers = [self.backend.make(ResultWriter, cfg["writer"], path, cfg["writer_options"])
                   for path in paths]
        done: set[Any] = set()
        for path, handle in zip(paths, writers, strict=True):
            keys = self.backend.call(handle, "done_keys")
            self.writer_starts.append((path, len(keys)))
            if cfg["resume"]:
                done.update(tuple(k) for k in keys)
        specs = source_specs(cfg)
        check = self.geometry_check(specs, writers)
        for i, handle in enumerate(writers):
            future = self.backend.start(handle, "run", self.results[i], self.frames,
                                        float(cfg["lease_timeout"]))
            self.running[future] = ("writer", f"writer{i}", handle)
        for i, spec in enumerate(specs):
            self.source_paths[f"source{i}"] = str(spec["path"])
            handle = self.backend.make(SourceFeeder, spec, sorted(done), int(cfg["source_chunk"]),
                                       check)
            self.running[self.backend.start(handle, "run", self.frames)] = ("source", f"source{i}",
                                                                             handle)
        for i in range(int(cfg["workers"])):
            self.start_worker(f"w{i}")
        return sorted(done)

    def geometry_check(self, specs: Sequence[Mapping[str, Any]], writers: Sequence[Any]
                       ) -> SameGeometry | None:
        """The sources' check of the output folder's one geometry (:class:`SameGeometry`),
        from the first frame of the first input (in input order) that gives one, as the
        writers judge it (:meth:`ResultWriter.geometry_check`); None where a writer is given a
        geometry of its own (written for every frame) or no input gives a frame here (an
        input that cannot be read is its source's to report)."""
        if self.cfg["writer_options"].get("geometry") is not None:
            return None
        reference = None
        for spec in specs:
            try:
                reference = SourceFeeder(dict(spec)).first_frame()
            except Exception as exc:  # noqa: BLE001 - its source stage reports it, in order
                log.debug("no reference frame from %s: %s", spec["path"], exc)
                continue
            if reference is not None:
                break
        check = None
        for handle in writers:
            check = self.backend.call(handle, "geometry_check", reference) or check
        return check

    def frame_total(self, done: Sequence[Sequence[Any]]) -> tuple[int | None, int]:
        """The inputs' frames, where every source can say without reading them (None else,
        where an input cannot be opened here: its source reports it, or where counting them
        all would hold up the first frame: ``progress.count_within``), and those among them
        an earlier run finished (``done``): the progress line's total and start, as the
        single-process run counts them."""
        specs = source_specs(self.cfg)

        def frames_in(spec: dict[str, Any]) -> int | None:
            try:
                return SourceFeeder(dict(spec)).count()
            except Exception as exc:  # noqa: BLE001 - its source stage reports it
                log.debug("cannot count the frames of %s: %s", spec["path"], exc)
                return None

        total = count_within(specs, frames_in)
        if total is None:
            return None, 0
        inputs = {os.path.realpath(str(spec["path"])) for spec in specs}
        by_source = Counter(str(key[0]) for key in done)  # each file's path resolved once
        before = sum(n for source, n in by_source.items() if os.path.realpath(source) in inputs)
        return total, min(before, total)

    def start_worker(self, worker_id: str) -> None:
        cfg = self.cfg
        gpus = cfg["gpus_per_worker"]
        if gpus is None:
            gpus = 1 if str(cfg["device"]).startswith("cuda") else 0
        handle = self.backend.make(ModelWorker, worker_id, cfg["frame_finder"],
                                   frame_finder_options(cfg), int(cfg["batch_size"]),
                                   int(cfg["threads_per_worker"]), cfg["send_images"],
                                   num_cpus=int(cfg["threads_per_worker"]), num_gpus=gpus)
        future = self.backend.start(handle, "run", self.frames, self.results,
                                    float(cfg["lease_timeout"]))
        self.running[future] = ("worker", worker_id, handle)
        self.live_workers += 1

    # -- react --------------------------------------------------------------------------------
    def on_done(self, future: Any) -> None:
        role, name, handle = self.running.pop(future)
        if role == "source":  # a failed input's frames skipped before its error count too
            self._collect_skipped(name, handle)
        try:
            value = self.backend.result(future)
        except Exception as exc:  # noqa: BLE001 - any stage failure is handled by role
            getattr(self, f"_{role}_failed")(name, handle, exc)
            return
        if role == "source":
            self.sources.append(value)
        elif role == "worker":
            self.workers[name] = value
            self.live_workers -= 1
            self._collect(name, handle)
        else:
            self.writers.append(value)

    def _collect(self, name: str, handle: Any) -> None:
        """A finished worker's pixel-defect counts and (from the first) its finder's settings
        and whether it counts defects at all, taken now, while its actor is alive.  Failing to
        get them is logged, not fatal: the frames are written either way."""
        try:
            learned = self.backend.call(handle, "learned_defects")
            unusable = self.backend.call(handle, "unusable")
            if self.engine is None:
                self.engine = self.backend.call(handle, "settings")
            if self.keeps_defects is None:
                self.keeps_defects = bool(self.backend.call(handle, "keeps_defects"))
        except Exception as exc:  # noqa: BLE001 - a record lost, not the run
            log.warning("could not collect worker %s's pixel defects and settings: %s", name, exc)
            return
        if learned is not None:
            self.learned.append(learned)
        if unusable is not None:
            self.unusable.append(unusable)

    def _collect_skipped(self, name: str, handle: Any) -> None:
        """A source's spike counts of the frames it skipped (:meth:`SourceFeeder.learned_defects`);
        lost with a source whose process is gone (logged, not fatal)."""
        try:
            learned = self.backend.call(handle, "learned_defects")
        except Exception as exc:  # noqa: BLE001 - a record lost, not the run
            log.debug("could not collect %s's counts of the frames it skipped: %s", name, exc)
            return
        if learned is not None:
            self.skipped_learned.append(learned)

    def count_unreported(self) -> None:
        """Count what a writer that could not report has in its output: its process ended by
        the stop (a scheduler's SIGTERM reaches every process of the job) or its run failed,
        while the files it finished before stay.  They are counted as a rerun counts them
        (its writer's ``done_keys``), less what the output held when the run started, so the
        summary's ``written`` says what this run added (it said 0 for a run whose writer the
        stop had ended after it finished files).  Counted here, beside the output, where the
        driver writes the defect mask too."""
        reported = {str(w.get("path")) for w in self.writers}
        for path, before in self.writer_starts:
            if path in reported:
                continue
            try:
                writer = ResultWriter(self.cfg["writer"], path, self.cfg["writer_options"])
                try:
                    now = writer.resumed
                finally:
                    writer.close()
            except Exception as exc:  # noqa: BLE001 - a count lost, not the run
                log.warning("could not count the frames finished in %s: %s", path, exc)
                continue
            self.writers.append({"path": path, "written": max(now - before, 0), "duplicates": 0,
                                 "resumed": before, "counted_from_output": True})

    def save_defects(self) -> list[Path]:
        """Write the run's pixel defect mask from the workers' merged counts
        (:func:`pooled_defects`) beside the output, once; nothing before ``min_frames`` frames
        in all (a resumed run that found too few keeps the mask of the run before it).  The
        frames an earlier run finished are skipped by the sources and reach no worker: the
        sources count them (:meth:`SourceFeeder.learned_defects`), as the single-process run
        counts them again (``InferenceEngine.observe``), so both write the whole run's mask
        however the earlier run ended.  Why not the counts the earlier run kept in its mask
        file: a run whose Ray processes a scheduler's SIGTERM ended wrote none, and a file
        deleted since, ``--hits-only`` (non-hits are found again) or other inputs into the
        folder made them counts of other frames than those skipped; the mask then counted
        this run's frames only."""
        if self.defects_written is None:
            folder = output_folder(self.cfg["output"])
            skipped = self.skipped_learned if self.keeps_defects else []
            tracker, geometry = pooled_defects([*self.learned, *skipped])
            # the advice names a mask slot the geometry the writer put beside the output
            # leaves free (peaknet.geom reads each frame's own mask in slot 0)
            named = self.cfg["writer_options"].get("geometry_name")
            written_geometry = folder / named if named else None
            self.defects_written = ([] if tracker is None else
                                    tracker.save(folder, geometry, written_geometry))
            if self.workers_lost and self.keeps_defects:
                # the frames a dead worker found are written, its spike counts are gone: the
                # mask is of fewer frames than the run's, which a rerun (nothing left to find;
                # its sources count every frame done) makes whole
                log.warning("the pixel defect mask counts %d frames, not the frames that %d "
                            "worker(s) found before they died; run the same command again (it "
                            "finds nothing new) to write the mask of every frame",
                            0 if tracker is None else tracker.frames, self.workers_lost)
        return self.defects_written

    def _source_failed(self, name: str, handle: Any, exc: BaseException) -> None:
        """An input that cannot be read ends the run in error, but only once everything else
        is done: the other inputs' frames, queued or still to be read, are found and written,
        and the writers finish their files, so that nothing is lost and a rerun skips it all
        (aborting dropped every queued frame: a bad file listed after 200 good frames left
        an empty output, where the single-process run keeps the frames before it).  The error
        is the input's own, naming its file, as the single-process run reports it."""
        message = _input_error(self.source_paths.get(name, name), exc)
        if self.stop_requested or self.fatal is not None:
            self._fail(message, exc)  # the run is ending already: said, as before
            return
        self.failures.append(message)
        self.errors.append(message)
        self.failed_inputs.append(exc)
        others = sorted(self.source_paths[n] for role, n, _ in self.running.values()
                        if role == "source")
        if others:  # said now: a long run ends with the error only after the others are done
            log.info("%s cannot be read; the run stops with its error once the frames of the "
                     "other %d input(s) are written", self.source_paths.get(name, name),
                     len(others))

    def _writer_failed(self, name: str, handle: Any, exc: BaseException) -> None:
        self._fail(f"{name} failed: {exc}", exc)
        for queue in self.results:  # nobody may wait on a queue its writer no longer drains
            self._queue_call("close a result queue", queue.close, None)
        self.results_closed = True

    def _worker_failed(self, name: str, handle: Any, exc: BaseException) -> None:
        self.live_workers -= 1
        self.workers_lost += 1  # with the pixel-defect counts of the frames it found
        if not self.stop_requested:  # after a stop, Ray may be gone: a kill could wait on it
            self.backend.kill(handle)
        requeued = self._queue_call("re-queue a worker's frames",
                                    lambda: self.frames.release(name), 0)
        message = f"worker {name} died ({type(exc).__name__}); {requeued} leased frames re-queued"
        self.failures.append(message)
        log.warning(message)
        if self.fatal is not None or self.interrupted:
            return
        if self.restarts >= int(self.cfg["max_restarts"]):
            self._fail(f"workers died {self.restarts + 1} times; last: {exc}", exc)
            return
        self.restarts += 1
        self.start_worker(f"{name.split('.')[0]}.r{self.restarts}")

    def _fail(self, message: str, exc: BaseException) -> None:
        self.failures.append(message)
        if self.stop_requested:  # a stage lost to the stop itself: a scheduler's SIGTERM goes
            # to every process of the job, Ray's too; the run ends as interrupted, not failed
            log.warning("%s (after the stop was asked for)", message)
            return
        log.error(message)
        self.errors.append(message)
        if self.fatal is None:
            self.fatal = exc
            self.frames.abort()

    def relay_warnings(self) -> None:
        """Show the project's warnings the stages raised since the last call, once each
        (:mod:`.worker_logs`).  Never fails the run: a relay that cannot be read (its process
        ended by a stop, say) is given up."""
        if self.stages_lost or self.logs_gone:
            return
        try:
            records, dropped = self.backend.drain_logs()
        except Exception as exc:  # noqa: BLE001 - warnings lost, not the run
            self.logs_gone = True
            log.debug("could not read the stages' warnings: %s", exc)
            return
        self.warnings.replay(records, dropped)

    def _queue_call(self, what: str, call: Any, default: Any) -> Any:
        """``call()``, a call to a queue; after a stop was asked for, a queue whose process the
        stop ended too (the whole job's SIGTERM) gives ``default``, once said, rather than
        ending the run with Ray's error: the stop is what the run reports."""
        if self.stages_lost:  # nothing there to answer (a call could wait for ever)
            return default
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - Ray's errors for a process that is gone
            if not self.stop_requested:
                raise
            if not self.queues_gone:
                self.queues_gone = True
                log.warning("could not %s after the stop: %s (the stop reached Ray's "
                            "processes too; the frames of unfinished files are found again "
                            "by a rerun)", what, " ".join(str(exc).split())[:200])
            return default

    def _frame_stats(self) -> dict[str, Any]:
        """The frame queue's counts (the last known, where a stop ended its process)."""
        self.last_frame_stats = self._queue_call("read the frame queue", self.frames.stats,
                                                 self.last_frame_stats)
        return self.last_frame_stats

    def _result_stats(self) -> list[dict[str, Any]]:
        return [self._queue_call("read a result queue", q.stats, {"depth": 0})
                for q in self.results]

    def advance(self) -> None:
        """Close each queue once everything upstream of it is done."""
        roles = {role for role, _, _ in self.running.values()}
        if "source" not in roles:
            self._queue_call("close the frame queue", self.frames.close, None)
        if (self.live_workers == 0 or "worker" not in roles) and not self.results_closed:
            if (self.fatal is not None or self.interrupted
                    or self._frame_stats().get("finished")):
                for queue in self.results:
                    self._queue_call("close a result queue", queue.close, None)
                self.results_closed = True

    def interrupt(self, exc: KeyboardInterrupt | None = None) -> None:
        if self.interrupted:
            raise exc or KeyboardInterrupt()
        self.interrupted = True
        dropped = self._queue_call("drop the queued frames", self.frames.abort, 0)
        log.warning("interrupted: %d queued frames dropped; finishing leased batches", dropped)

    def abandon_stages(self) -> None:
        """Stop waiting for stages that cannot finish: after the stop, Ray's own processes
        are gone too (a scheduler's SIGTERM reaches every process of the job).  What the
        writers had not finished is left for a rerun, which finds those frames again."""
        self.stages_lost = True
        lost = stage_names(name for _, name, _ in self.running.values())
        self.running.clear()
        message = (f"Ray's own processes were stopped too: {lost} cannot finish; "
                   "the frames of files they had not finished are found again by a rerun")
        self.failures.append(message)
        log.warning(message)

    def loop(self, monitor: PipelineMonitor) -> None:
        interval = float(self.cfg["monitor_interval"])
        while self.running:
            try:
                for future in self.backend.wait(list(self.running), interval):
                    self.on_done(future)
                self.relay_warnings()
                if self.stop_requested and not self.interrupted:
                    self.interrupt()
                if self.interrupted and not self.backend.alive():
                    self.abandon_stages()
                    break
                self.advance()
                monitor.sample(self._frame_stats(), self._result_stats())
            except KeyboardInterrupt as exc:  # a second stop signal: at once
                if self.stop_requested and not self.interrupted:
                    # the first one's flag, not yet turned into the stop by this loop (it
                    # looks once an interval): two Ctrl-C 0.3 s apart acted as one, and the
                    # run found every leased frame before it ended
                    self.interrupt()
                self.interrupt(exc)


@contextmanager
def sigint_requests_stop(driver: Driver) -> Iterator[None]:
    """While inside, a first Ctrl-C or SIGTERM sets ``driver.stop_requested`` (and
    ``driver.stop_signal``); a second raises at once (``KeyboardInterrupt``, or
    :class:`~peaknet_xtal.stopping.Terminated` for SIGTERM).

    Only the main thread may install signal handlers; elsewhere (a driver run from a thread) the
    caller's handling stays as it is.  The previous handlers are restored on the way out.
    """
    def request(signum: int) -> bool:
        if driver.stop_requested:
            return False
        driver.stop_requested = True
        driver.stop_signal = signum
        return True

    with stop_requests(request):
        yield


def run_pipeline(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns (and writes as JSON) the run summary.

    Raises :class:`PipelineError` after flushing the writers if a stage failed for good; returns
    with ``"interrupted": True`` (and ``"stop_signal"``: ``"SIGINT"`` or ``"SIGTERM"``) after a
    Ctrl-C or a SIGTERM, one that came after the last frame too (while the defect mask was
    written or Ray shut down): the run was asked to stop, and its caller reports that.
    """
    cfg = resolve_config(config)
    driver = Driver(cfg, None)
    summary: dict[str, Any] | None = None
    # the stop flag's handlers from before Ray starts until it is shut down: a signal in
    # between never meets Python's default, which raised it where it could be lost
    with sigint_requests_stop(driver):
        backend = RayBackend(cfg) if cfg["backend"] == "ray" else ThreadBackend(cfg)
        driver.backend = backend
        try:
            skipped = driver.start()
            monitor_json = (cfg["monitor_json"]
                            or f"{str(cfg['output']).rstrip('/')}.pipeline.json")
            total, before = driver.frame_total(skipped) if cfg["progress"] else (None, 0)
            monitor = PipelineMonitor(total, progress=bool(cfg["progress"]),
                                      interval=float(cfg["monitor_interval"]),
                                      live_path=monitor_json, initial=before,
                                      label=str(cfg["progress_label"]))
            driver.loop(monitor)
            driver.relay_warnings()
            defects = driver.save_defects()
            driver.interrupted = driver.interrupted or driver.stop_requested  # a late stop too
            final = driver._frame_stats()
            monitor.sample(final, driver._result_stats())
        finally:
            try:  # after a second Ctrl-C or the driver's own failure too: what was learned is kept
                driver.save_defects()
            finally:
                try:  # the stages' last warnings, whatever ended the run
                    driver.relay_warnings()
                finally:
                    forget_local()  # a later run's stages may say again what this one did
                    backend.close()
        # once Ray is shut down: a writer whose process the stop ended may finish a file until
        # then, and the count opens the output as a rerun does (its unfinished files removed)
        driver.count_unreported()
        summary = monitor.close(
            monitor_json, live=False,
            backend=cfg["backend"], workers_started=int(cfg["workers"]) + driver.restarts,
            restarts=driver.restarts, requeued=final["requeued"],
            duplicates_dropped=(final["duplicates"]
                                + sum(w["duplicates"] for w in driver.writers)),
            dropped_on_abort=final["dropped"], resumed_keys=len(skipped),
            written=sum(w["written"] for w in driver.writers), sources=driver.sources,
            writers=driver.writers, worker_results=driver.workers, failures=driver.failures,
            interrupted=driver.interrupted, stop_signal=_signal_name(driver.stop_signal),
            engine=driver.engine, pixel_defects=[str(p) for p in defects],
            unusable_pixels=add_tallies(driver.unusable))
    if driver.fatal is not None or driver.failed_inputs:
        raise PipelineError("; ".join(driver.errors), driver.engine, summary) from (
            driver.fatal or driver.failed_inputs[0])
    assert summary is not None
    if driver.stop_requested and not summary["interrupted"]:  # asked while Ray shut down
        summary.update(interrupted=True, stop_signal=_signal_name(driver.stop_signal))
    return summary


def _input_error(path: str, exc: BaseException) -> str:
    """The one-line error of an input that could not be read, naming it: the input's own
    error where it names the file (a FormatError does), else the file and the error."""
    cause = getattr(exc, "cause", None)  # a stage's error Ray wrapped (RayTaskError)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip() or type(exc).__name__
    if not isinstance(exc, PeakNetError):
        text = f"{type(exc).__name__}: {text}"
    return text if path in text else f"{path}: {text}"


def _signal_name(signum: int | None) -> str | None:
    """``"SIGINT"``, ``"SIGTERM"``; None where no stop was asked for."""
    return None if signum is None else signal.Signals(signum).name
