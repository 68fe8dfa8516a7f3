"""Shared command line of peaknet-train and peaknet-distill (thin CLIs over one parser)."""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
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
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line")
    return parser


def parse_training_args(parser: argparse.ArgumentParser, defaults: dict[str, Any],
                        argv: Sequence[str] | None,
                        types: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Resolved, validated settings: defaults < CONFIG.yaml < command line."""
    args = vars(parser.parse_args(argv))
    setup_logging(args.pop("verbose", 0))
    return resolve_or_exit(parser, defaults, args, config_file=args.pop("config_file"),
                           types=types)


def run_summary(prog: str, config: Mapping[str, Any], result: Path, resumed_at: int,
                seconds: float) -> str:
    """What a finished (or ``stop_after``-stopped) run reached, for stdout: the step, the loss
    at the last logged step, this invocation's steps and time, the model (or the checkpoint it
    stopped at), and the loss curve and history beside it.

    Why: the commands printed only the model's path, and whether a run had trained at all, or
    from where, took opening ``history.jsonl``."""
    from peaknet_xtal.progress import format_seconds
    from peaknet_xtal.training.checkpoint import checkpoint_step
    from peaknet_xtal.training.plots import LOSS_PLOT
    from peaknet_xtal.training.trainer import HISTORY, read_history

    out = Path(config["out"])
    steps = int(config["schedule"]["steps"])
    reached = steps if result.name == "model.safetensors" else checkpoint_step(result)
    history = out / HISTORY
    entries = read_history(history) if history.exists() else []
    logged = [e for e in entries if isinstance(e.get("loss"), (int, float))]
    loss = (f"loss {logged[-1]['loss']:.4g} at step {logged[-1]['step']}" if logged
            else "no loss logged")
    done = reached - resumed_at
    begun = f" (resumed at step {resumed_at})" if resumed_at else ""
    lines = [f"{prog}: step {reached} of {steps}, {loss}; this run: {done} "
             f"step{'s' if done != 1 else ''}{begun} in {format_seconds(seconds)} -> {result}"]
    curve = out / LOSS_PLOT
    lines.append(f"  loss curve: {curve}; history: {history}" if curve.exists()
                 else f"  history: {history}")
    return "\n".join(lines)
