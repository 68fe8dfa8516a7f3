from __future__ import annotations

import json

import pytest

from peaknet_xtal import config
from peaknet_xtal.errors import FormatError

DEFAULTS = {"threshold": 0.5, "optim": {"lr": 1e-3, "wd": 0.05}, "device": "auto"}


def parse(argv):
    parser = config.cli_parser("doc")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--optim.lr", dest="optim.lr", type=float)
    return parser.parse_args(argv)


def test_defaults_apply_when_nothing_is_given():
    assert config.resolve(DEFAULTS, parse([])) == DEFAULTS


def test_command_line_beats_config_file_beats_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("threshold: 0.7\noptim:\n  lr: 0.01\ndevice: cpu\n")
    resolved = config.resolve(DEFAULTS, parse(["--config", str(cfg), "--optim.lr", "0.5"]))
    assert resolved["threshold"] == 0.7  # file over default
    assert resolved["optim"] == {"lr": 0.5, "wd": 0.05}  # command line over file, nested merge
    assert resolved["device"] == "cpu"


def test_bad_config_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("threshold: [1, 2\n")
    with pytest.raises(FormatError, match="bad.yaml"):
        config.resolve(DEFAULTS, parse(["--config", str(bad)]))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(FormatError, match="mapping"):
        config.load_config_file(listy)


def test_record_saves_the_resolved_configuration(tmp_path, monkeypatch):
    """With the package's version: a run record named the model's digest but not the code that
    made the run (a packaging trial)."""
    import peaknet_xtal

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(peaknet_xtal, "__version__", "9.8.7")
    out = tmp_path / "sub" / "config.json"
    config.record({"a": 1}, out, "peaknet-test", ["--a", "1"])
    saved = json.loads(out.read_text())
    assert saved == {"command": "peaknet-test", "version": "9.8.7", "argv": ["--a", "1"],
                     "cwd": str(tmp_path), "config_file": None, "config": {"a": 1}}


