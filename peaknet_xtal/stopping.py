"""Stopping a run on request: Ctrl-C (SIGINT) and a batch scheduler's SIGTERM, alike.

Why: schedulers (Slurm, PBS, LSF) end a job that runs out of time with SIGTERM, and only later,
after a grace period, with SIGKILL.  Python's default for SIGTERM is to die at once: no message,
partial output files left behind, and a run record that says nothing.  Ctrl-C, in contrast,
raises ``KeyboardInterrupt``, which the commands already handle (finished files kept, partial
ones closed or removed, the record saying "interrupted").  So SIGTERM is made to do the same:

- :class:`Terminated` is the ``KeyboardInterrupt`` that SIGTERM raises (a subclass, so every
  cleanup that handles Ctrl-C handles it), and a command exits with :func:`exit_status`:
  128 + the signal number, 130 for Ctrl-C and 143 for SIGTERM, as shells report a process ended
  by the signal;
- :func:`sigterm_raises`: where an exception wherever the main thread is is safe (the
  single-process run, as Ctrl-C already is), SIGTERM raises :class:`Terminated`;
- :func:`stop_requests`: where it is not (the Ray pipeline: one raised inside a finaliser, a Ray
  object reference being freed, is printed as "Exception ignored" and lost, and the run went on
  to exit 0), the first SIGINT or SIGTERM only sets a flag that the run reads at safe points; a
  second one raises at once.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: The signals that ask a run to stop: Ctrl-C, and what batch schedulers send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """A stop asked for with SIGTERM: handled as Ctrl-C is (a ``KeyboardInterrupt``), with its
    own exit status (:func:`exit_status`: 143)."""

    signum = signal.SIGTERM


def stop_exception(signum: int | None) -> KeyboardInterrupt:
    """The exception a stop by ``signum`` raises: :class:`Terminated` for SIGTERM, else
    ``KeyboardInterrupt`` (Ctrl-C, or a stop whose signal is not known)."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def signal_name(exc: BaseException) -> str:
    """``"SIGTERM"`` for :class:`Terminated`, ``"SIGINT"`` for another interruption."""
    return "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"


def interrupted(exc: BaseException) -> str:
    """How a command's one line after a stop begins: ``"interrupted"`` after Ctrl-C,
    ``"interrupted (SIGTERM)"`` after a batch scheduler's stop, the same words in every
    command."""
    return "interrupted (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def exit_status(exc: BaseException) -> int:
    """128 + the signal's number: 143 after SIGTERM, 130 after Ctrl-C (what a shell reports
    for a process the signal ended, and what schedulers and scripts test for)."""
    return 128 + int(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def _main_thread() -> bool:
    """Only the main thread may install signal handlers."""
    return threading.current_thread() is threading.main_thread()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises
    ``KeyboardInterrupt``.  The previous handler comes back on the way out; outside the main
    thread nothing changes."""
    if not _main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_requests(request: Callable[[int], bool]) -> Iterator[None]:
    """While inside, a SIGINT or SIGTERM calls ``request(signum)``, which returns whether it is
    the first stop asked for (the caller sets its flag then); a later one raises
    :func:`stop_exception` at once.  The previous handlers come back on the way out; outside
    the main thread nothing changes."""
    if not _main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if not request(signum):
            raise stop_exception(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def stops_held(now: bool = True, second_stops: bool = True) -> Iterator[Callable[[], None]]:
    """While inside, from the start (``now``) or from when the block calls the ``hold()`` it is
    given, a first Ctrl-C or SIGTERM waits: the block runs to its end and the stop is raised as
    it leaves (``KeyboardInterrupt``, or ``Terminated`` for SIGTERM), so that what it writes (a
    checkpoint, the teacher-logits cache, a report moved into place) is finished and kept, and
    the command's one line names it.  With ``second_stops`` a second stop raises at once
    (:func:`stop_requests`): whoever insists is not kept waiting, and the write is then lost as
    before; without it every stop waits (for steps of a moment that must never stop half-way).
    A signal the process ignores stays ignored: a job a shell script runs in the background
    ignores the Ctrl-C meant for the script's foreground, and would otherwise stop at its next
    checkpoint.  For short writes only: a stop waits for the whole block.  An error inside
    propagates as it is (the held stop with it: the command stops either way).  Outside the
    main thread nothing changes (no handler can be installed there)."""
    import contextlib

    asked: list[int] = []
    holding: list[bool] = []

    def first(signum: int) -> bool:
        if asked and second_stops:
            return False
        asked.append(signum)
        return True

    with contextlib.ExitStack() as stack:
        def hold() -> None:
            if holding:
                return
            holding.append(True)
            ignored = [s for s in STOP_SIGNALS if signal.getsignal(s) == signal.SIG_IGN]
            stack.enter_context(stop_requests(first))
            if _main_thread():
                for signum in ignored:
                    signal.signal(signum, signal.SIG_IGN)

        if now:
            hold()
        yield hold
    if asked:
        raise stop_exception(asked[0])
