from __future__ import annotations

import io
import math
import time

from peaknet_xtal.progress import Progress, format_seconds


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
