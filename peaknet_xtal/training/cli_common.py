"""Shared command line of peaknet-train and peaknet-distill (thin CLIs over one parser)."""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from peaknet_xtal.config import cli_parser, resolve_or_exit, setup_logging


def training_parser(doc: str | None, prog: str) -> argparse.ArgumentParser:
    """CONFIG.yaml plus the settings most often changed per run (dotted keys address the YAML)."""
    parser = cli_parser(doc, prog=prog)
    parser.add_argument("config_file", metavar="CONFIG.yaml")
    parser.add_argument("--out", dest="out")
    parser.add_argument("--schedule.steps", dest="schedule.steps", type=int)
    parser.add_argument("--stop-after", dest="stop_after", type=int, metavar="STEP",
                        help="stop at this step with a checkpoint and no final model (a "
                             "time-boxed job); the same command without it continues")
    parser.add_argument("--dist.world_size", dest="dist.world_size", type=int)
    parser.add_argument("--threads", dest="threads", type=int)
    parser.add_argument("--data.paths", dest="data.paths", nargs="+", metavar="LABELS.h5")
    return parser


def parse_training_args(parser: argparse.ArgumentParser, defaults: dict[str, Any],
                        argv: Sequence[str] | None,
                        types: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Resolved, validated settings: defaults < CONFIG.yaml < command line."""
    args = vars(parser.parse_args(argv))
    setup_logging(args.pop("verbose", 0))
    return resolve_or_exit(parser, defaults, args, config_file=args.pop("config_file"),
                           types=types)
