"""``--source-option KEY=VALUE``: the options a user gives the frame sources, one set of rules for
every command that reads frames (``peaknet2cxi``, ``peaknet-show``, ``stream2labels``).

A source type declares the options it takes from a user (``SourceType.options``, read by
:func:`peaknet_xtal.registry.source_options`); each source is passed only those it declares,
as the strings typed (a config file's values as they are there), and a key no registered type
declares is refused before any work: a misspelt ``detectr=`` would otherwise reach no source
and be lost without a word.  One implementation, so that the flag parses, refuses and reaches
a plugin alike wherever frames are read: peaknet-show and the data engine had no such flag,
and a plugin source that needs a run number or a calibration path could be used by peaknet2cxi
alone.  The geometry has each command's own option (``-g``), never this one.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from peaknet_xtal.errors import PeakNetError

FLAG = "--source-option"
#: The flag's help, the same in every command.
HELP = ("an option for the frame source types that declare KEY (a plugin's, e.g. the psana "
        "plugin's detector=NAME; repeatable; the value is passed as the string typed)")


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--source-option KEY=VALUE`` (repeatable) to a command's parser; :func:`take` reads
    it."""
    parser.add_argument(FLAG, dest="source_option", action="append", metavar="KEY=VALUE",
                        help=HELP)


def parse(parser: argparse.ArgumentParser, pairs: Sequence[str]) -> dict[str, str]:
    """``--source-option`` values (``KEY=VALUE``) as a mapping; anything else is a usage
    error."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            parser.error(f"argument {FLAG}: {pair!r} is not KEY=VALUE")
        options[key.strip()] = value
    return options


def take(parser: argparse.ArgumentParser, args: argparse.Namespace,
         setting: str = "source_options") -> None:
    """Replace the ``--source-option`` values parsed into ``args`` by their mapping under
    ``setting``, the command's configuration key (dotted for a section: ``run.source_options``);
    nothing where none was typed, so that a config file's options stand."""
    pairs = vars(args).pop("source_option", None)
    if pairs is not None:
        setattr(args, setting, parse(parser, pairs))


def check(options: Mapping[str, Any]) -> None:
    """Refuse a source option no registered source type declares: one error naming the option
    and the types that take options, with the plugins that failed to load (one of them may
    have declared it)."""
    if not options:
        return
    from peaknet_xtal.registry import skipped_note, source_options

    declared = source_options()
    known = {name for names in declared.values() for name in names} - {"geometry"}
    unknown = sorted(set(options) - known)
    if unknown:
        offered = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in declared.items()
                            if names) or "none declares any"
        geometry = " (the geometry: -g)" if "geometry" in unknown else ""
        raise PeakNetError(f"{FLAG} {', '.join(unknown)}: no registered source type "
                           f"takes it{geometry} (source options: {offered}){skipped_note()}")


def check_or_exit(parser: argparse.ArgumentParser, options: Mapping[str, Any]) -> None:
    """:func:`check` for a command line: a usage error (one line, exit 2) before any work."""
    try:
        check(options)
    except PeakNetError as exc:
        parser.error(str(exc))


def for_type(kind: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``options`` that source type ``kind`` declares: what its ``open`` is passed (the
    others are for other types; the built-ins declare none)."""
    if not options:
        return {}
    from peaknet_xtal.registry import source_options

    declared = source_options().get(kind, ())
    return {key: value for key, value in options.items() if key in declared}
