"""peaknet-distill's command line: a bad teacher or label file is one line naming it, Ctrl-C keeps
the checkpoints, files from two detectors train, and the command line is recorded as typed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peaknet_test_support import load_script

from peaknet_xtal.cli.distill import main
from peaknet_xtal.model import create_model, save_model
from peaknet_xtal.model.weights_io import WEIGHTS_DIR
from peaknet_xtal.training import data as data_module
from peaknet_xtal.training import distill as distill_module
from peaknet_xtal.training.checkpoint import latest_checkpoint

torch.set_num_threads(1)
LABELS = load_script(Path(__file__).resolve().parents[1] / "training" / "conftest.py",
                     "training_label_files")
TRAIN_TESTS = load_script(Path(__file__).resolve().parent / "test_train.py", "train_cli_tests")


def _run_folder(tmp_path: Path, **changes: Any) -> Path:
    """A tiny distillation (yocto teacher and student, crop 32, 6 steps) as CONFIG.yaml."""
    torch.manual_seed(7)
    teacher = save_model(create_model("yocto", neck_blocks=1), tmp_path / "teacher.safetensors")
    labels = LABELS.write_label_file(tmp_path / "labels.h5")
    config = {"out": str(tmp_path / "run"), "teacher": str(teacher), "threads": 1,
              "model": {"name": "yocto", "overrides": {"neck_blocks": 1}},
              "data": {"paths": [str(labels)], "crop": 32},
              "optim": {"batch_size": 2, "lr": 3e-3}, "schedule": {"steps": 6, "warmup": 1},
              "checkpoint": {"every": 2}, "log_every": 1, "seed": 1, **changes}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _bad_teacher(tmp_path: Path, kind: str) -> Path:
    good = tmp_path / "teacher.safetensors"
    bad = tmp_path / "bad" / "teacher.safetensors"
    bad.parent.mkdir()
    if kind == "missing":
        return tmp_path / "nope.safetensors"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[:1000])
    elif kind == "pickle":
        torch.save({"weight": torch.zeros(3)}, bad)
    elif kind == "other family":
        return WEIGHTS_DIR / "integrator_default.safetensors"
    elif kind == "other size":  # weights of another size under the teacher's config
        save_model(create_model("zepto"), bad)
        bad.with_suffix(".json").write_text(good.with_suffix(".json").read_text())
    return bad


@pytest.mark.parametrize(("kind", "says"), [
    ("missing", "model weights not found"), ("truncated", "not a readable safetensors file"),
    ("pickle", "not a readable safetensors file"), ("other family", "unknown model family"),
    ("other size", "weights do not fit the config")])
def test_a_bad_teacher_is_an_error_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             kind: str, says: str) -> None:
    config = _run_folder(tmp_path)
    teacher = _bad_teacher(tmp_path, kind)
    assert main([str(config), "--teacher", str(teacher)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("peaknet-distill: error:")]
    assert len(errors) == 1
    assert str(teacher) in errors[0] and says in errors[0]
    assert not (tmp_path / "run" / "teacher_logits.h5").exists()


@pytest.mark.parametrize("kind", ["missing", "cxi"])
def test_a_bad_label_file_is_an_error_naming_it(tmp_path: Path, sim_run,
                                                capsys: pytest.CaptureFixture[str],
                                                kind: str) -> None:
    config = _run_folder(tmp_path)
    labels = tmp_path / "nope.h5" if kind == "missing" else sim_run.cxi
    assert main([str(config), "--data.paths", str(labels)]) == 1
    err = capsys.readouterr().err
    assert f"peaknet-distill: error: {labels}" in err
    assert "Traceback" not in err


def test_no_teacher_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _run_folder(tmp_path, teacher=None)
    with pytest.raises(SystemExit) as info:
        main([str(config)])
    assert info.value.code == 2
    assert "no teacher" in capsys.readouterr().err


def test_ctrl_c_exits_130_keeps_the_checkpoints_and_a_rerun_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = _run_folder(tmp_path)
    real_loss, calls = distill_module.distill_batch_loss, []

    def interrupted_at_step_5(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:  # one micro-batch a step
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(distill_module, "distill_batch_loss", interrupted_at_step_5)
    assert main([str(config)]) == 130
    err = capsys.readouterr().err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert "Traceback" not in err
    kept = latest_checkpoint(checkpoints)
    assert kept is not None and kept.name == "step_000004"
    cache = tmp_path / "run" / "teacher_logits.h5"
    assert err.strip().splitlines()[-1] == (
        f"peaknet-distill: interrupted; checkpoint {kept} and the teacher-logits cache {cache} "
        "are kept; rerun the same command to resume from them")
    monkeypatch.setattr(distill_module, "distill_batch_loss", real_loss)
    assert main([str(config)]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_sigterm_exits_143_with_one_line_and_a_rerun_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A batch scheduler's SIGTERM killed the run with 143 and no word of what was kept.  A
    real signal to this process, at step 5: were the command not to handle it, the handler
    installed here fails the test (Python's default would end the test session)."""
    config = _run_folder(tmp_path)
    real_loss, calls = distill_module.distill_batch_loss, []

    def unhandled(signum: int, frame: Any) -> None:
        raise AssertionError("peaknet-distill left SIGTERM unhandled")

    def terminated_at_step_5(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:  # one micro-batch a step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        monkeypatch.setattr(distill_module, "distill_batch_loss", terminated_at_step_5)
        assert main([str(config)]) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # given back after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    kept = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert kept is not None and kept.name == "step_000004" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"peaknet-distill: interrupted (SIGTERM); checkpoint {kept} and the teacher-logits cache "
        f"{tmp_path / 'run' / 'teacher_logits.h5'} are kept; rerun the same command to resume "
        "from them")
    monkeypatch.setattr(distill_module, "distill_batch_loss", real_loss)
    assert main([str(config)]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_sigterm_before_the_settings_are_read_is_one_line_exit_143(tmp_path: Path) -> None:
    """The stop handler came only after the settings were read: a SIGTERM in the first
    seconds (torch imported, the settings read) ended the run with no line."""
    returncode, err = TRAIN_TESTS.sigterm_while_starting("peaknet_xtal.cli.distill",
                                                         str(tmp_path / "a.yaml"))
    assert returncode == 143, err
    lines = [line for line in err.splitlines() if line.startswith("peaknet-distill: ")]
    assert "Traceback" not in err and lines == [err.strip().splitlines()[-1]], err
    assert lines[0] == ("peaknet-distill: interrupted (SIGTERM); stopped before the settings "
                        "were read: nothing was done")
    assert not any(tmp_path.iterdir())


def test_label_files_from_two_detectors_train(tmp_path: Path) -> None:
    config = _run_folder(tmp_path)
    other = LABELS.write_label_file(tmp_path / "other.h5", n=2, shape=(40, 100), seed=3)
    assert main([str(config), "--data.paths", str(tmp_path / "labels.h5"), str(other),
                 "--schedule.steps", "2"]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_the_console_script_records_its_command_line(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The console script calls main() with no arguments: the record holds sys.argv's."""
    config = _run_folder(tmp_path)
    typed = [str(config), "--schedule.steps", "2", "--threads", "1"]
    monkeypatch.setattr(sys, "argv", ["peaknet-distill", *typed])
    assert main() == 0
    recorded = json.loads((tmp_path / "run" / "distill_config.json").read_text())
    assert recorded["argv"] == typed
    assert recorded["config_file"] == str(config.resolve())
    assert recorded["config"]["schedule"]["steps"] == 2


def test_a_rerun_of_another_run_is_refused_before_its_record_is_touched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder holds one run: another learning rate into it is one error naming the
    difference, and the earlier run's record and checkpoints stay as they were."""
    config = _run_folder(tmp_path)
    assert main([str(config), "--schedule.steps", "2"]) == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    other = yaml.safe_load(config.read_text())
    other["optim"]["lr"] = 0.01
    config.write_text(yaml.safe_dump(other))
    assert main([str(config), "--schedule.steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "optim.lr" in err and "0.003" in err and "0.01" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resumed_run_with_a_retrained_teacher_at_the_same_path_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same command, but the teacher's weights changed under its path: resuming would go on
    training the student against another teacher's logits; refused, naming the change."""
    config = _run_folder(tmp_path)
    assert main([str(config), "--stop-after", "2"]) == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    torch.manual_seed(8)  # retrained: same architecture, other weights, same path
    save_model(create_model("yocto", neck_blocks=1), tmp_path / "teacher.safetensors")
    capsys.readouterr()
    assert main([str(config)]) == 1
    err = capsys.readouterr().err
    assert "other teacher logits (the teacher's weights changed)" in err
    # no advice to rerun the same command: it would be refused again
    assert "rerun the same command" not in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_diverging_distillation_stops_with_one_line_and_installs_no_student(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e12 ended "successfully" with a student of NaN weights; .inf was taken as a setting."""
    config = _run_folder(tmp_path, optim={"batch_size": 2, "lr": 1e12})
    assert main([str(config)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("peaknet-distill: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("peaknet-distill: error: training diverged at step ")
    assert "Lower optim.lr (now 1e+12)" in errors[0]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    history = (tmp_path / "run" / "history.jsonl").read_text()
    assert "NaN" not in history and json.loads(history.splitlines()[-1])["loss"] is None
    capsys.readouterr()
    config = _run_folder(tmp_path, optim={"batch_size": 2, "lr": float("inf")},
                         out=str(tmp_path / "inf"))
    with pytest.raises(SystemExit) as stop:
        main([str(config)])
    assert stop.value.code == 2
    assert "optim.lr: must be a finite number > 0 (got inf)" in capsys.readouterr().err
    assert not (tmp_path / "inf").exists()


def test_a_student_crop_wider_than_the_frames_trains(tmp_path: Path) -> None:
    """Frames narrower than the crop make tiles that are not square: a quarter turn gave a
    tile another shape than its batch-mates, and the run ended in a collation traceback."""
    config = _run_folder(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["data"]["crop"] = 76  # the frames are 72 x 80: tiles of 72 x 76
    settings["schedule"]["steps"] = 3
    config.write_text(yaml.safe_dump(settings))
    assert main([str(config)]) == 0
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("whose", ["student", "teacher"])
def test_a_crop_the_student_or_the_teacher_does_not_take_is_one_line_before_the_teacher_runs(
        install_plugin, tmp_path: Path, capsys: pytest.CaptureFixture[str], whose: str) -> None:
    """Found by a plugin author: a ``data.crop`` that is not a multiple of a plugin model's
    ``pad_multiple`` failed deep in a forward pass with a torch shape error: the student's in
    its first step, the teacher's during its pass over the label files.  Now either is one
    usage line naming the setting, its value, the model, the multiple and the nearest crops,
    before the teacher runs and before the run folder is made."""
    from peaknet_test_support import halving_family, unchecked_weights

    install_plugin("halving", halving_family(2, pad_multiple=2))
    data = {"paths": [str(tmp_path / "labels.h5")], "crop": 33}
    if whose == "student":
        config = _run_folder(tmp_path, model={"name": "my-halving"}, data=data)
        what = "model 'my-halving'"
    else:  # a PeakNet student (yocto) takes 33-px crops: it pads them inside forward
        teacher = unchecked_weights("halving", "my-halving", tmp_path / "halving")
        config = _run_folder(tmp_path, teacher=str(teacher), data=data)
        what = f"the teacher {teacher}"
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("peaknet-distill: ")] == [
        f"peaknet-distill: error: {config}: data.crop: 33 does not suit {what}: its input "
        "sides must be multiples of 2 (its pad_multiple; model(image (1, 1, 33, 33), mask) "
        "returned (1, 2, 32, 32)): use 32 or 34"], err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def _sigterm_at_call(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, call: int) -> None:
    """``owner.name`` sends this process a real SIGTERM at its ``call``-th call."""
    real, calls = getattr(owner, name), []

    def terminated(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, terminated)


@pytest.mark.parametrize("when", ["at the first step", "while the cache is written"])
def test_a_stop_before_the_first_checkpoint_keeps_the_teacher_cache_and_a_rerun_reuses_it(
        when: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], sigterm_handled: None) -> None:
    """Stopped at the first step, after the teacher pass (minutes on real data): the line said
    only "interrupted (SIGTERM)", as if nothing were kept.  Stopped after the teacher had seen
    every frame, while its cache was closed and put in place: the cache, and the whole teacher
    pass with it, was thrown away (minutes to hours on real data)."""
    config = _run_folder(tmp_path)
    cache = tmp_path / "run" / "teacher_logits.h5"
    if when == "at the first step":
        _sigterm_at_call(monkeypatch, distill_module, "distill_batch_loss", 1)
    else:
        TRAIN_TESTS.stop_while_written(monkeypatch, ".teacher_logits.h5.", signal.SIGTERM)
    assert main([str(config)]) == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and latest_checkpoint(tmp_path / "run" / "checkpoints") is None
    assert err.strip().splitlines()[-1] == (
        f"peaknet-distill: interrupted (SIGTERM); the teacher-logits cache {cache} is kept (no "
        "checkpoint was written yet); rerun the same command to train from it without running "
        "the teacher again")
    made = cache.stat()
    monkeypatch.undo()
    assert main([str(config), "--schedule.steps", "2"]) == 0
    now = cache.stat()  # not rebuilt: a rebuilt cache replaces the file
    assert (now.st_ino, now.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)


def test_a_stop_during_the_teacher_pass_says_nothing_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The cache is written whole or not at all: a stop inside the teacher pass keeps none, and
    the line says so rather than offering a resume."""
    config = _run_folder(tmp_path)
    _sigterm_at_call(monkeypatch, data_module.LabelFileSource, "frame", 2)
    assert main([str(config)]) == 143
    err = capsys.readouterr().err
    cache = tmp_path / "run" / "teacher_logits.h5"
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"peaknet-distill: interrupted (SIGTERM); the teacher-logits cache {cache} was not "
        "finished and no checkpoint was written: nothing is kept; rerun the same command to "
        "start again")
    assert not list((tmp_path / "run").glob("*teacher_logits.h5*"))


def test_sigterm_to_the_process_group_with_loader_workers_is_one_line_exit_143(
        tmp_path: Path) -> None:
    """A scheduler's SIGTERM reaches the data-loader workers as well: each died of it, and the
    run ended with torch's "DataLoader worker (pid ...) is killed by signal: Terminated"
    traceback (exit status 1 where that came first)."""
    config = _run_folder(tmp_path, schedule={"steps": 1_000_000, "warmup": 1},
                         data={"paths": [str(tmp_path / "labels.h5")], "crop": 32, "workers": 2})
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "peaknet_xtal.cli.distill", str(config)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)  # as timeout and Slurm send it: to the group
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("peaknet-distill: ")]
    assert lines == [err.strip().splitlines()[-1]], err
    assert lines[0].startswith(f"peaknet-distill: interrupted (SIGTERM); checkpoint {run}")
    assert lines[0].endswith(f"and the teacher-logits cache {run / 'teacher_logits.h5'} are "
                             "kept; rerun the same command to resume from them")


@pytest.fixture
def sigterm_handled():
    """While a test runs, a SIGTERM that peaknet-distill leaves unhandled fails it (Python's
    default would end the test session)."""
    def unhandled(signum: int, frame: Any) -> None:
        raise AssertionError("peaknet-distill left SIGTERM unhandled")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_while_a_checkpoint_is_written_keeps_it_and_a_rerun_resumes_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        sigterm_handled: None) -> None:
    """A stop during the first checkpoint's write threw it away (a .part folder left, the line
    saying only the cache was kept, the rerun starting at step 0)."""
    config = _run_folder(tmp_path)
    TRAIN_TESTS.stop_while_written(monkeypatch, ".step_000002.part", signal.SIGTERM)
    assert main([str(config)]) == 143
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"peaknet-distill: interrupted (SIGTERM); checkpoint {run / 'checkpoints' / 'step_000002'}"
        f" and the teacher-logits cache {run / 'teacher_logits.h5'} are kept; rerun the same "
        "command to resume from them")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002"]
    monkeypatch.undo()
    assert main([str(config)]) == 0
    assert "; this run: 4 steps (resumed at step 2) in " in capsys.readouterr().out


def test_the_summary_says_steps_final_loss_and_time_and_no_progress_drops_both_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stdout was the student's path alone; and no switch turned the progress lines off."""
    config = _run_folder(tmp_path)
    run = tmp_path / "run"
    assert main([str(config), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "teacher logits: " not in captured.err and "train rank 0: " not in captured.err
    loss = [json.loads(line) for line in (run / "history.jsonl").open()][-1]["loss"]
    summary = captured.out.splitlines()
    assert re.fullmatch(
        rf"peaknet-distill: step 6 of 6, loss {loss:.4g} at step 6; this run: 6 steps in "
        rf"\d\d:\d\d -> {re.escape(str(run / 'model.safetensors'))}", summary[0]), summary
    assert summary[1] == f"  loss curve: {run / 'loss.png'}; history: {run / 'history.jsonl'}"
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
