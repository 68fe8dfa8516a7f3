"""The three kinds of pipeline stage, as plain classes, plus their thin Ray wrappers.

Each stage talks to its queues only through a *client* with synchronous ``put / lease / ack /
release / report`` methods (:class:`~.queues.LocalQueueClient` in-process,
:class:`RayQueueClient` under Ray), so the same class runs on a thread in a test and as a Ray actor
on a GPU node.

- :class:`SourceFeeder` reads one input through the plugin registry and pushes frames, in chunks,
  into the frame queue; a full queue blocks it (back-pressure).  The frames an earlier run
  finished it skips, counting their spiking pixels for the run's defect mask as the
  single-process run counts them (``InferenceEngine.observe``); a frame whose detector geometry
  does not fit the output folder's it refuses, naming its file, before any of it is found
  (:class:`SameGeometry`).
- :class:`ModelWorker` leases a batch (a partial final batch is fine), runs the frame finder and
  sends *peak tables* on (never logit maps: they would dwarf the images in the object store).
  At the end of a run the driver asks each worker for what its finder learned across the frames
  it saw (:meth:`ModelWorker.learned_defects`: the pixel-defect counts) and for the finder's
  resolved settings (:meth:`ModelWorker.settings`), for the run's defect mask and summary.
- :class:`ResultWriter` drains a result queue into a :class:`~peaknet_xtal.hookspecs` ``PeakWriter``
  (rolling CXI files by default), skips keys already written, and acknowledges each frame to the
  frame queue: only then is a frame done, so a worker that dies before that has its lease re-queued.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from peaknet_xtal.finding.defects import DefectFilter, DefectTracker
from peaknet_xtal.finding.sanitise import SanitiseTally, sanitise_frame
from peaknet_xtal.pipeline.frame_finders import build_frame_finder
from peaknet_xtal.progress import closed_length
from peaknet_xtal.types import Frame, FrameResult, resolved_key

#: A frame's ``(source, event)`` key as the pipeline passes it around.
FrameKey = tuple[Any, ...]


def shard_of(key: Sequence[Any], n: int) -> int:
    """Stable shard of a frame key (same in every process, unlike ``hash``)."""
    return zlib.crc32(repr(tuple(key)).encode()) % n if n > 1 else 0


class LearnedDefects(NamedTuple):
    """What one worker's frame finder learned about the detector's pixels over the frames it
    saw: its run-level defect tracker (per-pixel spike counts) and the geometry of those frames
    (the mask is written in the data's slab layout)."""

    tracker: DefectTracker
    geometry: Any


class SameGeometry:
    """The output folder's one geometry, checked where an input is read: a frame whose detector
    geometry would need another ``.geom`` than the first input's is refused, naming its file,
    before it is found, as the single-process run refuses it (``CXIWriter.check_geometry``,
    called before the frame is found).

    Why in the sources: the inputs are read in parallel, so the writer met the frames in no
    set order and took the folder's geometry from whichever came first; with two detectors the
    error could name the first input and keep the second's frames.  Here the first input (in
    input order) is the reference, as in the single-process run, and a refused input ends the
    run in error once the others are written (``Driver._source_failed``).  Geometries compare
    as the writer compares them (``formats.cxi.written_placement``); frames of one input share
    one geometry object, so only a new object is compared."""

    def __init__(self, reference: Frame) -> None:
        from peaknet_xtal.formats.cxi import written_placement

        self.source = reference.source
        self.placement = written_placement(reference.geometry)
        self._fits: Any = reference.geometry  # the last geometry found to fit

    def __call__(self, frame: Frame) -> None:
        if frame.geometry is None or frame.geometry is self._fits:
            return
        from peaknet_xtal.formats.cxi import other_detector_error, written_placement

        if written_placement(frame.geometry) != self.placement:
            raise other_detector_error(frame.source, f"that of the first input, {self.source}")
        self._fits = frame.geometry


class SourceFeeder:
    """Feeds one input (``{"path", "kind", "options"}``) into the frame queue, skipping done keys.

    ``kind`` is a registered source type name (None: the first whose ``sniff`` accepts the path)
    or a factory ``kind(path, **options) -> FrameSource``.  ``check``: called on every frame to
    be sent, before it is sent (:class:`SameGeometry`); its error ends this input, the frames
    before it sent.

    The frames it skips (finished by an earlier run) reach no worker: their spiking pixels are
    counted here (:meth:`learned_defects`), as the single-process run counts them
    (``InferenceEngine.observe``), so that a resumed run's defect mask is the whole run's
    however the earlier run ended (one stopped with its Ray processes, by a scheduler's
    SIGTERM to the whole job, wrote no mask at all).
    """

    def __init__(self, spec: dict[str, Any], skip: Iterable[Sequence[Any]] = (),
                 chunk: int = 16, check: Callable[[Frame], None] | None = None) -> None:
        self.spec = dict(spec)
        self.skip = {resolved_key((str(k[0]), str(k[1]))) for k in skip}  # by file, any name
        self.chunk = max(1, int(chunk))
        self.check = check
        self.tracker = DefectTracker()  # the engine's own settings (DefectFilter's tracker)
        self.geometry: Any = None  # of the latest frame skipped (the mask's layout)

    def open(self) -> Any:
        """Through the plugin registry by type name (or sniffing), or a picklable factory."""
        kind, options = self.spec.get("kind"), dict(self.spec.get("options") or {})
        if callable(kind):
            return kind(str(self.spec["path"]), **options)
        from peaknet_xtal.registry import open_source

        return open_source(str(self.spec["path"]), kind, **options)

    def first_frame(self) -> Frame | None:
        """The input's first frame without its pixels (its identity and geometry), None where
        it holds none: the driver's reference for :class:`SameGeometry`."""
        from peaknet_xtal.registry import checked_frames

        source = self.open()
        try:
            frame = next(checked_frames(source, str(self.spec["path"])), None)
        finally:
            source.close()
        return None if frame is None else dataclasses.replace(frame, panels=[], masks=None)

    def count(self) -> int | None:
        """The input's frames, where its source can say without reading them (None else)."""
        return closed_length(self.open())

    def run(self, queue: Any) -> dict[str, Any]:
        """Push every frame not yet done; returns counts.  Stops early if the queue is aborted."""
        from peaknet_xtal.registry import checked_frames

        sent = skipped = 0
        stopped = False
        buffer: list[Any] = []
        source = self.open()
        try:
            for frame in checked_frames(source, str(self.spec["path"])):
                if resolved_key(frame.key) in self.skip:
                    skipped += 1
                    self._count_skipped(frame)
                    continue
                if self.check is not None:
                    try:
                        self.check(frame)
                    except Exception:
                        if buffer:  # the frames before it are found, as single-process
                            queue.put(buffer)
                        raise
                buffer.append(frame)
                if len(buffer) >= self.chunk:
                    if not queue.put(buffer):
                        stopped = True
                        break
                    sent += len(buffer)
                    buffer = []
            if buffer and not stopped:
                stopped = not queue.put(buffer)
                sent += 0 if stopped else len(buffer)
        finally:
            source.close()
        return {"path": str(self.spec["path"]), "sent": sent, "skipped": skipped,
                "stopped": stopped}

    def _count_skipped(self, frame: Frame) -> None:
        """A skipped frame's spiking pixels, among its usable ones, as
        ``InferenceEngine.observe`` counts them."""
        goods = sanitise_frame(frame.panels, frame.masks, frame.meta.get("dtype"))[1]
        self.tracker.update(frame.panels, goods)
        self.geometry = frame.geometry

    def learned_defects(self) -> LearnedDefects | None:
        """The spike counts of the frames skipped (None where none was), for the driver to add
        to the workers' where their finder keeps such counts (:meth:`ModelWorker.keeps_defects`)."""
        if self.tracker.counts is None:
            return None
        return LearnedDefects(self.tracker, self.geometry)


class ModelWorker:
    """Leases batches of frames, finds peaks, routes results to the writers' queues.

    ``threads`` is the CPU thread budget (``torch.set_num_threads``), so N CPU workers share a node
    without oversubscribing it; on a GPU node each worker gets one device instead.
    """

    def __init__(self, worker_id: str, frame_finder: Any = "engine",
                 frame_finder_options: dict[str, Any] | None = None, batch_size: int = 8,
                 threads: int = 1, send_images: bool | str = "auto") -> None:
        self.worker_id = worker_id
        self.frame_finder_spec = frame_finder
        self.frame_finder_options = dict(frame_finder_options or {})
        self.batch_size = max(1, int(batch_size))
        self.threads = max(1, int(threads))
        self.send_images = send_images
        self._frame_finder: Any = None
        self.geometry: Any = None  # of the latest frame found (for the defect mask's layout)
        self.frames = self.batches = 0
        self.hits = self.peaks = 0  # of the frames found, for the progress line (.monitor)
        self.busy_s = 0.0
        self.started = time.perf_counter()

    def frame_finder(self) -> Any:
        if self._frame_finder is None:
            self._frame_finder = build_frame_finder(self.frame_finder_spec,
                                                    self.frame_finder_options)
            tally = getattr(self._frame_finder, "sanitised", None)
            if isinstance(tally, SanitiseTally):  # the driver sums it into the run summary
                tally.reported_in = "the run summary"
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(self.threads)
        return self._frame_finder

    def process(self, frames: Sequence[Any]) -> list[FrameResult]:
        """Run the frame finder on one batch; results keep each frame's identity, drop
        maps/pixels."""
        finder = self.frame_finder()
        t0 = time.perf_counter()
        results = list(finder.find_frames(list(frames)))
        self.busy_s += time.perf_counter() - t0
        self.frames += len(frames)
        self.hits += sum(bool(r.hit) for r in results)
        self.peaks += sum(len(r.peaks) for r in results)
        self.batches += 1
        if frames:
            self.geometry = frames[-1].geometry
        return [self._slim(r) for r in results]

    def learned_defects(self) -> LearnedDefects | None:
        """The pixel-defect counts this worker's frame finder kept over the frames it found
        (the engine's :class:`~peaknet_xtal.finding.defects.DefectFilter` tracker), for the
        driver to merge with the other workers' into the run's mask; None where the finder
        keeps none (a factory's own finder) or has counted no frame."""
        defects = getattr(self._frame_finder, "defects", None)
        if not isinstance(defects, DefectFilter) or defects.tracker.counts is None:
            return None
        return LearnedDefects(defects.tracker, self.geometry)

    def unusable(self) -> dict[str, int] | None:
        """The frame finder's counts of unusable pixels and frames without data (the engine's
        :class:`~peaknet_xtal.finding.sanitise.SanitiseTally`), for the driver to sum into the
        run summary, which the engine's warnings name once they stop; None where the finder
        keeps none."""
        tally = getattr(self._frame_finder, "sanitised", None)
        return tally.as_dict() if isinstance(tally, SanitiseTally) else None

    def keeps_defects(self) -> bool:
        """Whether the frame finder counts pixel defects (the engine's ``DefectFilter``): only
        then do the counts of the frames the sources skipped join the run's mask.  The finder
        is built if no frame came."""
        return isinstance(getattr(self.frame_finder(), "defects", None), DefectFilter)

    def settings(self) -> dict[str, Any] | None:
        """The frame finder's resolved settings as plain values (the engine's ``describe()``,
        what the single-process run records), so that the run summary says what ran, defaults
        filled in; None for a finder that cannot say.  The finder is built if no frame came
        (an engine loads its model only when it first finds peaks)."""
        describe = getattr(self.frame_finder(), "describe", None)
        return dict(describe()) if callable(describe) else None

    def _slim(self, result: FrameResult) -> FrameResult:
        frame = result.frame
        if not self._keep_pixels(frame):
            frame = dataclasses.replace(frame, panels=[], masks=None)
        return dataclasses.replace(result, frame=frame, prob_maps=None, peak_pixels=None)

    def _keep_pixels(self, frame: Any) -> bool:
        """``"auto"``: pixels travel on only if the writer cannot link back to an HDF5 source."""
        if self.send_images == "auto":
            return not (frame.meta.get("h5_file") and frame.meta.get("h5_dataset"))
        return bool(self.send_images)

    def stats(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.started
        return {"worker": self.worker_id, "pid": os.getpid(), "frames": self.frames,
                "hits": self.hits, "peaks": self.peaks, "batches": self.batches,
                "busy_s": round(self.busy_s, 4), "wall_s": round(wall, 4),
                "busy_fraction": round(self.busy_s / wall, 4) if wall > 0 else 0.0}

    def run(self, frames_in: Any, results_out: Sequence[Any], lease_timeout: float = 1.0,
            ) -> dict[str, Any]:
        """Lease, process, route, until the frame queue is finished; returns final statistics."""
        self.started = time.perf_counter()
        while True:
            frames = frames_in.lease(self.worker_id, self.batch_size, lease_timeout,
                                     report=self.stats())
            if frames is None:
                break
            if frames:
                self._route(self.process(frames), results_out)
        final = self.stats()
        frames_in.report(self.worker_id, final)
        return final

    @staticmethod
    def _route(results: list[FrameResult], outs: Sequence[Any]) -> None:
        shards: dict[int, list[FrameResult]] = {}
        for result in results:
            shards.setdefault(shard_of(result.frame.key, len(outs)), []).append(result)
        for index, items in shards.items():
            outs[index].put(items)


class ResultWriter:
    """Writes results once each (keys already in the output are skipped) and acknowledges them."""

    def __init__(self, writer: Any, path: str, options: dict[str, Any] | None = None,
                 chunk: int = 64) -> None:
        self.path = str(path)
        self._spec: tuple[Any, dict[str, Any]] | None = (writer, dict(options or {}))
        self.writer: Any = None
        self.seen: set[FrameKey] = set()
        self._resumed = 0
        self.chunk = max(1, int(chunk))
        self.written = self.duplicates = 0

    def _ensure_open(self) -> None:
        """Open the output and read what an earlier run finished, on first use rather than
        in ``__init__``: an error there (a FormatError naming a changed input or a damaged
        file) kills a Ray actor with only its message, while one raised by a method reaches
        the driver as itself."""
        if self.writer is None and self._spec is not None:
            writer, options = self._spec
            self._spec = None
            self.writer = self._open(writer, self.path, options)
            self.seen = {tuple(k) for k in self.writer.done_keys()}
            self._resumed = len(self.seen)

    @property
    def resumed(self) -> int:
        """Frames an earlier run finished in this output (read on first use)."""
        self._ensure_open()
        return self._resumed

    @staticmethod
    def _open(writer: Any, path: str, options: dict[str, Any]) -> Any:
        if callable(writer) and not isinstance(writer, str):
            return writer(path, **options)
        from peaknet_xtal.registry import open_writer

        return open_writer(writer, path, **options)

    def done_keys(self) -> list[FrameKey]:
        self._ensure_open()
        return sorted(self.seen)

    def geometry_check(self, reference: Frame | None) -> SameGeometry | None:
        """The check the sources apply to their frames (:class:`SameGeometry`), from the first
        input's first frame (``reference``), for a writer that holds one geometry
        (``check_geometry``) and has none of its own to write for every frame; None else.

        The writer checks the reference first, so that the folder's geometry is the first
        input's whichever frame reaches it first, and one an earlier run wrote there, if
        another, is said naming the first input, before any frame is found."""
        self._ensure_open()
        check = getattr(self.writer, "check_geometry", None)
        if reference is None or reference.geometry is None or not callable(check):
            return None
        check(reference)
        if getattr(self.writer, "geometry", None) is not None:
            return None  # its own geometry is written for every frame
        return SameGeometry(reference)

    def write(self, results: Sequence[FrameResult]) -> list[FrameKey]:
        """Write the new results; returns every key handled (new or duplicate), to acknowledge."""
        self._ensure_open()
        keys = []
        for result in results:
            key = tuple(result.frame.key)
            keys.append(key)
            if key in self.seen:
                self.duplicates += 1
                continue
            self.writer.write(result)
            self.seen.add(key)
            self.written += 1
        return keys

    def close(self) -> dict[str, Any]:
        """Finalise the output atomically; safe to call twice."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return {"path": self.path, "written": self.written, "duplicates": self.duplicates,
                "resumed": self.resumed}

    def run(self, results_in: Any, frames_ack: Any, lease_timeout: float = 1.0) -> dict[str, Any]:
        """Drain until the result queue is finished, then finalise."""
        try:
            self._ensure_open()
            while True:
                results = results_in.lease(None, self.chunk, lease_timeout)
                if results is None:
                    break
                if results:
                    frames_ack.ack(self.write(results))
        finally:
            summary = self.close()
        return summary


class RayQueueClient:
    """Synchronous, picklable client of a Ray queue actor (same methods as LocalQueueClient)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.handle, method).remote(*args))

    def put(self, items: Sequence[Any], timeout: float | None = None) -> bool:
        return self._call("put", list(items), timeout)

    def lease(self, owner: str | None, n: int, timeout: float | None = None,
              report: dict[str, Any] | None = None) -> list[Any] | None:
        return self._call("lease", owner, n, timeout, report)

    def ack(self, keys: Sequence[FrameKey]) -> int:
        return self._call("ack", list(keys))

    def release(self, owner: str) -> int:
        return self._call("release", owner)

    def close(self) -> None:
        self._call("close")

    def abort(self) -> int:
        return self._call("abort")

    def report(self, owner: str, stats: dict[str, Any]) -> None:
        self._call("report", owner, stats)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")


