"""A dependency-free progress line: count, rate (frames/s) and ETA, on stderr.

It redraws in place on a terminal and prints a plain line at most every ``interval`` seconds
otherwise (so CI and batch logs stay readable).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or inf
        return "--:--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


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
    ) -> None:
        self.total = total
        self.unit = unit
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.enabled = enabled
        self.count = 0
        self.extra = ""
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn_count: int | None = None

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.count / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float:
        if self.total is None or self.rate == 0:
            return float("nan")
        return max(self.total - self.count, 0) / self.rate

    def line(self) -> str:
        done = f"{self.count}/{self.total}" if self.total is not None else f"{self.count}"
        pct = f" {100 * self.count / self.total:5.1f}%" if self.total else ""
        text = (f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}{pct} | "
                f"{self.rate:.2f} {self.unit}/s | ETA {format_seconds(self.eta)}")
        return text + (f" | {self.extra}" if self.extra else "")

    def update(self, n: int = 1, extra: str | None = None) -> None:
        self.count += n
        if extra is not None:
            self.extra = extra
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw >= self.interval):
            self._draw()
            self._last_draw = now

    def _draw(self, final: bool = False) -> None:
        self._drawn_count = self.count
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        # on a terminal the final draw ends the line in place; in a log, a line already showing
        # the last count is not printed twice
        if self.enabled and (self.tty or self._drawn_count != self.count):
            self._draw(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
