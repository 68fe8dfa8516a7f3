from __future__ import annotations

import io

from peaknet_xtal.progress import Progress, format_seconds


def test_progress_reports_count_rate_and_eta():
    out = io.StringIO()
    with Progress(10, "frames", desc="find", stream=out, interval=0) as bar:
        for _ in range(4):
            bar.update(1, extra="hits 2")
    text = out.getvalue()
    assert "find: 4/10 frames" in text and "40.0%" in text
    assert "frames/s" in text and "ETA" in text and "hits 2" in text


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
    assert [line.split(" frames")[0] for line in lines] == ["1/3", "2/3", "3/3"]
    out = io.StringIO()
    with Progress(3, "frames", stream=out, interval=1e9) as bar:  # no update draws
        for _ in range(3):
            bar.update(1)
    assert [line.split(" frames")[0] for line in out.getvalue().splitlines()] == ["3/3"]
