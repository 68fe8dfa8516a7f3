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