@functools.cache
def _remote_class(cls: type) -> Any:
    import ray

    return ray.remote(cls)


def ray_queue(capacity: int, name: str) -> RayQueueClient:
    """A queue actor: async (many callers wait on it at once), no CPU reserved."""
    from peaknet_xtal.pipeline.queues import AsyncLeaseQueue

    actor = _remote_class(AsyncLeaseQueue).options(num_cpus=0, max_concurrency=1000)
    return RayQueueClient(actor.remote(capacity, name))


def ray_actor(cls: type, *args: Any, num_cpus: float = 0, num_gpus: float = 0,
              log_relay: Any = None, **kwargs: Any) -> Any:
    """A Ray actor around a plain stage class; no Ray restarts (the driver re-queues instead).
    With ``log_relay`` (a :class:`~.worker_logs.LogRelay` actor) the project's warnings raised
    in the actor's process go there, for the driver to show (:mod:`.worker_logs`)."""
    if log_relay is not None:
        cls, kwargs = _forwarding(cls), {**kwargs, "_log_relay": log_relay}
    return _remote_class(cls).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                      max_restarts=0).remote(*args, **kwargs)


@functools.cache
def _forwarding(cls: type) -> type:
    """``cls`` whose instances first send their process's warnings to a relay (the keyword
    ``_log_relay``), before ``cls.__init__`` runs: its own warnings are relayed too."""
    def __init__(self: Any, *args: Any, _log_relay: Any = None, **kwargs: Any) -> None:
        from peaknet_xtal.pipeline.worker_logs import forward_warnings

        if _log_relay is not None:
            forward_warnings(_log_relay)
        cls.__init__(self, *args, **kwargs)  # type: ignore[misc]

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__,
                                       "__doc__": cls.__doc__})


def ray_log_relay() -> Any:
    """A :class:`~.worker_logs.LogRelay` actor: no CPU, the stages' warnings for the driver."""
    from peaknet_xtal.pipeline.worker_logs import LogRelay

    return _remote_class(LogRelay).options(num_cpus=0, max_restarts=0).remote()
