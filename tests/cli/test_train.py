"""peaknet-train's command line: a run folder holds one run, every setting is checked before any
work, and every user error is one line (no traceback) naming the file or setting.

Runs are tiny (a yocto model, 32-px crops, a few steps on a real HDF5 label file of random
frames); what the model learns is tested in tests/training/test_trainer.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from peaknet_test_support import signalled_when
from safetensors.torch import load_file

from peaknet_xtal import atomic
from peaknet_xtal.cli.train import main


@pytest.fixture
def labels(tmp_path: Path) -> Path:
    """A stream2labels-layout file: 4 frames of noise with a few labelled bright pixels."""
    rng = np.random.default_rng(0)
    images = rng.poisson(20.0, (4, 40, 48)).astype(np.float32)
    peaks = rng.random((4, 40, 48)) < 0.01
    images[peaks] += 500.0
    path = tmp_path / "labels.h5"
    with h5py.File(path, "w") as handle:
        handle["images"] = images
        handle["masks"] = np.ones(images.shape, np.uint8)
        handle["labels"] = peaks.astype(np.uint8)
    return path


def settings(labels: Path, **changes: object) -> dict:
    config: dict = {
        "threads": 1, "model": {"name": "yocto", "overrides": {"neck_blocks": 1}},
        "data": {"source": "labels", "paths": [str(labels)], "crop": 32},
        "optim": {"batch_size": 2, "lr": 0.003},
        "schedule": {"steps": 4, "warmup": 1}, "checkpoint": {"every": 2}, "log_every": 1,
    }
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("peaknet-train: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def signalled_after_a_checkpoint(command: list[str], out: Path,
                                 signum: int) -> tuple[int, str]:
    """Run ``command`` (a training into ``out``) as a real process, send it ``signum`` once its
    first checkpoint exists, and return its exit status and stderr."""
    return signalled_when(command, (out / "checkpoints" / "latest").exists, signum)


@pytest.fixture
def finished_run(tmp_path: Path, labels: Path, capsys) -> Path:
    out = tmp_path / "run"
    assert main([str(write(tmp_path / "run.yaml", settings(labels))), "--out", str(out)]) == 0
    capsys.readouterr()
    return out


@pytest.mark.parametrize("change, expect", [
    ({"optim.lr": 0.01}, "optim.lr: 0.003 in the run, 0.01 now"),
    ({"schedule.steps": 8}, "schedule.steps: 4 in the run, 8 now"),
    ({"model.name": "zepto", "model.overrides": {}},
     'model.name: "yocto" in the run, "zepto" now; model.overrides.neck_blocks: 1 in the run, '
     "(not set) now"),
    ({"data.augment": {"noise": 0.9}}, "data.augment.noise: (not set) in the run, 0.9 now"),
])
def test_a_rerun_with_other_settings_is_refused_leaving_the_folder_as_it_was(
        finished_run: Path, labels: Path, tmp_path: Path, capsys, change, expect) -> None:
    """A different config used to resume the run there (at its last step, training nothing,
    exit 0, the record overwritten), use the old lr while recording the new, or end in a
    175-line state_dict traceback for another architecture."""
    before = snapshot(finished_run)
    other = write(tmp_path / "other.yaml", settings(labels, **change))
    assert main([str(other), "--out", str(finished_run)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"peaknet-train: error: {finished_run}: holds another run "
                           "(step_000004) made with other settings: ")
    assert expect in line and "choose another --out" in line
    assert snapshot(finished_run) == before  # the earlier run's record included


def test_a_rerun_may_change_where_and_how_fast_it_runs(labels: Path, tmp_path: Path) -> None:
    """Threads, workers, logging and checkpoint cadence, stop_after and the folder's own path
    do not change what is learnt: the moved run resumes, and trains on to its end."""
    first = tmp_path / "first"
    cfg = write(tmp_path / "run.yaml", settings(labels))
    assert main([str(cfg), "--out", str(first), "--stop-after", "2"]) == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    config = settings(labels, threads=2, log_every=3, **{"checkpoint.every": 3,
                                                         "checkpoint.keep": 1,
                                                         "data.workers": 1})
    assert main([str(write(tmp_path / "same.yaml", config)), "--out", str(moved)]) == 0
    assert (moved / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert json.loads((moved / "train_config.json").read_text())["config"]["threads"] == 2


def test_checkpoints_and_resume_false_is_refused(finished_run: Path, labels: Path,
                                                 tmp_path: Path, capsys) -> None:
    """Starting afresh beside a run's checkpoints would mix the two runs' steps (and pruning
    would delete the new ones)."""
    before = snapshot(finished_run)
    config = settings(labels, **{"checkpoint.resume": False})
    assert main([str(write(tmp_path / "fresh.yaml", config)), "--out", str(finished_run)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint.resume is false" in line and str(finished_run) in line
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("change, expect", [
    ({"optim.accum": 0}, "optim.accum: must be >= 1 (got 0)"),
    ({"schedule.steps": -5}, "schedule.steps: must be >= 1 (got -5)"),
    ({"optim.batch_size": 0}, "optim.batch_size: must be >= 1 (got 0)"),
    ({"data.crop": 0}, "data.crop: must be >= 1 (got 0)"),
    ({"checkpoint.every": 0}, "checkpoint.every: must be >= 1 (got 0)"),
    ({"precision": "fp16"}, "precision: must be one of auto, bf16, fp32"),
    ({"device": "gpu"}, "device: must be auto, cpu, cuda or cuda:N"),
    ({"model.name": "yoctoo"}, "model.name: must be one of atto, "),
    ({"data.source": "lables"}, "data.source: must be one of sim, labels"),
    ({"data.augment": {"gian": [1, 2]}},
     "unknown setting 'data.augment.gian' (did you mean 'data.augment.gain'?)"),
    ({"data.sim": {"gian": [1, 40]}},
     "unknown setting 'data.sim.gian' (did you mean 'data.sim.gain'?)"),
    ({"data.sim": {"randomise": "maybe"}}, "data.sim.randomise: Input should be a valid boolean"),
    ({"data.sim": {"config": {"read_nosie": 1}}},
     "unknown setting 'data.sim.config.read_nosie' (did you mean 'data.sim.config.read_noise'?)"),
    ({"data.sim": {"config": {"b_factor": "high"}}}, "data.sim.config.b_factor: Input should be"),
    ({"data.sim": {"config": {"b_factor": -5}}}, "data.sim.config.b_factor: must be >= 0"),
    ({"data.sim": {"config": {"hit_probability": 2}}},
     "data.sim.config.hit_probability: must be in [0, 1]"),
    ({"data.source": "sim"}, "data.sim.geometries: give at least one CrystFEL geometry file"),
    ({"model.overrides": {"neck_blokcs": 1}}, "model.overrides {'neck_blokcs': 1}: "),
    # infinity is no learning rate (it was taken: a model of NaN, exit 0), nor any other number
    ({"optim.lr": float("inf")}, "optim.lr: must be a finite number > 0 (got inf)"),
    ({"optim.clip": float("inf")}, "optim.clip: must be a finite number > 0 (got inf)"),
    ({"loss": {"gamma": float("inf")}}, "loss.gamma: must be a finite number >= 0 (got inf)"),
    ({"data.augment": {"noise": float("nan")}},
     "data.augment.noise: must be a finite number (got nan)"),
    # true/false is no count (steps: true trained one step)
    ({"schedule.steps": True}, "schedule.steps: must be a whole number, not true/false"),
    ({"optim.lr": True}, "optim.lr: must be a number, not true/false"),
])
def test_a_setting_out_of_range_or_unknown_is_one_usage_line_before_any_work(
        labels: Path, tmp_path: Path, capsys, change, expect) -> None:
    """Each of these trained nothing and wrote an untrained model with exit 0, trained silently
    with another setting, was ignored, or ended in a traceback."""
    cfg = write(tmp_path / "bad.yaml", settings(labels, **change))
    with pytest.raises(SystemExit) as stop:
        main([str(cfg), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"peaknet-train: error: {cfg}: ")
    assert expect in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("start", ["model.name", "model.init"])
def test_a_crop_the_model_does_not_take_is_one_usage_line_before_any_data_are_read(
        install_plugin, tmp_path: Path, capsys, start) -> None:
    """Found by a plugin author: ``data.crop: 33`` for a plugin model of ``pad_multiple = 2``
    failed in the first step's forward pass with a torch shape error, after the data were
    loaded.  Now it is one usage line naming the setting, its value, the model, the multiple
    and the nearest crops, before any data are read (the label file here does not exist: a
    reader would have said so)."""
    from peaknet_test_support import halving_family, unchecked_weights

    install_plugin("halving", halving_family(2, pad_multiple=2))
    model: dict = {"name": "my-halving"}
    what = "model 'my-halving'"
    if start == "model.init":
        init = unchecked_weights("halving", "my-halving", tmp_path / "init")
        model, what = {"init": str(init)}, f"{what} (model.init {init})"
    cfg = write(tmp_path / "crop.yaml", settings(tmp_path / "no-labels.h5", model=model,
                                                 **{"data.crop": 33}))
    with pytest.raises(SystemExit) as stop:
        main([str(cfg), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"peaknet-train: error: {cfg}: data.crop: 33 does not suit {what}: its input sides "
        "must be multiples of 2 (its pad_multiple; model(image (1, 1, 33, 33), mask) returned "
        "(1, 2, 32, 32)): use 32 or 34")
    assert not (tmp_path / "out").exists()


def test_two_config_files_are_a_usage_error(labels: Path, tmp_path: Path, capsys) -> None:
    """``peaknet-train A.yaml --config B.yaml`` silently trained with B."""
    first = write(tmp_path / "a.yaml", settings(labels))
    second = write(tmp_path / "b.yaml", settings(labels, **{"optim.lr": 0.01}))
    with pytest.raises(SystemExit) as stop:
        main([str(first), "--config", str(second), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "two config files" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_bad_files_are_one_line_errors_naming_them(finished_run: Path, labels: Path,
                                                   tmp_path: Path, capsys) -> None:
    cfg = write(tmp_path / "run.yaml", settings(labels))
    # --out naming an existing file (was FileExistsError)
    assert main([str(cfg), "--out", str(cfg)]) == 1
    assert one_error_line(capsys.readouterr().err).endswith(
        f"{cfg}: is a file, not a folder: out (--out) names the run's folder")
    # a data file given as the config (was UnicodeDecodeError)
    binary = tmp_path / "frames.cxi"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(SystemExit) as stop:
        main([str(binary)])
    assert stop.value.code == 2
    assert f"{binary}: not a text file" in capsys.readouterr().err.splitlines()[-1]
    # fine-tuning weights of another architecture than the overrides make (was a traceback)
    init = settings(labels, **{"model.init": str(finished_run / "model.safetensors"),
                               "model.overrides": {"neck_blocks": 3}})
    out = tmp_path / "tuned"
    assert main([str(write(tmp_path / "init.yaml", init)), "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{finished_run / 'model.safetensors'}: weights of another architecture" in line
    assert not out.exists()
    # a checkpoint holding weights of another architecture (was 175 lines of state_dict)
    other = tmp_path / "zepto"
    assert main([str(write(tmp_path / "z.yaml", settings(labels, **{
        "model.name": "zepto", "model.overrides": {}}))), "--out", str(other)]) == 0
    latest = finished_run / "checkpoints" / "step_000004" / "model.safetensors"
    latest.write_bytes((other / "checkpoints" / "step_000004" / "model.safetensors").read_bytes())
    capsys.readouterr()
    assert main([str(cfg), "--out", str(finished_run)]) == 1
    assert f"{latest}: weights of another architecture than this run's model" in \
        one_error_line(capsys.readouterr().err)


def test_a_damaged_label_file_is_one_line_naming_it(labels: Path, tmp_path: Path,
                                                    capsys) -> None:
    """A chunk that cannot be decompressed was an h5py OSError traceback mid-training."""
    damaged = tmp_path / "damaged.h5"
    with h5py.File(labels) as source, h5py.File(damaged, "w") as handle:
        for name in ("images", "masks", "labels"):
            handle.create_dataset(name, data=source[name][()], chunks=(1, 40, 48),
                                  compression="gzip")
        info = handle["images"].id.get_chunk_info(1)
    data = bytearray(damaged.read_bytes())
    data[info.byte_offset:info.byte_offset + info.size] = b"\x55" * info.size
    damaged.write_bytes(bytes(data))
    cfg = write(tmp_path / "run.yaml", settings(labels, **{"data.paths": [str(damaged)]}))
    assert main([str(cfg), "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"{damaged}, dataset images: frame 1 cannot be read" in line


def test_the_record_keeps_the_command_line_and_the_config_file(labels: Path, tmp_path: Path,
                                                               monkeypatch, capsys) -> None:
    """From the console script (main(None)) argv was recorded as [] and the file not at all."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "run.yaml", settings(labels))
    monkeypatch.setattr(sys, "argv", ["peaknet-train", "run.yaml", "--out", "out"])
    assert main() == 0
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["argv"] == ["run.yaml", "--out", "out"]
    assert saved["config_file"] == str(tmp_path / "run.yaml")
    assert saved["cwd"] == str(tmp_path)


