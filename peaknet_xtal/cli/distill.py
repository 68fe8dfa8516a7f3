"""peaknet-distill: distil a teacher PeakNet into a small student, from a YAML config.

    peaknet-distill CONFIG.yaml [--out DIR] [--teacher MODEL] [--schedule.steps N]
                    [--stop-after STEP] [--no-progress]

The teacher runs once over the frames of the label files (data.paths) and its logits are cached
(HDF5, OUT/teacher_logits.h5 unless `cache` is set); the student (model.name) is then trained on
0.4 MSE(logits) + 0.4 T^2 KL(T=2) + 0.2 focal(the labels).  The cache is rebuilt when the
teacher's weights, a label file or the crop change, and `cache` must not name any other file.
Label files may come from detectors of different frame shapes.  Reruns resume from the latest
checkpoint; one whose settings, teacher or label files changed is refused, naming what changed.
As peaknet-train: OUT/checkpoints, OUT/model.safetensors (+ .json), OUT/history.jsonl (the loss
every log_every steps), OUT/loss.png (the loss and learning rate against the step, the whole
run's, redrawn at every checkpoint and as the run ends), OUT/distill_config.json (the record),
and last lines on stdout saying the step reached, the final loss, this run's steps and time and
the student's path.  --no-progress: no progress lines (teacher pass, training).
Ctrl-C stops with exit status 130 and SIGTERM (a batch scheduler's stop) with 143, each with one
line saying what is kept (the teacher-logits cache once complete, the latest checkpoint);
rerunning the same command resumes from them, without running the teacher again where the cache
is kept.  A stop that comes while a checkpoint or the finished cache is written lets the write
finish first (seconds), so that it is kept; a second Ctrl-C stops at once.  Example
configurations: examples/configs/distill_*.yaml in the source repository (not installed with
the package).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peaknet_xtal.config import ConfigError, record
from peaknet_xtal.errors import PeakNetError
from peaknet_xtal.stopping import exit_status, interrupted, sigterm_raises
from peaknet_xtal.training.cli_common import parse_training_args, training_parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    # a batch scheduler's SIGTERM stops the run as Ctrl-C does (Python's default died silently
    # with 143), so that it says what is kept; installed first, before torch is imported and
    # the settings read (a SIGTERM in those seconds died silently too)
    with sigterm_raises():
        try:
            from peaknet_xtal.training.distill import DISTILL_DEFAULTS, DISTILL_TYPES

            parser = training_parser(__doc__, prog="peaknet-distill")
            parser.add_argument("--teacher", dest="teacher")
            config = parse_training_args(parser, DISTILL_DEFAULTS, argv, DISTILL_TYPES)
            config_file = parser.parse_args(argv).config_file
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            return _interrupted(exc, None)
        if not config.get("teacher"):
            parser.error("no teacher: set 'teacher' in CONFIG.yaml or give --teacher MODEL")
        return _run(config, argv, config_file, started)


def _run(config: dict[str, Any], argv: list[str], config_file: str, started: float) -> int:
    """Check, record and distil; the exit status, with one line on stderr for a stop or error
    and the run's summary on stdout (``started``: when the command began, its
    ``time.monotonic()``)."""
    out = Path(config["out"])
    try:
        from peaknet_xtal.training.checkpoint import checkpoint_step
        from peaknet_xtal.training.cli_common import run_summary
        from peaknet_xtal.training.distill import (
            cache_key,
            check_same_teacher,
            check_teacher,
            distill,
        )
        from peaknet_xtal.training.trainer import (
            TrainingDiverged,
            check_start,
            resolve_model_name,
        )

        # a rerun of another run, or against another teacher, is refused before the run's
        # record is touched; and without the advice to rerun the same command, which would be
        # refused again
        config = resolve_model_name(config)  # the record names the architecture trained
        resumed_at = checkpoint_step(check_start(config))
        check_teacher(config["teacher"], int(config["data"]["crop"]))
        check_same_teacher(out, cache_key(config["teacher"], list(config["data"]["paths"]),
                                          int(config["data"]["crop"])))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        return _interrupted(exc, config)
    except ConfigError as exc:  # a setting refused by the checks above: a usage error naming
        print(f"peaknet-distill: error: {exc.path or config_file}: {exc.message}",  # its file
              file=sys.stderr)
        return 2
    except (PeakNetError, OSError) as exc:
        print(f"peaknet-distill: error: {exc}", file=sys.stderr)
        return 1
    try:
        record(config, out / "distill_config.json", "peaknet-distill", argv,
               config_file=config_file)
        final = distill(config)
    except KeyboardInterrupt as exc:
        return _interrupted(exc, config)
    except TrainingDiverged as exc:  # says itself what is kept, and not to rerun the same
        print(f"peaknet-distill: error: {exc}", file=sys.stderr)
        return 1
    except (PeakNetError, OSError) as exc:  # a bad teacher, label file or cache: one line
        kept = _what_is_kept(out)
        print(f"peaknet-distill: error: {exc}", file=sys.stderr)
        if kept:
            print(f"peaknet-distill: {kept}", file=sys.stderr)
        return 1
    print(run_summary("peaknet-distill", config, final, resumed_at, time.monotonic() - started))
    return 0


def _interrupted(exc: KeyboardInterrupt, config: dict[str, Any] | None) -> int:
    """One line for a run stopped by Ctrl-C or SIGTERM: which, what is kept and what a rerun
    does; the exit status a shell gives a process the signal ended (130, 143).  ``config``
    None: stopped before the settings were read, so before any work.

    Why the cache is named: the teacher pass over every frame is minutes of work, and a stop
    before the first checkpoint said only "interrupted", as if all of it were lost."""
    if config is None:
        print(f"peaknet-distill: {interrupted(exc)}; stopped before the settings were read: "
              "nothing was done", file=sys.stderr)
        return exit_status(exc)
    from peaknet_xtal.training.distill import cache_is_the_runs, cache_path

    out, cache = Path(config["out"]), cache_path(config)
    checkpoint = _latest(out)
    cached = cache_is_the_runs(cache, out)
    if checkpoint is not None and cached:
        kept = (f"checkpoint {checkpoint} and the teacher-logits cache {cache} are kept; rerun "
                "the same command to resume from them")
    elif checkpoint is not None:
        kept = f"checkpoint {checkpoint} is kept; rerun the same command to resume from it"
    elif cached:
        kept = (f"the teacher-logits cache {cache} is kept (no checkpoint was written yet); "
                "rerun the same command to train from it without running the teacher again")
    elif cached is False:
        kept = (f"the teacher-logits cache {cache} was not finished and no checkpoint was "
                "written: nothing is kept; rerun the same command to start again")
    else:
        kept = "no checkpoint was written yet"
    print(f"peaknet-distill: {interrupted(exc)}; {kept}", file=sys.stderr)
    return exit_status(exc)


def _latest(out: Path) -> Path | None:
    """The checkpoint a rerun resumes from (None if there is none)."""
    from peaknet_xtal.training.checkpoint import latest_checkpoint

    try:
        return latest_checkpoint(out / "checkpoints")
    except PeakNetError:  # a damaged pointer: the rerun says so itself
        return None


def _what_is_kept(out: Path) -> str | None:
    """After a failed run: the checkpoint a rerun resumes from (None if there is none)."""
    found = _latest(out)
    if found is None:
        return None
    return f"checkpoint {found} is kept; rerun the same command to resume from it"


if __name__ == "__main__":
    raise SystemExit(main())
