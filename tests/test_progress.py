from __future__ import annotations

import io
import logging
import math
import sys
import threading
import time

import pytest

from peaknet_xtal.progress import Progress, count_within, format_seconds


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_reports_count_rate_and_eta():
    out = io.StringIO()
    with Progress(10, "frames", desc="find", stream=out, interval=0) as bar:
        for _ in range(4):
            time.sleep(0.002)
            bar.update(1, extra="hits 2")
        assert bar.count == 4 and bar.rate > 0
        assert 0 < bar.eta < math.inf
    text = out.getvalue()
    assert "find: 4/10 frames" in text and "40.0%" in text
    assert "frames/s" in text and "ETA" in text and "hits 2" in text


def test_logs_get_whole_lines_not_redraws():
    out = io.StringIO()
    with Progress(3, "frames", stream=out, interval=0) as bar:
        for _ in range(3):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("0/3 frames") and any(ln.startswith("3/3 frames") for ln in lines)


def test_interval_limits_how_often_a_log_line_is_written():
    out = io.StringIO()
    with Progress(1000, "frames", stream=out, interval=3600) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first line, then the final one at close
    assert lines[-1].startswith("1000/1000 frames")


def test_a_log_record_between_progress_lines_starts_its_own_line():
    """A warning logged mid-run to the same stream (stderr to a file) was glued onto the end of
    the last progress line, the newline coming before the next progress line instead."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("peaknet_xtal.test_progress")
    log.addHandler(handler)
    try:
        with Progress(3, "frames", stream=out, interval=0) as bar:
            bar.update(1)
            log.warning("a panel looks odd")
            bar.update(2)
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert "WARNING peaknet_xtal.test_progress: a panel looks odd" in lines, lines
    assert [ln.split(" frames")[0] for ln in lines if "frames" in ln] == ["0/3", "1/3", "3/3"]
    assert all(ln.strip() for ln in lines), lines  # no blank line, at close or elsewhere


def _screen_lines(text: str) -> list[str]:
    """What a terminal shows of ``text``, line by line: "\r" returns to the line's start and
    what follows overwrites it."""
    shown = []
    for raw in text.split("\n"):
        row: list[str] = []
        for part in raw.split("\r"):
            row[:len(part)] = part
        shown.append("".join(row).rstrip())
    return shown


def _terminal_logging(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeTerminal, logging.Handler]:
    """stderr a (fake) terminal, with console logging on it as ``setup_logging`` makes it.
    Called in the test itself: pytest puts its own stderr back after a fixture's setup."""
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    monkeypatch.setattr(logging.root, "handlers", [*logging.root.handlers, handler])
    return term, handler


def test_a_log_record_is_not_glued_onto_a_terminal_bar(monkeypatch):
    term, handler = _terminal_logging(monkeypatch)
    log = logging.getLogger("peaknet_xtal.test_progress")
    with Progress(5, "frames", desc="t", interval=0) as bar:
        bar.update(2)
        log.warning("a panel looks odd")
        bar.update(3)
    shown = _screen_lines(term.getvalue())
    assert "WARNING peaknet_xtal.test_progress: a panel looks odd" in shown, shown
    assert "5/5 frames" in shown[-2] and shown[-1] == ""  # the bar is drawn again below it
    assert handler in logging.root.handlers  # console logging is as it was once the bar closed


def test_bars_closed_in_any_order_leave_console_logging_as_it_was(monkeypatch):
    _, handler = _terminal_logging(monkeypatch)
    before = list(logging.root.handlers)
    first = Progress(2, "frames", desc="a", interval=0)
    second = Progress(2, "frames", desc="b", interval=0)
    assert handler not in logging.root.handlers  # redirected through tqdm while bars are open
    first.close()
    assert handler not in logging.root.handlers
    second.close()
    assert logging.root.handlers == before


def test_terminal_redraws_in_place():
    out = FakeTerminal()
    with Progress(5, "frames", desc="t", stream=out, interval=0) as bar:
        bar.update(5)
    assert "\r" in out.getvalue() and "5/5 frames" in out.getvalue()


def test_disabled_bar_is_silent_but_counts():
    out = io.StringIO()
    with Progress(5, "frames", stream=out, enabled=False) as bar:
        bar.update(3)
        assert bar.count == 3
    assert out.getvalue() == ""


def test_resumed_count_does_not_inflate_the_rate():
    out = io.StringIO()
    with Progress(1000, "steps", stream=out, interval=0, initial=900) as bar:  # a resumed run
        time.sleep(0.05)
        bar.update(1)
        assert bar.count == 901
        assert bar.rate < 100  # one step in >= 0.05 s, not 901
    assert "901/1000 steps" in out.getvalue()