def test_ctrl_c_is_one_line_exit_130_keeping_the_checkpoints(labels: Path,
                                                             tmp_path: Path) -> None:
    """A real SIGINT to a real process: it was a KeyboardInterrupt traceback."""
    cfg = write(tmp_path / "long.yaml", settings(labels, **{"schedule.steps": 1_000_000}))
    out = tmp_path / "out"
    returncode, err = signalled_after_a_checkpoint(
        [sys.executable, "-m", "peaknet_xtal.cli.train", str(cfg), "--out", str(out)], out,
        signal.SIGINT)
    assert returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert last.startswith("peaknet-train: interrupted; rerun the same command to resume from")
    assert latest in last


def test_a_key_given_twice_is_one_usage_line_naming_it(labels: Path, tmp_path: Path,
                                                       capsys) -> None:
    """YAML kept the last value silently: the run trained with seed 5, the file began seed 0."""
    cfg = write(tmp_path / "dup.yaml", settings(labels))
    cfg.write_text("seed: 0\n" + cfg.read_text() + "seed: 5\n")
    with pytest.raises(SystemExit) as stop:
        main([str(cfg), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"peaknet-train: error: {cfg}, line ")
    assert "duplicate key 'seed' (first at line 1)" in last
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_with_one_line_and_installs_no_model(
        labels: Path, tmp_path: Path, capsys) -> None:
    """lr 1e12 finished with "loss nan", exit 0, a model of NaN and history lines of bare NaN."""
    cfg = write(tmp_path / "huge.yaml", settings(labels, **{"optim.lr": 1e12,
                                                            "checkpoint.every": 1}))
    out = tmp_path / "out"
    assert main([str(cfg), "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("peaknet-train: error: training diverged at step 2 of 4: the loss "
                           "is nan")
    assert f"its last good checkpoint {out / 'checkpoints' / 'step_000001'} is kept" in line
    assert "Lower optim.lr (now 1e+12)" in line and "no final model was written" in line
    assert not (out / "model.safetensors").exists()
    for weights in out.glob("checkpoints/step_*/model.safetensors"):  # every one left is good
        assert all(bool(t.isfinite().all()) for t in load_file(str(weights)).values())
    history = (out / "history.jsonl").read_text().splitlines()
    assert history and "NaN" not in (out / "history.jsonl").read_text()
    assert all(isinstance(json.loads(h), dict) for h in history)
    assert json.loads(history[-1])["loss"] is None


def test_a_rerun_after_a_label_file_was_replaced_under_its_name_is_refused(
        labels: Path, tmp_path: Path, capsys) -> None:
    """Another detector's labels copied over the file between --stop-after and the rerun: the
    run resumed at its step and trained one model on two data sets, exit 0.  The rerun is
    refused naming the file and what changed; a new folder starts over on the new file."""
    cfg = write(tmp_path / "run.yaml", settings(labels))
    out = tmp_path / "run"
    assert main([str(cfg), "--out", str(out), "--stop-after", "2"]) == 0
    before = snapshot(out)
    with h5py.File(labels, "w") as handle:  # another detector: other frames, another size
        handle["images"] = np.full((2, 56, 64), 30.0, np.float32)
        handle["masks"] = np.ones((2, 56, 64), np.uint8)
        handle["labels"] = np.zeros((2, 56, 64), np.uint8)
    capsys.readouterr()
    assert main([str(cfg), "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"peaknet-train: error: {out}: holds a run (step_000002) trained on "
                           f"other data: label file {labels.resolve()} changed (size ")
    assert " bytes, modified " in line and "choose another --out" in line
    assert snapshot(out) == before
    assert main([str(cfg), "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "model.safetensors").exists()


def test_model_name_must_be_the_init_models_and_a_left_out_name_records_it(
        finished_run: Path, labels: Path, tmp_path: Path, capsys) -> None:
    """``model: {name: zepto, init: <a yocto run>}`` trained a yocto while train_config.json
    said zepto.  A name naming another architecture is a usage error naming both; a name left
    out (at its default) becomes the init's in the record, and such a run resumes."""
    init = str(finished_run / "model.safetensors")
    wrong = write(tmp_path / "wrong.yaml", settings(labels, **{
        "model": {"name": "zepto", "init": init}}))
    with pytest.raises(SystemExit) as stop:
        main([str(wrong), "--out", str(tmp_path / "wrong")])
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (f"peaknet-train: error: {wrong}: model.name: 'zepto', but model.init {init} "
                    "is a 'yocto' model and fine-tuning trains its architecture: name 'yocto' "
                    "or leave model.name out, or drop model.init to train a new 'zepto'")
    assert not (tmp_path / "wrong").exists()
    tuned = tmp_path / "tuned"
    left_out = write(tmp_path / "tuned.yaml", settings(labels, **{"model": {"init": init}}))
    assert main([str(left_out), "--out", str(tuned), "--stop-after", "2"]) == 0
    recorded = json.loads((tuned / "train_config.json").read_text())["config"]["model"]
    assert recorded == {"name": "yocto", "init": init, "overrides": {}}
    assert main([str(left_out), "--out", str(tuned)]) == 0  # the same command resumes
    assert json.loads((tuned / "model.json").read_text())["name"] == "yocto"
    named = write(tmp_path / "named.yaml", settings(labels, **{
        "model": {"name": "yocto", "init": init}}))
    assert main([str(named), "--out", str(tmp_path / "named"), "--stop-after", "1"]) == 0


def test_sigterm_is_one_line_exit_143_and_the_same_command_resumes(labels: Path,
                                                                    tmp_path: Path) -> None:
    """What a batch scheduler sends at the end of a job's time: the run died with 143 and no
    word of what was kept."""
    cfg = write(tmp_path / "long.yaml", settings(labels, **{"schedule.steps": 1_000_000}))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "peaknet_xtal.cli.train", str(cfg), "--out", str(out)]
    returncode, err = signalled_after_a_checkpoint(command, out, signal.SIGTERM)
    assert returncode == 143, err
    assert "Traceback" not in err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert err.strip().splitlines()[-1] == (
        "peaknet-train: interrupted (SIGTERM); rerun the same command to resume from "
        f"{out / 'checkpoints' / latest}")
    step = int(latest.split("_")[1])
    resumed = subprocess.run([*command, "--stop-after", str(step + 2)], capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / latest} at step {step}" in resumed.stderr
    history = [json.loads(line)["step"] for line in (out / "history.jsonl").open()]
    assert history == list(range(1, step + 3))


def signalled_as_a_group(command: list[str], out: Path, signum: int) -> tuple[int, str]:
    """Run ``command`` as a real process in its own process group and, once its first
    checkpoint exists, send ``signum`` to the whole group, as ``timeout``, Slurm and a terminal
    do: its data-loader workers get it too.  Its exit status and stderr."""
    return signalled_when(command, (out / "checkpoints" / "latest").exists, signum, group=True)


def test_sigterm_to_the_process_group_with_loader_workers_is_one_line_exit_143(
        labels: Path, tmp_path: Path) -> None:
    """A scheduler's SIGTERM reaches the data-loader workers as well: each died of it, and the
    run ended with torch's "DataLoader worker (pid ...) is killed by signal: Terminated"
    traceback (exit status 1 where that came first)."""
    cfg = write(tmp_path / "long.yaml", settings(labels, **{"schedule.steps": 1_000_000,
                                                             "data.workers": 2}))
    out = tmp_path / "out"
    returncode, err = signalled_as_a_group(
        [sys.executable, "-m", "peaknet_xtal.cli.train", str(cfg), "--out", str(out)], out,
        signal.SIGTERM)
    assert returncode == 143, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("peaknet-train: ")]
    assert lines == [err.strip().splitlines()[-1]], err
    assert lines[0].startswith(
        "peaknet-train: interrupted (SIGTERM); rerun the same command to resume from "
        f"{out / 'checkpoints'}/step_")


#: Runs a command's ``main`` with its reading of the settings slowed (after a line on stdout
#: saying it has begun), so that a signal lands before the run has read its settings.
SLOW_START = """
import sys, time
import {module} as cli
read = cli.parse_training_args
def slow(*args, **kwargs):
    print("reading settings", flush=True)
    time.sleep(60)
    return read(*args, **kwargs)
cli.parse_training_args = slow
raise SystemExit(cli.main(sys.argv[1:]))
"""


def sigterm_while_starting(module: str, *args: str) -> tuple[int, str]:
    """Exit status and stderr of ``module``'s main, run as a real process, after a SIGTERM
    while it reads its settings (before any work: torch imported, settings read)."""
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_START.format(module=module), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "reading settings\n"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, err


def test_sigterm_before_the_settings_are_read_is_one_line_exit_143(tmp_path: Path) -> None:
    """The stop handler came only after torch was imported and the settings read: a SIGTERM
    in those first seconds ended the run as Python's default does, with no line."""
    returncode, err = sigterm_while_starting("peaknet_xtal.cli.train", str(tmp_path / "a.yaml"))
    assert returncode == 143, err
    assert one_error_line(err) == err.strip().splitlines()[-1] == (
        "peaknet-train: interrupted (SIGTERM); stopped before the settings were read: nothing "
        "was done")
    assert not any(tmp_path.iterdir())


def stop_while_written(monkeypatch: pytest.MonkeyPatch, part: str, signum: int) -> None:
    """A real ``signum`` to this process while the file or folder ``part`` (a checkpoint's
    ``.step_NNNNNN.part``, a cache's ``.NAME.``) is written: at the flush of its first file to
    the disk, as a Ctrl-C or a scheduler's stop lands in a long write."""
    real, sent = atomic._fsync, []

    def fsync(path: Path) -> None:
        if part in str(path) and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        real(path)

    monkeypatch.setattr(atomic, "_fsync", fsync)


def test_a_ctrl_c_while_a_checkpoint_is_written_keeps_it_and_the_rerun_resumes_from_it(
        labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The user trial: Ctrl-C during the first checkpoint's write said "no checkpoint was
    written yet", left checkpoints/.step_000010.part, and the rerun began again at step 0 (for
    a large model up to checkpoint.every steps lost).  The write finishes, the line names it,
    and the same command resumes from it."""
    cfg = write(tmp_path / "run.yaml", settings(labels))
    out = tmp_path / "out"
    stop_while_written(monkeypatch, ".step_000002.part", signal.SIGINT)
    assert main([str(cfg), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    kept = out / "checkpoints" / "step_000002"
    assert one_error_line(err) == err.strip().splitlines()[-1] == (
        f"peaknet-train: interrupted; rerun the same command to resume from {kept}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"  # a stopped run has its curve
    monkeypatch.undo()
    assert main([str(cfg), "--out", str(out)]) == 0
    assert "; this run: 2 steps (resumed at step 2) in " in capsys.readouterr().out


def test_the_summary_and_the_loss_curve_cover_the_whole_run(labels: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys) -> None:
    """The trial: stdout was the model's path alone, and no picture of the loss.  The last
    lines say the step, the final loss (the history's), this run's steps and time and the
    model; OUT/loss.png is drawn from the history, so a resumed run's curve shows every step.
    --no-progress drops the progress line (a rerun may change it)."""
    from peaknet_xtal.training import plots

    cfg = write(tmp_path / "run.yaml", settings(labels))
    out = tmp_path / "out"
    drawn: list[list[int]] = []
    real = plots.loss_figure

    def spy(entries, title):
        drawn.append([e["step"] for e in entries])
        return real(entries, title)

    monkeypatch.setattr(plots, "loss_figure", spy)
    assert main([str(cfg), "--out", str(out), "--stop-after", "2"]) == 0
    first = capsys.readouterr()
    assert "train rank 0: " in first.err
    history = [json.loads(line) for line in (out / "history.jsonl").open()]
    assert re.fullmatch(
        rf"peaknet-train: step 2 of 4, loss {history[-1]['loss']:.4g} at step 2; this run: 2 "
        rf"steps in \d\d:\d\d -> {re.escape(str(out / 'checkpoints' / 'step_000002'))}",
        first.out.splitlines()[0]), first.out
    assert main([str(cfg), "--out", str(out), "--no-progress"]) == 0
    second = capsys.readouterr()
    assert "train rank 0: " not in second.err
    history = [json.loads(line) for line in (out / "history.jsonl").open()]
    summary = second.out.splitlines()
    assert re.fullmatch(
        rf"peaknet-train: step 4 of 4, loss {history[-1]['loss']:.4g} at step 4; this run: 2 "
        rf"steps \(resumed at step 2\) in \d\d:\d\d -> "
        rf"{re.escape(str(out / 'model.safetensors'))}", summary[0]), summary
    assert summary[1] == f"  loss curve: {out / 'loss.png'}; history: {out / 'history.jsonl'}"
    assert drawn[-1] == [1, 2, 3, 4]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_loss_curve_that_cannot_be_drawn_is_one_warning_and_the_run_goes_on(
        labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from peaknet_xtal.training import plots

    def broken(*args: object) -> None:
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(plots, "loss_figure", broken)
    cfg = write(tmp_path / "run.yaml", settings(labels))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main([str(cfg), "--out", str(out)]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "no fonts here" in said[0] and "loss.png" in said[0], said
    assert (out / "model.safetensors").exists() and not (out / "loss.png").exists()
