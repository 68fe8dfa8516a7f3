"""peaknet-distill: distil a teacher PeakNet into a small student, from a YAML config.

    peaknet-distill CONFIG.yaml [--out DIR] [--teacher MODEL] [--schedule.steps N]

The teacher runs once over the frames of the label files (data.paths) and its logits are cached
(HDF5, OUT/teacher_logits.h5 unless `cache` is set); the student (model.name) is then trained on
0.4 MSE(logits) + 0.4 T^2 KL(T=2) + 0.2 focal(the labels).  The cache is rebuilt when the
teacher's weights, a label file or the crop change, and `cache` must not name any other file.
Label files may come from detectors of different frame shapes.  Reruns (after Ctrl-C too) resume
from the latest checkpoint.  See examples/configs/distill_*.yaml.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from peaknet_xtal.config import record
from peaknet_xtal.errors import PeakNetError
from peaknet_xtal.training.cli_common import parse_training_args, training_parser


def main(argv: Sequence[str] | None = None) -> int:
    from peaknet_xtal.training.distill import DISTILL_DEFAULTS, DISTILL_TYPES, distill

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = training_parser(__doc__, prog="peaknet-distill")
    parser.add_argument("--teacher", dest="teacher")
    config = parse_training_args(parser, DISTILL_DEFAULTS, argv, DISTILL_TYPES)
    config_file = parser.parse_args(argv).config_file
    if not config.get("teacher"):
        parser.error("no teacher: set 'teacher' in CONFIG.yaml or give --teacher MODEL")
    out = Path(config["out"])
    from peaknet_xtal.training.distill import cache_key, check_same_teacher
    from peaknet_xtal.training.trainer import TrainingDiverged, check_start

    try:
        # a rerun of another run, or against another teacher, is refused before the run's
        # record is touched; and without the advice to rerun the same command, which would be
        # refused again
        check_start(config)
        check_same_teacher(out, cache_key(config["teacher"], list(config["data"]["paths"]),
                                          int(config["data"]["crop"])))
    except (PeakNetError, OSError) as exc:
        print(f"peaknet-distill: error: {exc}", file=sys.stderr)
        return 1
    try:
        record(config, out / "distill_config.json", "peaknet-distill", argv,
               config_file=config_file)
        final = distill(config)
    except KeyboardInterrupt:
        print("peaknet-distill: interrupted", file=sys.stderr)
        _say_what_is_kept(out)
        return 130
    except TrainingDiverged as exc:  # says itself what is kept, and not to rerun the same
        print(f"peaknet-distill: error: {exc}", file=sys.stderr)
        return 1
    except (PeakNetError, OSError) as exc:  # a bad teacher, label file or cache: one line
        print(f"peaknet-distill: error: {exc}", file=sys.stderr)
        _say_what_is_kept(out)
        return 1
    print(final)
    return 0


def _say_what_is_kept(out: Path) -> None:
    """After a stopped run: the checkpoint a rerun resumes from (nothing said if none)."""
    from peaknet_xtal.training.checkpoint import latest_checkpoint

    try:
        found = latest_checkpoint(out / "checkpoints")
    except PeakNetError:  # a damaged pointer: the rerun says so itself
        return
    if found is not None:
        print(f"peaknet-distill: checkpoint {found} is kept; re-run the same command to resume "
              "from it", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
