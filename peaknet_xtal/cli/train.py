"""peaknet-train: train a PeakNet model from a YAML config.

    peaknet-train CONFIG.yaml [--out DIR] [--schedule.steps N] [--dist.world_size 2]
                  [--stop-after STEP] [--no-progress]

Data come from the simulator on the fly (data.source: sim) or from stream2labels HDF5 files
(data.source: labels, data.paths: [...]).  Checkpoints go to OUT/checkpoints and a rerun of the same
command resumes from the latest one exactly; the final model is OUT/model.safetensors (+ .json).
OUT/history.jsonl logs the loss, gradient norm and learning rate every log_every steps, and
OUT/loss.png draws the loss (and learning rate) against the step, the whole run's, redrawn at
every checkpoint and as the run ends.  The last lines on stdout say the step reached, the final
loss, this run's steps and time, and the model's path.  --no-progress: no progress line.
A folder holds one run: a rerun whose settings differ from the run there (other than out, threads,
device, data.workers, log_every, progress, checkpoint cadence and stop_after) is refused, naming
each difference, and the folder is left as it was.  Every setting is checked (names, types, ranges)
before any work; OUT/train_config.json records the settings, the command line and the config
file.  A rerun after a label file was replaced under the same name (another size or
modification time) is refused too, naming the file.  With model.init the run fine-tunes that
model's architecture: model.name may be left out (the record then names the init's), and one
naming another architecture is an error.  Give the config file once (CONFIG.yaml, not --config
too).  Ctrl-C stops with exit status 130 and SIGTERM (a batch scheduler's stop) with 143, each
with one line naming the checkpoint kept; rerunning the same command resumes from it.  A stop
that comes while a checkpoint is written lets the write finish first (seconds), so that the line
names it; a second Ctrl-C stops at once.  A run whose loss or weights become NaN or infinite
(too high a learning rate) stops at that step with exit status 1, saying what to change; its
earlier checkpoints are kept and no final model is written.  Example configurations:
examples/configs/train_*.yaml in the source repository (not installed with the package).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from peaknet_xtal.config import ConfigError, record
from peaknet_xtal.errors import PeakNetError
from peaknet_xtal.stopping import exit_status, interrupted, sigterm_raises
from peaknet_xtal.training.cli_common import parse_training_args, training_parser

PROG = "peaknet-train"
RECORD = "train_config.json"
#: What a stop before the settings were read keeps: nothing was done.
NOT_STARTED = "stopped before the settings were read: nothing was done"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    out: Path | None = None  # known once the settings are read
    try:
        # a batch scheduler's SIGTERM stops the run as Ctrl-C does (Python's default died
        # silently with 143), so that it says what is kept; installed first, before torch is
        # imported and the settings read (a SIGTERM in those seconds died silently too)
        with sigterm_raises():
            from peaknet_xtal.training.checkpoint import checkpoint_step
            from peaknet_xtal.training.cli_common import run_summary
            from peaknet_xtal.training.supervised import (
                SUPERVISED_DEFAULTS,
                SUPERVISED_TYPES,
                build_dataset,
                train,
            )
            from peaknet_xtal.training.trainer import check_start, resolve_model_name

            parser = training_parser(__doc__, prog=PROG)
            config = parse_training_args(parser, SUPERVISED_DEFAULTS, argv, SUPERVISED_TYPES)
            config_file = parser.parse_args(argv).config_file
            out = Path(config["out"])
            # everything that can be checked before any work, in this order: the model (the
            # record names the architecture trained), the run folder (and the run it holds),
            # the data; the record is written only then, so a refused rerun leaves the earlier
            # run's record as it was
            config = resolve_model_name(config)
            resumed_at = checkpoint_step(check_start(config))
            dataset = build_dataset(config)
            record(config, out / RECORD, PROG, argv, config_file=config_file)
            final = train(config, dataset)
    except ConfigError as exc:  # a setting the checks above refuse: a usage error naming the
        parser.error(f"{exc.path or config_file}: {exc.message}")  # file it came from
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        print(f"{PROG}: {interrupted(exc)}; {_what_is_kept(out)}", file=sys.stderr)
        return exit_status(exc)
    except PeakNetError as exc:  # a bad label file, checkpoint or run folder: one line naming it
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(run_summary(PROG, config, final, resumed_at, time.monotonic() - started))
    return 0


def _what_is_kept(out: Path | None) -> str:
    """What a rerun of the same command starts from (``out`` None: stopped before the settings
    were read, so before any work)."""
    from peaknet_xtal.training.checkpoint import latest_checkpoint

    if out is None:
        return NOT_STARTED

    try:
        found = latest_checkpoint(out / "checkpoints")
    except PeakNetError:  # a damaged pointer: the rerun says so itself
        found = None
    if found is None:
        return "no checkpoint was written yet"
    return f"rerun the same command to resume from {found}"


if __name__ == "__main__":
    raise SystemExit(main())
