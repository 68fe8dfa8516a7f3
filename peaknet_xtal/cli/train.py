"""peaknet-train: train a PeakNet model from a YAML config.

    peaknet-train CONFIG.yaml [--out DIR] [--schedule.steps N] [--dist.world_size 2]

Data come from the simulator on the fly (data.source: sim) or from stream2labels HDF5 files
(data.source: labels, data.paths: [...]).  Checkpoints go to OUT/checkpoints and a rerun of the same
command resumes from the latest one exactly; the final model is OUT/model.safetensors (+ .json).
See examples/configs/train_*.yaml.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from peaknet_xtal.config import record
from peaknet_xtal.errors import PeakNetError
from peaknet_xtal.training.cli_common import parse_training_args, training_parser


def main(argv: Sequence[str] | None = None) -> int:
    from peaknet_xtal.training.supervised import SUPERVISED_DEFAULTS, SUPERVISED_TYPES, train

    parser = training_parser(__doc__, prog="peaknet-train")
    config = parse_training_args(parser, SUPERVISED_DEFAULTS, argv, SUPERVISED_TYPES)
    record(config, Path(config["out"]) / "train_config.json", "peaknet-train", argv)
    try:
        final = train(config)
    except PeakNetError as exc:  # a bad label file or checkpoint: one line naming it
        print(f"peaknet-train: error: {exc}", file=sys.stderr)
        return 1
    print(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
