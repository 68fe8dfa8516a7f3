"""The project's warnings from Ray stage processes, shown by the driver as a single-process run
shows them.

Ray is started with ``log_to_driver=False`` (:mod:`.ray_session`): otherwise every line a stage
process writes reaches the terminal, prefixed ``(ModelWorker pid=...)``: each worker's INFO
lines (its torch threads, its model loaded), Ray's own worker chatter, all through the progress
bar.  But that also dropped the project's own warnings raised in a stage (a frame's non-finite
pixels masked, a file's missing mask dataset): a ``--workers`` run said nothing where the
single-process run warned.

So each stage process sends the records of the ``peaknet_xtal`` loggers at WARNING and above
(nothing else) to a :class:`LogRelay` actor (:func:`forward_warnings`), and the driver replays
them through the same loggers (:class:`WarningReplay`): the same ``WARNING name: message`` line
as in one process, under the driver's logging settings.  A message is shown once however many
processes raise it (each worker meets a file's problem), and not again where the driver's own
process has said it before or during the run (:func:`remember_local`).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

#: The loggers whose warnings are forwarded (the project's, all below this one).
PROJECT_LOGGER = "peaknet_xtal"
#: Records a relay holds between the driver's reads; more are counted, not kept.
RELAY_CAPACITY = 10_000
#: Seconds a stage waits for the relay to take a record before printing it locally instead.
SEND_TIMEOUT = 10.0

#: One forwarded record: ``(logger name, level number, message)``.
Record = tuple[str, int, str]


class LogRelay:
    """The driver's mailbox for the stages' warnings (a Ray actor that reserves no CPU)."""

    def __init__(self, capacity: int = RELAY_CAPACITY) -> None:
        self.capacity = max(1, int(capacity))
        self.records: list[Record] = []
        self.dropped = 0

    def add(self, record: Record) -> None:
        if len(self.records) < self.capacity:
            self.records.append(tuple(record))  # type: ignore[arg-type]
        else:
            self.dropped += 1

    def drain(self) -> tuple[list[Record], int]:
        """The records since the last call, and how many were dropped for want of room."""
        records, dropped = self.records, self.dropped
        self.records, self.dropped = [], 0
        return records, dropped


class _ForwardHandler(logging.Handler):
    """Sends each WARNING-or-above record of the project's loggers to the relay, and waits until
    it has it: a stage's warnings are then all in the relay when the stage's call returns, so the
    driver's read after it misses none.  Only warnings pay the round trip."""

    def __init__(self, relay: Any) -> None:
        super().__init__(logging.WARNING)
        self.relay = relay
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken:  # the relay is gone (the run is ending): the record stays local
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            import ray

            ray.get(self.relay.add.remote((record.name, record.levelno, message)),
                    timeout=SEND_TIMEOUT)
        except Exception:  # noqa: BLE001 - a lost relay must never fail the stage's work
            self.broken = True


_installed: _ForwardHandler | None = None
_install_lock = threading.Lock()


def forward_warnings(relay: Any) -> None:
    """In a stage process: send the project's warnings to ``relay`` from now on (once a process;
    a later call points the same handler at the newer relay)."""
    global _installed
    with _install_lock:
        if _installed is None:
            _installed = _ForwardHandler(relay)
            logger = logging.getLogger(PROJECT_LOGGER)
            logger.addHandler(_installed)
            if logger.getEffectiveLevel() > logging.WARNING:
                logger.setLevel(logging.WARNING)
        else:
            _installed.relay, _installed.broken = relay, False


class WarningReplay:
    """The driver's side: replays relayed records through the loggers that raised them, each
    message once, and none that the driver's own process has logged (:func:`remember_local`:
    the run's gain measured before the workers start warns there first, say)."""

    def __init__(self) -> None:
        self.seen: set[Record] = set()
        self.dropped = 0

    def replay(self, records: Iterable[Record], dropped: int = 0) -> int:
        """Log the records not seen before; returns how many were logged."""
        shown = 0
        for name, level, message in records:
            key = (str(name), int(level), str(message))
            if key in self.seen or key in _local_seen:
                continue
            self.seen.add(key)
            logger = logging.getLogger(key[0])
            if logger.isEnabledFor(key[1]):
                logger.handle(logger.makeRecord(key[0], key[1], "(stage process)", 0, "%s",
                                                (key[2],), None, extra={RELAYED: True}))
            shown += 1
        if dropped:
            self.dropped += dropped
            logging.getLogger(__name__).warning(
                "%d more warnings from the pipeline's stages were not shown (more than %d "
                "came between two reads)", dropped, RELAY_CAPACITY)
        return shown


#: Attribute that marks a record replayed from a stage (not one of this process's own).
RELAYED = "peaknet_relayed"
#: How many of this process's own warnings :func:`remember_local` keeps.
LOCAL_MEMORY = 4096
_local_seen: OrderedDict[Record, None] = OrderedDict()


class _RememberLocal(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, RELAYED, False):
            return
        key = (record.name, record.levelno, record.getMessage())
        with _install_lock:
            _local_seen[key] = None
            _local_seen.move_to_end(key)
            while len(_local_seen) > LOCAL_MEMORY:
                _local_seen.popitem(last=False)


_remembering: _RememberLocal | None = None


def remember_local() -> None:
    """From now on, remember the project's warnings this process logs (the last
    :data:`LOCAL_MEMORY`), so that the same message relayed from a stage is not shown again.
    Installed when the driver is imported: ``peaknet2cxi`` imports it before it measures the
    run's gain, whose warning the workers' engines would otherwise repeat.  What is remembered
    is forgotten at the end of each run (:func:`forget_local`): it spans one run and what the
    process did before it, since the previous one."""
    global _remembering
    with _install_lock:
        if _remembering is None:
            _remembering = _RememberLocal(logging.WARNING)
            logging.getLogger(PROJECT_LOGGER).addHandler(_remembering)


def forget_local() -> None:
    """Forget the warnings :func:`remember_local` kept (a run has ended)."""
    with _install_lock:
        _local_seen.clear()