def test_record_takes_the_process_arguments_and_the_config_file(tmp_path, monkeypatch):
    """A console script calls main(None): argv is then the process's own, not ``[]``; the config
    file is saved as an absolute path, whether given with --config or to ``record`` itself."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["peaknet-test", "in.cxi", "--config", "run.yaml", "-v"])
    out = tmp_path / "config.json"
    config.record({"a": 1}, out, "peaknet-test", None)
    saved = json.loads(out.read_text())
    assert saved["argv"] == ["in.cxi", "--config", "run.yaml", "-v"]
    assert saved["config_file"] == str(tmp_path / "run.yaml")
    config.record({"a": 1}, out, "peaknet-test", ["--config=other.yaml"])
    assert json.loads(out.read_text())["config_file"] == str(tmp_path / "other.yaml")
    config.record({"a": 1}, out, "peaknet-test", ["train.yaml"], config_file="train.yaml")
    assert json.loads(out.read_text())["config_file"] == str(tmp_path / "train.yaml")
    config.record({"a": 1}, out, "peaknet-test", ["--config"])  # no value: nothing to record
    assert json.loads(out.read_text())["config_file"] is None


def test_what_a_run_chose_goes_beside_its_configuration_never_into_it(tmp_path, caplog):
    """The threads a run used where none were given go under ``used``: the configuration keeps
    ``threads: null`` (the machine chose).  A record gone since is one warning, not an error
    (the run's outputs stand)."""
    out = tmp_path / "config.json"
    config.record({"threads": None}, out, "peaknet-test", [])
    config.add_to_record(out, {"threads": 2})
    config.add_to_record(out, {"workers": 3})
    saved = json.loads(out.read_text())
    assert saved["config"] == {"threads": None}
    assert saved["used"] == {"threads": 2, "workers": 3}
    out.unlink()
    caplog.clear()  # the record's own configuration line, where an earlier test left INFO on
    with caplog.at_level("WARNING"):
        config.add_to_record(out, {"threads": 2})
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "threads 2" in caplog.text and str(out) in caplog.text and not out.exists()


def test_unknown_key_in_a_config_file_is_an_error_naming_file_and_key(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("threshhold: 0.9\n")
    with pytest.raises(config.ConfigError, match=r"typo\.yaml.*'threshhold'.*'threshold'"):
        config.resolve(DEFAULTS, parse(["--config", str(cfg)]))
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"nested\.yaml.*'optim\.learning_rate'"):
        config.resolve(DEFAULTS, parse(["--config", str(nested)]))


def test_wrong_type_is_an_error_naming_file_and_key(tmp_path):
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text("optim:\n  lr: fast\n")
    with pytest.raises(config.ConfigError, match=r"wrong\.yaml.*optim\.lr.*'fast'"):
        config.resolve(DEFAULTS, parse(["--config", str(cfg)]))
    section = tmp_path / "section.yaml"
    section.write_text("optim: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"section\.yaml.*optim"):
        config.resolve(DEFAULTS, parse(["--config", str(section)]))


def test_error_from_the_command_line_names_the_command_line():
    with pytest.raises(config.ConfigError, match=r"^command line: .*'colour'"):
        config.resolve(DEFAULTS, {"colour": "red"})


def test_values_are_coerced_to_the_defaults_types(tmp_path):
    cfg = tmp_path / "ints.yaml"
    cfg.write_text("threshold: 1\n")  # an int where a float is expected is fine, and becomes one
    resolved = config.resolve(DEFAULTS, parse(["--config", str(cfg)]))
    assert resolved["threshold"] == 1.0 and isinstance(resolved["threshold"], float)


def test_null_in_a_config_file_overrides_a_default(tmp_path):
    defaults = {"max_peaks": 2048, "section": {"limit": 5}}
    cfg = tmp_path / "none.yaml"
    cfg.write_text("max_peaks: null\nsection: {limit: null}\n")
    types = {"max_peaks": int | None, "section.limit": int | None}
    resolved = config.resolve(defaults, {"config": str(cfg)}, types=types)
    assert resolved == {"max_peaks": None, "section": {"limit": None}}
    # without a declared type, a null where the default is an int is a wrong type
    with pytest.raises(config.ConfigError, match="max_peaks"):
        config.resolve(defaults, {"config": str(cfg)})


def test_declared_types_check_settings_whose_default_is_none(tmp_path):
    defaults = {"geometry": None, "threads": None}
    types = {"geometry": str | None, "threads": int | None}
    assert config.resolve(defaults, {"threads": 3}, types=types) == {"geometry": None,
                                                                     "threads": 3}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("threads: [1]\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml.*threads"):
        config.resolve(defaults, {"config": str(cfg)}, types=types)


def test_empty_sections_stay_open_for_their_consumer():
    defaults = {"sim": {}, "flag": False}
    resolved = config.resolve(defaults, {"sim": {"cell": "lysozyme", "b_factor": 30}})
    assert resolved["sim"] == {"cell": "lysozyme", "b_factor": 30}
    with pytest.raises(config.ConfigError, match="flag"):
        config.resolve(defaults, {"flag": "yes"})  # switches are strict booleans


@pytest.mark.parametrize("command, argv", [
    ("peaknet2cxi", ["x.cxi"]), ("sim", []), ("eval", ["x", "-o", "out"]), ("show", ["x"]),
    ("integrate", ["x.cxi"]), ("stream2labels", ["x.stream", "-o", "out"]),
    ("train", []), ("distill", []),
])
def test_every_command_turns_a_misspelt_setting_into_a_usage_error(command, argv, tmp_path,
                                                                   capsys):
    """Exit status 2 with the file and the key named, before any work: no traceback."""
    import importlib

    bad = tmp_path / "run.yaml"
    bad.write_text("threshhold: 0.9\n")
    main = importlib.import_module(f"peaknet_xtal.cli.{command}").main
    args = [str(bad)] if command in ("train", "distill") else [*argv, "--config", str(bad)]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and "'threshhold'" in err


def test_bounded_settings_state_their_whole_range(tmp_path):
    """A value outside its range names the file and key and the range, both ends; NaN is
    outside every range; ``optional`` lets ``null`` through."""
    defaults = {"threshold": 0.5, "frames": 10, "cap": 5}
    types = {"threshold": config.bounded(float, gt=0, le=1), "frames": config.bounded(int, ge=1),
             "cap": config.bounded(int, ge=1, optional=True)}
    cfg = tmp_path / "range.yaml"
    for text, expect in (("threshold: 1.5", r"threshold: must be in \(0, 1\] \(got 1\.5\)"),
                         ("threshold: 0", r"threshold: must be in \(0, 1\] \(got 0\)"),
                         ("threshold: .nan", r"threshold: must be in \(0, 1\] \(got nan\)"),
                         ("frames: 0", r"frames: must be >= 1 \(got 0\)"),
                         ("cap: -3", r"cap: must be >= 1 \(got -3\)")):
        cfg.write_text(text + "\n")
        with pytest.raises(config.ConfigError, match=rf"^{tmp_path}/range\.yaml: {expect}$"):
            config.resolve(defaults, {"config": str(cfg)}, types=types)
    cfg.write_text("threshold: 1\nframes: 1\ncap: null\n")
    assert config.resolve(defaults, {"config": str(cfg)}, types=types) == {
        "threshold": 1.0, "frames": 1, "cap": None}
    with pytest.raises(config.ConfigError, match=r"frames: Input should be a valid integer"):
        config.resolve(defaults, {"frames": "many"}, types=types)  # a wrong type stays one


def test_a_command_line_value_is_named_by_its_option(tmp_path, capsys):
    parser = config.cli_parser("doc")
    parser.add_argument("--min-snr", dest="min_snr", type=float)
    defaults = {"min_snr": 3.0}
    types = {"min_snr": config.bounded(float, ge=0)}
    with pytest.raises(SystemExit) as stop:
        config.resolve_or_exit(parser, defaults, parser.parse_args(["--min-snr", "-3"]),
                               types=types)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: command line: --min-snr: must be >= 0 (got -3.0)")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("min_snr: -1\n")  # in a file, the key the file holds
    with pytest.raises(SystemExit):
        config.resolve_or_exit(parser, defaults, parser.parse_args(["--config", str(cfg)]),
                               types=types)
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: {cfg}: min_snr: must be >= 0 (got -1)")


def test_a_binary_file_given_as_config_names_it(tmp_path):
    data = tmp_path / "frames.cxi"
    data.write_bytes(b"\x89HDF\r\n\x1a\n\x9f\xff\x00" * 20)
    with pytest.raises(FormatError, match=r"^.*frames\.cxi: not a text file") as info:
        config.load_config_file(data)
    assert "\n" not in str(info.value)


def test_two_config_files_are_an_error(tmp_path):
    """A command taking its config file as an argument (peaknet-train) and given --config too
    would have to pick one silently."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("threshold: 0.7\n")
    second.write_text("threshold: 0.9\n")
    with pytest.raises(config.ConfigError, match=r"^command line: two config files, .*a\.yaml "
                                                 r"and --config .*b\.yaml: give one$"):
        config.resolve(DEFAULTS, {"config": str(second)}, first)
    assert config.resolve(DEFAULTS, {}, first)["threshold"] == 0.7
    assert config.resolve(DEFAULTS, {"config": str(second)})["threshold"] == 0.9


def test_one_of_lists_the_allowed_names(tmp_path):
    names = ["yocto", "zepto"]
    types = {"precision": config.one_of(("auto", "bf16", "fp32")),
             "model": config.one_of(lambda: names)}  # looked up when checked
    defaults = {"precision": "auto", "model": "yocto"}
    cfg = tmp_path / "run.yaml"
    cfg.write_text("precision: fp16\n")
    with pytest.raises(config.ConfigError, match=rf"^{cfg}: precision: must be one of auto, "
                                                 r"bf16, fp32 \(did you mean 'bf16'\?\) "
                                                 r"\(got 'fp16'\)$"):
        config.resolve(defaults, {"config": str(cfg)}, types=types)
    names.append("atto")
    assert config.resolve(defaults, {"model": "atto"}, types=types)["model"] == "atto"
    with pytest.raises(config.ConfigError, match=r"model: must be one of yocto, zepto, atto"):
        config.resolve(defaults, {"model": "yoctoo"}, types=types)


@pytest.mark.parametrize("device, ok", [("auto", True), ("cpu", True), ("cuda", True),
                                        ("cuda:3", True), ("gpu", False), ("cuda:x", False),
                                        ("cuda:", False), ("CPU", False)])
def test_a_device_is_auto_cpu_cuda_or_a_gpu_index(device, ok):
    types = {"device": config.DEVICE}
    if ok:
        assert config.resolve({"device": "auto"}, {"device": device}, types=types) == {
            "device": device}
    else:
        with pytest.raises(config.ConfigError, match="device: must be auto, cpu, cuda or cuda:N"):
            config.resolve({"device": "auto"}, {"device": device}, types=types)


def test_fields_of_checks_keys_and_types_against_the_dataclass_and_keeps_only_those_given():
    import dataclasses

    @dataclasses.dataclass
    class Knobs:
        gain: tuple[float, float] = (1.0, 2.0)
        noise: float = 0.5
        flips: bool = True

    defaults = {"section": {}, "other": 1}
    types = {"section": config.fields_of(Knobs)}
    assert config.resolve(defaults, {}, types=types) == {"section": {}, "other": 1}
    assert config.resolve(defaults, {"section": {"noise": 1}}, types=types)["section"] == {
        "noise": 1.0}  # the others stay unset, for the consumer to fill or draw
    with pytest.raises(config.ConfigError,
                       match=r"unknown setting 'section\.gian' \(did you mean 'section\.gain'"):
        config.resolve(defaults, {"section": {"gian": [1, 2]}}, types=types)
    with pytest.raises(config.ConfigError, match=r"section\.flips: .*boolean.*'maybe'"):
        config.resolve(defaults, {"section": {"flips": "maybe"}}, types=types)
    with pytest.raises(TypeError, match="dataclass"):
        config.fields_of(dict)


def test_verbosity_matches_the_help(caplog):
    """-v: other libraries' messages too; -vv: debug (the help says so)."""
    import logging

    parser = config.cli_parser("doc")
    assert "-vv debug" in parser.format_help()
    root, ours = logging.getLogger(), logging.getLogger("peaknet_xtal")
    before = root.level, ours.level
    try:
        levels = {}
        for verbose in (0, 1, 2):
            config.setup_logging(verbose)
            levels[verbose] = (root.level, ours.level)
        assert levels == {0: (logging.WARNING, logging.INFO), 1: (logging.INFO, logging.INFO),
                          2: (logging.INFO, logging.DEBUG)}
    finally:
        root.setLevel(before[0])
        ours.setLevel(before[1])


def test_a_config_file_that_cannot_be_read_is_a_usage_error(tmp_path, capsys):
    parser = config.cli_parser("doc")
    for name, text in (("absent.yaml", None), ("broken.yaml", "threshold: [1, 2\n")):
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as stop:  # not a traceback
            config.resolve_or_exit(parser, DEFAULTS,
                                   parser.parse_args(["--config", str(tmp_path / name)]))
        assert stop.value.code == 2 and name in capsys.readouterr().err


@pytest.mark.parametrize("text, key, line", [
    ("seed: 0\noptim:\n  lr: 1\nseed: 5\n", "seed", 4),
    ("optim:\n  lr: 1\n  wd: 0\n  lr: 2\n", "lr", 4),
    ("optim: {lr: 1, lr: 2}\n", "lr", 1),
    ('{"threshold": 0.5, "threshold": 0.6}', "threshold", 1),
])
def test_a_key_given_twice_is_an_error_naming_key_file_and_line(tmp_path, text, key, line):
    """YAML keeps the last value without a word: ``seed: 0`` ... ``seed: 5`` ran with 5."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(FormatError, match=rf"dup.yaml, line {line}: duplicate key '{key}'"):
        config.load_config_file(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert config.load_config_file(path) == {"base": {"x": 1, "y": 2},
                                              "other": {"x": 3, "y": 2}}


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_infinity_is_no_setting_unless_its_range_says_so(value):
    """``lr: .inf`` (a ``gt=0`` range) trained a model of NaN with exit 0; a float setting with
    no declared range took it too."""
    import math

    defaults = {"lr": 1e-3, "gamma": 2.0, "chi_max": 5.0}
    types = {"lr": config.bounded(float, gt=0), "chi_max": config.bounded(float, gt=0,
                                                                         le=math.inf)}
    for key, says in (("lr", "lr: must be "), ("gamma", "gamma: must be a finite number")):
        with pytest.raises(config.ConfigError, match=says):
            config.resolve(defaults, {key: value}, types=types)
    if value == math.inf:  # a range that reaches infinity takes it ("no limit")
        assert config.resolve(defaults, {"chi_max": value}, types=types)["chi_max"] == value
    else:
        with pytest.raises(config.ConfigError, match="chi_max: must be"):
            config.resolve(defaults, {"chi_max": value}, types=types)


def test_an_infinite_value_is_told_it_must_be_finite(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(config.ConfigError,
                       match=r"run.yaml: optim.lr: must be a finite number > 0 \(got inf\)"):
        config.resolve(DEFAULTS, {"config": str(cfg)},
                       types={"optim.lr": config.bounded(float, gt=0)})


def test_true_or_false_is_no_number():
    """pydantic reads ``steps: true`` as 1: a run of one step, exit 0."""
    defaults = {"steps": 10, "lr": 0.1, "count": 3, "pair": [0.9, 0.95], "on": False}
    types = {"count": config.bounded(int, ge=1), "lr": config.bounded(float, gt=0)}
    for key, value, says in (("steps", True, "steps: must be a whole number, not true/false"),
                             ("count", True, "count: must be a whole number, not true/false"),
                             ("lr", False, "lr: must be a number, not true/false"),
                             ("pair", [True, 0.5], "pair: must be a number, not true/false")):
        with pytest.raises(config.ConfigError, match=says):
            config.resolve(defaults, {key: value}, types=types)
    resolved = config.resolve(defaults, {"steps": "4", "lr": 1, "count": 2, "on": True},
                              types=types)
    assert resolved == {"steps": 4, "lr": 1.0, "count": 2, "pair": [0.9, 0.95], "on": True}


@pytest.mark.parametrize("command, argv", [
    ("peaknet2cxi", ["x.cxi", "-o", "out"]), ("sim", ["-o", "out"]), ("eval", ["x", "-o", "out"]),
    ("show", ["x"]), ("integrate", ["x.cxi"]), ("stream2labels", ["x.stream", "-o", "out"]),
    ("train", ["run.yaml"]), ("distill", ["run.yaml"]),
])
def test_every_command_says_a_usage_error_in_one_line_and_guesses_no_option(command, argv,
                                                                           capsys):
    """A misspelt option was the last of a usage block (4-23 lines), and a misspelling that is
    a prefix of an option (``--no-progres``) ran as that option, exit status 0."""
    import importlib

    main = importlib.import_module(f"peaknet_xtal.cli.{command}").main
    for extra in (["--no-such-option"], ["--verb"]):  # --verb: a prefix of --verbose
        with pytest.raises(SystemExit) as stop:
            main([*argv, *extra])
        assert stop.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"peaknet-{command.removeprefix('peaknet-')}: error: "
                                   if command not in ("peaknet2cxi", "stream2labels")
                                   else f"{command}: error: "), lines[0]
        assert f"unrecognized arguments: {extra[0]}" in lines[0]


def test_a_commands_log_lines_say_when():
    """A batch job's log said what happened but not when (a user trial): each line now starts
    with the date and time.  In a fresh process, as a command starts its logging."""
    import re
    import subprocess
    import sys

    code = ("import logging; from peaknet_xtal.config import setup_logging; setup_logging(); "
            "logging.getLogger('peaknet_xtal.x').info('hello')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stderr
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO peaknet_xtal\.x: hello\n", err), err
