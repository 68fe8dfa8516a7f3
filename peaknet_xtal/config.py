"""Run configuration shared by every command: defaults < config file < command line.

Commands build their parser with :func:`cli_parser`, whose options default to *absent*, so the
parsed namespace holds only what the user typed; :func:`resolve` layers that over the config file
over the command's defaults.  :func:`record` logs the resolved configuration and saves it beside
the run's output, so every result can be traced to the exact settings that made it.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from peaknet_xtal.atomic import write_json_atomic
from peaknet_xtal.errors import FormatError

log = logging.getLogger("peaknet_xtal")


def cli_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose help is the command's docstring and whose options default to absent."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML or JSON file of settings (command line wins)")
    parser.add_argument("-v", "--verbose", action="count", help="more logging (-vv for debug)")
    return parser


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge; ``override`` wins, ``None`` values in ``override`` are ignored."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise FormatError(path, f"cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise FormatError(path, f"not valid YAML: {exc}", line=None if line is None else line + 1)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FormatError(path, "a config file must hold a mapping of settings")
    return data


def resolve(
    defaults: Mapping[str, Any],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Layer command-line values over a config file over ``defaults``.

    Dotted command-line keys (``optim.lr``) address nested settings.
    """
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    config_file = given.pop("config", None) or config_file
    given.pop("verbose", None)
    layered = deep_merge(defaults, load_config_file(config_file) if config_file else {})
    nested: dict[str, Any] = {}
    for key, value in given.items():
        parts = key.replace("-", "_").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return deep_merge(layered, nested)


def setup_logging(verbose: int | None = 0) -> None:
    """Our own messages at INFO (DEBUG with -v); other libraries only at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if int(verbose or 0) >= 1 else logging.INFO)


def record(config: Mapping[str, Any], path: str | os.PathLike[str] | None, command: str,
           argv: Sequence[str] | None = None) -> None:
    """Log the resolved configuration and, if ``path`` is given, save it there as JSON."""
    log.info("%s configuration: %s", command, dict(config))
    if path is not None:
        write_json_atomic(path, {"command": command, "argv": list(argv or []),
                                 "config": dict(config)})
