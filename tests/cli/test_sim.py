"""peaknet-sim's command line: its configuration is validated before anything is simulated, bad
input is one line naming the file or setting, and an earlier run is never half replaced."""
from __future__ import annotations

import json

import pytest

from peaknet_xtal.cli.sim import main
from peaknet_xtal.sim.output import read_truth

RUN_FILES = ("sim.cxi", "sim.geom", "sim_truth.h5", "sim.stream", "sim_config.json")


def test_config_file_typo_is_an_error_naming_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("seeed: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["-g", "x.geom", "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "sim.yaml" in err and "'seeed'" in err and "'seed'" in err
    assert not (tmp_path / "out").exists()


def test_wrong_type_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("frames: ten\n")
    with pytest.raises(SystemExit):
        main(["-g", "x.geom", "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert "sim.yaml: frames:" in capsys.readouterr().err


def test_a_misspelt_frames_key_is_pointed_to_it(tmp_path, capsys):
    """The trial: `frames: 3`, the option's name, was refused as "did you mean 'name'?" (the key
    was `n`)."""
    cfg = tmp_path / "sim.yaml"
    cfg.write_text("frame: 3\n")
    with pytest.raises(SystemExit):
        main(["-g", "x.geom", "-o", str(tmp_path / "out"), "--config", str(cfg)])
    assert "unknown setting 'frame' (did you mean 'frames'?)" in capsys.readouterr().err


@pytest.fixture
def small_geom(tmp_path, make_geometry_text):
    """One 64x48 panel: a frame simulates in a fraction of a second."""
    path = tmp_path / "small.geom"
    path.write_text(make_geometry_text(["p0"], 64, 48, [(-32.0, -24.0)], clen="0.05 m"))
    return path


@pytest.mark.parametrize("kind", ["missing", "folder", "binary"])
def test_a_bad_geometry_is_one_line_naming_it(kind, tmp_path, capsys):
    """The user trial: `-g cspad` (no such file), a folder, a binary file were tracebacks."""
    geom = {"missing": tmp_path / "cspad", "folder": tmp_path,
            "binary": tmp_path / "detector.geom"}[kind]
    if kind == "binary":
        geom.write_bytes(bytes(range(256)) * 4)
    out = tmp_path / "out"
    assert main(["-g", str(geom), "-n", "1", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"peaknet-sim: error: {geom}: "), err
    assert not out.exists()


@pytest.mark.parametrize("setting, expect", [
    ("cel: lysozyme", "unknown setting 'sim.cel' (did you mean 'sim.cell'?)"),
    ("b_factor: abc", "sim.b_factor: Input should be a valid number"),
    ("hit_probability: 1.5", "sim.hit_probability: must be in [0, 1] (got 1.5)"),
    ("spot_sigma_px: 0", "sim.spot_sigma_px: must be > 0 (got 0)"),
    ("incident_photons: .inf", "sim.incident_photons: Input should be a finite number"),
    ("cell: lyso", "sim.cell: unknown preset cell 'lyso'"),
    ("cell: {a: 79, b: 79}", "sim.cell: not a unit cell"),
    ("adu_per_photon: -2", "sim.adu_per_photon: must be > 0 (got -2)"),
])
def test_sim_settings_are_checked_before_anything_is_written(setting, expect, tmp_path,
                                                             small_geom, capsys):
    """Every SimConfig field is known, typed and ranged: a wrong one is the usage error naming
    the file and setting (was: a traceback, `b_factor: abc` deep inside the first frame)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"sim:\n  {setting}\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["-g", str(small_geom), "-n", "1", "-o", str(out), "--config", str(cfg)])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"peaknet-sim: error: {cfg}: ") and expect in last, last
    assert not out.exists()


@pytest.mark.parametrize("frames", ["-1", "0"])
def test_a_run_needs_a_frame(frames, tmp_path, small_geom, capsys):
    """`-n -1` wrote a 0-frame run and exited 0."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["-g", str(small_geom), "-n", frames, "-o", str(out)])
    assert stop.value.code == 2
    assert f"--frames: must be >= 1 (got {frames})" in capsys.readouterr().err
    assert not out.exists()


def _contents(out):
    return {name: (out / name).read_bytes() for name in RUN_FILES if (out / name).exists()}


def test_an_earlier_run_is_replaced_only_with_overwrite_and_only_when_complete(
        tmp_path, small_geom, make_geometry_text, capsys):
    """The user trial: a second run silently replaced the first (another detector's too), and a
    run that failed on its settings rewrote sim_config.json beside the earlier sim.cxi."""
    out = tmp_path / "out"
    assert main(["-g", str(small_geom), "-n", "2", "--seed", "1", "-o", str(out)]) == 0
    first = _contents(out)
    assert set(first) == set(RUN_FILES)
    other = tmp_path / "other.geom"
    other.write_text(make_geometry_text(["q0"], 40, 40, [(-20.0, -20.0)]))
    capsys.readouterr()

    assert main(["-g", str(other), "-n", "1", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run named 'sim'" in err[0]
    assert "--overwrite" in err[0]
    assert _contents(out) == first

    bad = tmp_path / "bad.yaml"
    bad.write_text("sim:\n  b_factor: abc\n")
    with pytest.raises(SystemExit):
        main(["-g", str(other), "-n", "1", "-o", str(out), "--overwrite", "--config", str(bad)])
    assert _contents(out) == first

    assert main(["-g", str(other), "-n", "1", "--seed", "7", "-o", str(out), "--overwrite",
                 "--no-stream"]) == 0
    assert "replaced the earlier run 'sim'" in capsys.readouterr().err
    now = _contents(out)
    assert "sim.stream" not in now  # the earlier run's stream would describe other frames
    assert now["sim.cxi"] != first["sim.cxi"] and now["sim.geom"] != first["sim.geom"]
    recorded = json.loads(now["sim_config.json"])["config"]
    assert recorded["seed"] == 7 and recorded["geometry"] == str(other)
    assert recorded["sim"]["b_factor"] == 20.0  # every setting the run used is recorded
    assert sorted(p.name for p in out.iterdir()) == sorted(now)  # no staging folder left


def test_an_output_that_is_a_file_is_refused(tmp_path, small_geom, capsys):
    out = tmp_path / "taken"
    out.write_text("mine")
    assert main(["-g", str(small_geom), "-n", "1", "-o", str(out)]) == 1
    assert f"peaknet-sim: error: {out}: the output must be a folder" in capsys.readouterr().err
    assert out.read_text() == "mine"


def test_frames_in_a_config_file_the_counts_said_and_no_progress(tmp_path, small_geom, capsys):
    """The trial: a config file's `frames: 3` was refused, stdout listed the files but not what
    they hold, and no switch turned the progress line off."""
    out = tmp_path / "out"
    assert main(["-g", str(small_geom), "-n", "2", "--seed", "4", "-o", str(out)]) == 0
    assert "peaknet-sim: 0/2 frames" in capsys.readouterr().err  # the progress line
    cfg = tmp_path / "run.yaml"
    cfg.write_text("frames: 5\nseed: 3\nsim: {hit_probability: 0.5}\n")
    assert main(["-g", str(small_geom), "-o", str(out), "--config", str(cfg), "--overwrite",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"peaknet-sim: replaced the earlier run 'sim' in {out}"]
    frames = read_truth(out / "sim_truth.h5")["frames"]
    hits, strong = int(frames["hit"].sum()), int(frames["n_strong"].sum())
    assert len(frames) == 5 and 0 < hits < 5 and strong > 0  # the counts below are not trivial
    assert captured.out.splitlines()[0] == (
        f"peaknet-sim: 5 frames (seeds 3-7), {hits} hits, {strong} strong peaks "
        f"({strong / hits:.0f} per hit)")
    assert captured.out.splitlines()[1:] == [
        f"{kind}: {out / name}" for kind, name in (("cxi", "sim.cxi"), ("geom", "sim.geom"),
                                                   ("truth", "sim_truth.h5"),
                                                   ("stream", "sim.stream"),
                                                   ("config", "sim_config.json"))]
    recorded = json.loads((out / "sim_config.json").read_text())["config"]
    assert recorded["frames"] == 5 and recorded["progress"] is False
