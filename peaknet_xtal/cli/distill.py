"""peaknet-distill: distil a teacher PeakNet into a small student, from a YAML config.

    peaknet-distill CONFIG.yaml [--out DIR] [--teacher MODEL] [--schedule.steps N]

The teacher runs once over the frames of the label files (data.paths) and its logits are cached
(HDF5, OUT/teacher_logits.h5 unless `cache` is set); the student (model.name) is then trained on
0.4 MSE(logits) + 0.4 T^2 KL(T=2) + 0.2 focal(teacher argmax).  Reruns resume from the latest
checkpoint.  See examples/configs/distill_*.yaml.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peaknet_xtal.config import record
from peaknet_xtal.training.cli_common import parse_training_args, training_parser


def main(argv: Sequence[str] | None = None) -> int:
    from peaknet_xtal.training.distill import DISTILL_DEFAULTS, DISTILL_TYPES, distill

    parser = training_parser(__doc__, prog="peaknet-distill")
    parser.add_argument("--teacher", dest="teacher")
    config = parse_training_args(parser, DISTILL_DEFAULTS, argv, DISTILL_TYPES)
    record(config, Path(config["out"]) / "distill_config.json", "peaknet-distill", argv)
    print(distill(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
