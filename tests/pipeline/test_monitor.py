"""pipeline/monitor.py: the progress line's rates in and out are averages over the last
RATE_WINDOW seconds, not over the last sample's second (frames come back a batch at a time)."""
from __future__ import annotations

import pytest

from peaknet_xtal.pipeline import monitor as monitor_module
from peaknet_xtal.pipeline.monitor import RATE_WINDOW, PipelineMonitor


def test_rates_average_over_the_window_not_the_last_second(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(monitor_module.time, "perf_counter", lambda: clock[0])
    watch = PipelineMonitor(120, progress=False)
    queue = {"put": 120, "acked": 0, "depth": 0, "in_flight": 0, "capacity": 3200}
    rates = []
    for second in range(1, 81):  # all 120 frames queued at once; 8 come back every 10 s
        clock[0] = 100.0 + second
        queue["acked"] = 8 * (second // 10)
        rates.append(watch.sample(dict(queue), [])["out_per_s"])
    assert rates[-1] == pytest.approx(0.8, rel=0.15)  # 8 frames every 10 s
    assert max(rates[int(RATE_WINDOW):]) < 1.2  # never a batch a second (8/s) once averaged
    first = watch.sample(dict(queue), [])
    assert first["in_per_s"] == 0.0  # the inputs were all queued long before the window
