"""Progress of long jobs on stderr (count, rate such as frames/s, ETA), drawn by tqdm.

On a terminal tqdm redraws its bar in place.  Elsewhere (CI, batch logs, files) a redrawn line
would pile up ``\\r``-joined text, so :class:`Progress` prints one plain line at most every
``interval`` seconds instead, through tqdm's documented ``display`` hook; counting, rates (with
tqdm's smoothing) and the ETA are tqdm's either way.  tqdm's monitor thread is off: these bars
also run inside Ray workers and torch DDP ranks, where a stray thread per bar buys nothing.

Log records share the stream (a warning mid-run).  In a log each progress line is a whole line,
so a record starts a line of its own; on a terminal, while a bar is open, console logging goes
through tqdm's ``logging_redirect_tqdm`` (the bar is cleared, the record written, the bar drawn
again), so a record is never glued onto the bar.

A total is worth a short wait, not minutes of silence: :func:`count_within` counts a job's inputs
for its total within :data:`COUNT_SECONDS` and otherwise leaves the bar without one.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

#: Seconds a command may spend counting its inputs' frames for the progress total before its
#: first frame.  Counting opens every input: 20-40 ms a file through dxtbx (a bzip2 CBF of a
#: Pilatus 6M took 40 ms on a busy 2-core machine), so a serial run of 10,000 single-image files
#: would wait minutes, silent, before it started; past this the line runs without a total.
COUNT_SECONDS = 2.0

_Item = TypeVar("_Item")

#: Layout of a log line (no bar: it would be redrawn, not extended); ``{unit}`` has its space.
#: The rate is always units per second (tqdm's ``rate_noinv_fmt``): its default turns slow
#: rates over, as seconds per unit, which read "3.89s/ frames".
LOG_FORMAT = ("{n_fmt}/{total_fmt}{unit} {percentage:5.1f}% | {rate_noinv_fmt} | "
              "ETA {remaining}{postfix}")
#: The same without a known total.
LOG_FORMAT_OPEN = "{n_fmt}{unit} | {rate_noinv_fmt}{postfix}"
#: Layout of the terminal bar: tqdm's own, with the ETA spelled out.
TTY_FORMAT = ("{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} "
              "[{elapsed}, ETA {remaining}, {rate_noinv_fmt}{postfix}]")


def _layout(tty: bool, total: int | None, desc: str) -> str:
    if tty:
        text = TTY_FORMAT if total is not None else LOG_FORMAT_OPEN
    else:
        text = LOG_FORMAT if total is not None else LOG_FORMAT_OPEN
    return ("{desc}: " if desc else "") + text


def finding_counts(hits: int, frames: int, peaks: int) -> str:
    """What a peak-finding run's progress line says after its rate: the hits so far and the
    mean peaks per frame of the ``frames`` found, ``peaks`` in all.  Worded here once for
    ``peaknet2cxi`` alone and with ``--workers`` (the pipeline's monitor): the two lines were
    worded apart, and a user switching between them read two different commands."""
    return f"hits {hits} | {peaks / frames if frames else 0.0:.1f} peaks/frame"


def format_seconds(seconds: float) -> str:
    """``65`` -> ``01:05``, ``3725`` -> ``1:02:05``; ``--:--`` when unknown (NaN, inf)."""
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "--:--"
    return str(tqdm.format_interval(seconds))


def count_within(items: Sequence[_Item], count: Callable[[_Item], int | None], *,
                 unit: str = "frames", seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> int | None:
    """The sum of ``count(item)`` over ``items``: a progress line's total.  None where an item
    cannot say (``count`` gives None) or where counting outlasts ``seconds``
    (:data:`COUNT_SECONDS` by default), which one info line says: the job then starts at once
    and its line shows the count and the rate, with no total and no ETA."""
    limit = COUNT_SECONDS if seconds is None else seconds
    start = clock()
    total = 0
    for done, item in enumerate(items, 1):
        n = count(item)
        if n is None:
            return None
        total += n
        spent = clock() - start
        if done < len(items) and spent > limit:
            log.info("counting the %s of %d inputs would take about %.0f s (%d counted in "
                     "%.1f s): the progress line shows no total", unit, len(items),
                     spent * len(items) / done, done, spent)
            return None
    return total


def closed_length(source: Any) -> int | None:
    """``len(source)`` of a frame source opened to count it, None where it cannot say without
    reading its frames; the source is closed either way."""
    try:
        return len(source)
    except TypeError:
        return None
    finally:
        source.close()


class _Bar(tqdm):
    """tqdm without its monitor thread."""

    monitor_interval = 0

    def refresh(self, nolock: bool = False, lock_args: tuple | None = None) -> bool | None:
        """tqdm's refresh, holding tqdm's process-wide lock as tqdm does, but letting it go when
        the drawing raises (a Ctrl-C in the stream's write or flush): tqdm's own refresh keeps
        it then, and every later bar that another thread of the process draws waits for ever (a
        Python session's next run through the API; a Ray driver thread in a test run)."""
        if self.disable or nolock:
            return super().refresh(nolock=nolock, lock_args=lock_args)
        if lock_args:
            if not self._lock.acquire(*lock_args):
                return False
        else:
            self._lock.acquire()
        try:
            return super().refresh(nolock=True)
        finally:
            self._lock.release()

    def close(self) -> None:
        """tqdm's close, except for a bar whose construction a stop interrupted (a Ctrl-C while
        its first line was written): tqdm's ``__del__`` closed it anyway and printed an
        "Exception ignored ... no attribute 'last_print_t'" traceback below the stop's line."""
        if hasattr(self, "last_print_t"):
            super().close()


class _LogBar(_Bar):
    """One whole line per refresh (``display`` is tqdm's hook for other front ends)."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.__str__() if msg is None else msg
        if not text:  # tqdm asks to clear the line: a log line stays
            return False
        # a log never gets the same count twice (a refresh after tqdm.write, say)
        if self.n == getattr(self, "_drawn_n", None):
            return True
        self._drawn_n = self.n
        # each line ends with its newline, so whatever else writes here (a log record) starts
        # a line of its own
        self.fp.write(text + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:
        """A log line is never erased (tqdm.write clears bars before it writes)."""

    def close(self) -> None:
        """The last state, drawn once.  tqdm's own close() draws it and then ends the line
        with "\n", which here would be a blank line: it is drawn here, and tqdm is left only
        to clear the line, which :meth:`display` declines."""
        if not hasattr(self, "last_print_t"):  # never built whole (:meth:`_Bar.close`)
            return
        if not self.disable:
            with self._lock:
                self._ema_dt = lambda: None  # the run's overall rate, as tqdm's close() gives
                self.display()
            self.leave = False
        super().close()


#: Open terminal bars, and the logging redirect they share: the first bar opens it, the last
#: closes it, so bars closed in any order leave the handlers as they found them.
_redirect_lock = threading.Lock()
_redirect_users = 0
_redirect: contextlib.ExitStack | None = None


def _redirect_logging(on: bool) -> None:
    """Console logging (the root logger's handlers on stdout/stderr) through ``tqdm.write``
    while any terminal bar is open, tqdm's documented way to log beside a bar."""
    global _redirect_users, _redirect
    with _redirect_lock:
        if on:
            _redirect_users += 1
            if _redirect_users == 1:
                _redirect = contextlib.ExitStack()
                _redirect.enter_context(logging_redirect_tqdm(tqdm_class=_Bar))
        else:
            _redirect_users -= 1
            if _redirect_users == 0 and _redirect is not None:
                _redirect.close()
                _redirect = None


class Progress:
    """``with Progress(total, "frames") as bar: bar.update(n, extra="hits 3")``."""

    def __init__(
        self,
        total: int | None,
        unit: str = "frames",
        *,
        desc: str = "",
        stream: TextIO | None = None,
        interval: float | None = None,
        enabled: bool = True,
        initial: int = 0,
    ) -> None:
        """``initial``: units already done before this run (a resumed job), shown from the
        first line on and left out of the rate."""
        self.total = total
        self.unit = unit
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.enabled = enabled
        self.extra = ""
        cls = _Bar if self.tty else _LogBar
        self._bar = cls(total=total, unit=f" {unit}", desc=desc or None, file=self.stream,
                        mininterval=self.interval, maxinterval=max(self.interval, 10.0),
                        miniters=1, disable=not enabled, leave=True, dynamic_ncols=self.tty,
                        bar_format=_layout(self.tty, total, desc), ascii=not self.tty,
                        initial=int(initial))
        if not enabled:  # tqdm counts nothing when disabled; callers may still read the count
            self._count = int(initial)
        self._redirected = self.tty and enabled
        if self._redirected:
            _redirect_logging(True)

    @property
    def count(self) -> int:
        return self._count if not self.enabled else int(self._bar.n)

    @property
    def rate(self) -> float:
        """Units per second over this run (tqdm's smoothed rate once it has one)."""
        fmt = self._bar.format_dict
        if fmt.get("rate"):
            return float(fmt["rate"])
        elapsed = float(fmt.get("elapsed") or 0.0)
        done = self.count - int(fmt.get("initial") or 0)
        return done / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        """Seconds left (NaN while unknown: no total, or nothing done yet)."""
        rate = self.rate
        if self.total is None or rate == 0:
            return float("nan")
        return max(self.total - self.count, 0) / rate

    def line(self) -> str:
        """The text of the progress line as it is drawn now."""
        return str(self._bar)

    def update(self, n: int = 1, extra: str | None = None) -> None:
        if extra is not None:
            self.extra = extra
            if self.enabled:
                self._bar.set_postfix_str(extra, refresh=False)
        if not self.enabled:
            self._count += n
            return
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
        if self._redirected:
            self._redirected = False
            _redirect_logging(False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