def test_a_resumed_job_shows_its_start_from_the_first_line():
    """Set after the bar was made, the count came too late for the first line a log gets: a
    training run resumed at step 30 of 120 printed "0/120 steps" first, then jumped."""
    out = io.StringIO()
    with Progress(120, "steps", stream=out, interval=0, initial=30) as bar:
        assert bar.count == 30
        time.sleep(0.05)
        bar.update(1)
        assert bar.rate < 100  # one step done here, not 31
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("30/120 steps"), lines
    assert "31/120 steps" in out.getvalue()
    assert Progress(10, enabled=False, initial=4).count == 4


def test_unknown_total_shows_count_and_rate():
    out = io.StringIO()
    with Progress(None, "fits", stream=out, interval=0) as bar:
        bar.update(7)
        assert math.isnan(bar.eta)
    assert "7 fits" in out.getvalue() and "fits/s" in out.getvalue()


def test_format_seconds():
    assert format_seconds(65) == "01:05"
    assert format_seconds(3725) == "1:02:05"
    assert format_seconds(float("nan")) == "--:--"


def test_last_line_is_not_printed_twice_in_a_log():
    out = io.StringIO()  # not a terminal: one plain line per draw
    with Progress(3, "frames", stream=out, interval=0) as bar:
        for _ in range(3):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split(" frames")[0] for line in lines] == ["0/3", "1/3", "2/3", "3/3"]
    out = io.StringIO()
    with Progress(3, "frames", stream=out, interval=1e9) as bar:  # no update draws
        for _ in range(3):
            bar.update(1)
    assert [line.split(" frames")[0] for line in out.getvalue().splitlines()] == ["0/3", "3/3"]


def test_a_slow_rate_reads_as_units_per_second():
    """Slower than one frame a second, tqdm's default turns the rate over ("3.89s/ frames");
    the lines keep frames/s, as fast runs show it."""
    out = io.StringIO()
    with Progress(4, "frames", stream=out, interval=0) as bar:
        bar._bar.start_t -= 20.0  # as if the run had taken 20 s so far
        bar._bar.last_print_t -= 20.0
        bar.update(2)
    text = out.getvalue()
    assert "0.10 frames/s" in text and "s/ frames" not in text and "s/frames" not in text


class StepClock:
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_count_within_sums_every_input_in_time():
    assert count_within([3, 1, 2], lambda n: n, seconds=10, clock=StepClock(1.0)) == 6


def test_count_within_gives_no_total_where_an_input_cannot_say():
    asked: list[int] = []

    def count(n: int) -> int | None:
        asked.append(n)
        return None if n == 2 else n

    assert count_within([1, 2, 3], count, seconds=10, clock=StepClock(0.0)) is None
    assert asked == [1, 2]  # nothing more is opened once the total is lost


def test_count_within_stops_counting_past_its_time_and_says_so(caplog):
    asked: list[int] = []

    def count(n: int) -> int:
        asked.append(n)
        return 1

    with caplog.at_level(logging.INFO, logger="peaknet_xtal.progress"):
        total = count_within(list(range(1000)), count, seconds=2.0, clock=StepClock(0.5))
    assert total is None
    assert len(asked) < 10  # not 1,000 files opened before the first frame
    (record,) = caplog.records
    assert "frames of 1000 inputs" in record.getMessage()
    assert "shows no total" in record.getMessage()


def test_count_within_keeps_a_total_finished_on_its_last_input():
    # time runs out on the last input: every input was counted, so the total is whole
    assert count_within([5, 5], lambda n: n, seconds=1.0, clock=StepClock(0.8)) == 10


@pytest.mark.parametrize("tty", [False, True])
def test_a_stop_while_a_bar_is_built_leaves_no_traceback(monkeypatch, tty):
    """A Ctrl-C landing while a bar wrote its first line left a half-built tqdm, whose
    ``__del__`` printed "Exception ignored ... no attribute 'last_print_t'" below the stop's one
    line (found by peaknet-eval's interrupt test)."""
    import gc

    class Stopping(io.StringIO):
        def isatty(self):
            return tty

        def flush(self):
            raise KeyboardInterrupt

    ignored: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with pytest.raises(KeyboardInterrupt) as stop:
        Progress(10, "frames", stream=Stopping(), interval=0)
    # tqdm's process-wide lock was let go: a bar drawn from another thread is not kept waiting
    # (tqdm's own refresh kept it; a Ray pipeline's driver thread later in the test run hung)
    drawn = threading.Thread(target=lambda: Progress(1, "frames", stream=io.StringIO()).close(),
                             daemon=True)
    drawn.start()
    drawn.join(timeout=10)
    assert not drawn.is_alive(), "tqdm's lock was left held"
    del stop
    gc.collect()
    assert not ignored, [getattr(u, "exc_value", u) for u in ignored]
