"""Many stills in parallel: ``dials.stills_process mp.nproc=2`` with PeakNet spot finding runs the
stills in two worker processes at the same time (``dials.find_spots`` on a list of stills does
not: each still is its own imageset)."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from peaknet_xtal.evaluation.dials_commands import (
    dials_environment,
    run_dials,
    stills_process_status,
)

pytestmark = [pytest.mark.dials, pytest.mark.slow]


def spans(debug: Path) -> dict[str, tuple[str, datetime, datetime]]:
    """Per image: (debug file = worker rank, spot-finding start, end) from stills_process's
    debug logs (lines ``host,image,2026-12-01T22:11Z22.932,done?,status``)."""
    out: dict[str, tuple[str, datetime, datetime]] = {}
    for log in sorted(debug.glob("*.txt")):
        for line in log.read_text().splitlines():
            host, image, stamp, _, status = [f.strip() for f in line.split(",")][:5]
            when = datetime.strptime(stamp, "%Y-%m-%dT%H:%MZ%S.%f")
            if status == "spotfind_start":
                out[image] = (log.name, when, when)
            elif status.startswith("spotfinding_ok") and image in out:
                out[image] = (out[image][0], out[image][1], when)
    return out


def test_stills_process_nproc_2_finds_spots_in_two_processes_at_once(real_data, dials_env,
                                                                     tmp_path):
    stills = sorted((real_data / "cspad_thermolysin_stills").glob("*.cbf"))
    assert len(stills) == 2
    run_dials("stills_process", *map(str, stills), "dispatch.index=False",
              "spotfinder.threshold.algorithm=peaknet", "mp.nproc=2",
              "mp.method=multiprocessing", "spotfinder.threshold.peaknet.device=cpu",
              f"output.output_dir={tmp_path}", "output.strong_filename=%s_strong.refl",
              "output.composite_output=False", cwd=tmp_path, env=dials_environment(dials_env))
    # the README's command: one strong-spot table per still (DIALS writes none by default)
    assert sorted(p.name for p in tmp_path.glob("*_strong.refl")) == [
        f"idx-{s.stem}_strong.refl" for s in stills]
    status = stills_process_status(tmp_path / "debug")
    assert sorted(status) == sorted(s.stem for s in stills)
    assert all(s.startswith("spotfinding_ok_") and int(s.rsplit("_", 1)[1]) > 20
               for s in status.values())
    found = spans(tmp_path / "debug")
    (rank_a, start_a, end_a), (rank_b, start_b, end_b) = found.values()
    assert rank_a != rank_b  # two worker processes ...
    assert start_a < end_b and start_b < end_a  # ... finding spots at the same time
