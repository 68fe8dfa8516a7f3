"""Run configuration shared by every command: defaults < config file < command line.

Commands build their parser with :func:`cli_parser`, whose options default to *absent*, so the
parsed namespace holds only what the user typed; :func:`resolve` layers that over the config file
over the command's defaults, and validates the result with pydantic against a schema inferred from
the defaults (plus explicit types for settings whose default is ``None``, :func:`bounded` ranges,
:func:`one_of` names and :func:`fields_of` sections): a misspelt key (``threshhold: 0.9``), a value
of the wrong type, one outside its range or not among the allowed names is an error naming the
file (or the command line) and the key, never silently ignored.  :func:`record` logs the resolved
configuration and saves it beside the run's output, so every result can be traced to the exact
settings that made it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError

from peaknet_xtal.atomic import write_json_atomic
from peaknet_xtal.errors import FormatError

log = logging.getLogger("peaknet_xtal")

#: Where a setting given on the command line (or by a Python caller) is reported to come from.
COMMAND_LINE = "command line"


class ConfigError(FormatError):
    """A setting is unknown or has the wrong type (names the config file or the command line)."""


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line: argparse printed the whole usage block above the message (15
    lines for ``peaknet2cxi``), in which the line that says what is wrong was the last."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def cli_parser(doc: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose help is the command's docstring and whose options default to absent.

    Options are never guessed from a prefix (``allow_abbrev=False``): ``--no-progres`` ran as
    ``--no-progress``, so a typo of one option could silently select another; and a usage error
    is one line (:class:`_OneLineErrors`)."""
    parser = _OneLineErrors(
        prog=prog,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML or JSON file of settings (command line wins)")
    parser.add_argument("-v", "--verbose", action="count",
                        help="more logging: -v other libraries' messages too, -vv debug")
    return parser


def bounded(kind: type, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, optional: bool = False) -> Any:
    """``kind`` (int or float) limited to a range, as a type for :func:`resolve`'s ``types``.

    A value outside the range is an error that states the whole range (``must be in (0, 1]``),
    not only the bound it crossed, so one message tells the user what to type; NaN is outside
    every range, and so is infinity unless the range itself reaches it (``le=math.inf``: a
    setting for which infinity means "no limit"; see ``finding.settings.within``), so
    ``lr: .inf`` is ``must be a finite number > 0``.  ``true``/``false`` is no number here
    (pydantic reads ``steps: true`` as 1 otherwise).  ``optional`` also allows ``None``
    (``max_peaks: null``: no cap).
    """
    from peaknet_xtal.finding.settings import range_text, within

    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}

    def check(value: Any) -> Any:
        if value is not None and not within(bounds, value):  # NaN is outside every range
            raise PydanticCustomError("out_of_range", "must be {allowed}",
                                      {"allowed": range_text(bounds, value)})
        return value

    kind_in_range: Any = Annotated[number(kind), AfterValidator(check)]
    return kind_in_range | None if optional else kind_in_range


def _no_bool(what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError("bool_is_no_number", "must be {what}, not true/false",
                                      {"what": what})
        return value

    return check


#: A whole number / a number that is not ``true``/``false`` (pydantic's lax int and float take
#: a bool as 1 or 0: ``schedule.steps: true`` trained one step).  Strings of digits stay
#: accepted, as pydantic reads them, for values that reach a command untyped.
INT = Annotated[int, BeforeValidator(_no_bool("a whole number"))]
FLOAT = Annotated[float, BeforeValidator(_no_bool("a number"))]


def _finite(value: Any) -> Any:
    from peaknet_xtal.finding.settings import finite

    if not finite(value):
        raise PydanticCustomError("not_finite", "must be a finite number")
    return value


#: :data:`FLOAT` without NaN or infinity: the type of a setting whose default is a float and
#: whose range is not declared (``bright_sigmas``, ``loss.gamma``, ``data.augment.noise``).  No
#: such setting means anything at infinity (one that does declares ``bounded(le=math.inf)``).
FINITE_FLOAT = Annotated[FLOAT, AfterValidator(_finite)]


def number(kind: Any) -> Any:
    """``kind`` with a bool refused where ``kind`` is int or float (:data:`INT`, :data:`FLOAT`);
    any other type (pydantic's ``FiniteFloat`` included) as given, with the same refusal."""
    if kind is int:
        return INT
    if kind is float:
        return FLOAT
    if isinstance(kind, type) and issubclass(kind, (int, float)) or _is_number_alias(kind):
        return Annotated[kind, BeforeValidator(_no_bool("a number"))]
    return kind


def _is_number_alias(kind: Any) -> bool:
    """Whether ``kind`` is an ``Annotated`` int or float (``FiniteFloat``, ``PositiveInt``)."""
    origin = getattr(kind, "__origin__", None)
    return isinstance(origin, type) and issubclass(origin, (int, float))


def one_of(allowed: Iterable[str] | Callable[[], Iterable[str]],
           note: Callable[[], str] | None = None) -> Any:
    """A name from a fixed set, as a type for :func:`resolve`'s ``types``.

    Any other value is an error listing the allowed names (and the one it most resembles), so
    ``precision: fp16`` fails at once instead of training silently in fp32.  ``allowed`` may be a
    function called when a value is checked: the registered model names are known only once the
    model package, and torch with it, is imported, which a command's defaults must not do.
    ``note()`` is added to that error (the plugins that failed to load, whose names the set may
    lack).
    """
    def check(value: str) -> str:
        names = [str(name) for name in (allowed() if callable(allowed) else allowed)]
        if value not in names:
            close = closest_key(value, names)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise PydanticCustomError("not_one_of", "must be one of {allowed}{hint}{note}",
                                      {"allowed": ", ".join(names), "hint": hint,
                                       "note": note() if note is not None else ""})
        return value

    return Annotated[str, AfterValidator(check)]


def _device_name(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise PydanticCustomError("device", "must be auto, cpu, cuda or cuda:N (a GPU index)")
    return value


#: A torch device as every command takes it (``auto``, ``cpu``, ``cuda``, ``cuda:N``), as a type
#: for :func:`resolve`'s ``types``: a misspelt one is refused before any work; whether the machine
#: has that GPU is the device resolution's to say (``finding.engine.resolve_device``).
DEVICE = Annotated[str, AfterValidator(_device_name)]


@dataclasses.dataclass(frozen=True)
class _FieldsOf:
    """A section whose keys are a dataclass's fields (see :func:`fields_of`)."""

    cls: type

    def defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None
        return out


def fields_of(cls: type) -> Any:
    """A section holding some fields of the dataclass ``cls``, as a type for ``types``.

    A key that is not a field is an error naming it (with the field it most resembles), and each
    value must have the type of that field's default, exactly as for the command's own settings.
    Only the keys given are kept: the consumer fills in the rest, and may draw them at random
    (``data.sim.config`` fixes only the simulator settings it names; the others are randomised),
    so the section must not be filled with the dataclass's defaults.  The fields are read from
    the class itself, never listed by hand, so a new field is accepted as soon as it exists.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"fields_of needs a dataclass, not {cls!r}")
    return _FieldsOf(cls)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge; ``override`` wins, ``None`` included (``max_peaks: null`` means no cap,
    not "the default")."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader refusing a key given twice in one mapping: plain YAML keeps the last
    value without a word, so ``seed: 0`` ... ``seed: 5`` ran with 5 while the file's first
    ``seed`` said 0.  Merge keys (``<<: *base``) may still be overridden: that is their use."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen[key] = line
                except TypeError:  # an unhashable key: yaml's own error follows
                    continue
                if first is not None:
                    raise _DuplicateKey(f"duplicate key {key!r} (first at line {first}): give "
                                        "each setting once", line)
        return super().construct_mapping(node, deep=deep)


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a YAML (or JSON) file; anything else is a FormatError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise FormatError(path, f"cannot read config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:  # a data file given where the config belongs
        raise FormatError(path, "not a text file (a YAML or JSON config file is expected; byte "
                                f"{exc.start} is not UTF-8)") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader)
    except _DuplicateKey as exc:
        raise FormatError(path, str(exc), line=exc.line) from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise FormatError(path, f"not valid YAML: {exc}",
                          line=None if line is None else line + 1) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FormatError(path, "a config file must hold a mapping of settings")
    return data


def _annotation(value: Any, key: str, types: Mapping[str, Any]) -> Any:
    """The type a setting must have: declared in ``types``, else that of its default."""
    if key in types:
        return types[key]
    if value is None:
        return Any
    if isinstance(value, bool):
        return StrictBool  # "yes"/1 for a switch is more likely a slip than intent
    if isinstance(value, float):
        return FINITE_FLOAT
    if isinstance(value, int):
        return INT
    if isinstance(value, str):
        return str
    if isinstance(value, (list, tuple)):
        kinds = {_annotation(v, "", {}) for v in value}
        item = kinds.pop() if len(kinds) == 1 else Any
        return list[item]  # type: ignore[valid-type]
    return Any


def settings_model(defaults: Mapping[str, Any], types: Mapping[str, Any] | None = None,
                   name: str = "Settings", prefix: str = "",
                   sparse: bool = False) -> type[BaseModel]:
    """A pydantic model of ``defaults``: every key known, types from the default values.

    A non-empty mapping becomes a nested model that forbids unknown keys; an empty one is an open
    section (``sim``) whose consumer checks its keys.  ``types`` gives dotted keys whose default
    cannot say their type (``{"max_peaks": int | None}``), ranges (:func:`bounded`), names
    (:func:`one_of`) and sections of a dataclass's fields (:func:`fields_of`, a ``sparse`` model:
    every key optional, only those given dumped); keys with a ``None`` default and no entry
    there accept anything.
    """
    types = dict(types or {})
    fields: dict[str, Any] = {}
    for i, (key, value) in enumerate(defaults.items()):
        dotted = f"{prefix}{key}"
        spec = types.get(dotted)
        if isinstance(spec, _FieldsOf):
            kind: Any = settings_model(spec.defaults(), types, f"{name}_{key}", f"{dotted}.",
                                       sparse=True)
        elif dotted not in types and isinstance(value, Mapping) and value:
            kind = settings_model(value, types, f"{name}_{key}", f"{dotted}.", sparse=sparse)
        elif isinstance(value, Mapping) and dotted not in types:
            kind = dict[str, Any]
        else:
            kind = _annotation(value, dotted, types)
        # attribute names of our own, the setting's name as alias: a setting may be called
        # "json" or "copy" without shadowing BaseModel's methods
        fields[f"s{i}"] = (kind, Field(default=value, alias=key) if sparse else Field(alias=key))
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(name, __config__=config, **fields)


def closest_key(key: str, known: Iterable[str]) -> str | None:
    """The known setting ``key`` most resembles (a likely misspelling), or None."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return close[0] if close else None


def _section_keys(defaults: Mapping[str, Any], types: Mapping[str, Any] | None,
                  loc: Sequence[str]) -> Mapping[str, Any]:
    """The settings the section at ``loc`` knows (a :func:`fields_of` section's fields too)."""
    node: Any = defaults
    for depth, part in enumerate(loc):
        spec = (types or {}).get(".".join(loc[:depth + 1]))
        if isinstance(spec, _FieldsOf):
            node = spec.defaults()
        else:
            node = node.get(part, {}) if isinstance(node, Mapping) else {}
    return node if isinstance(node, Mapping) else {}


def _has(tree: Mapping[str, Any], loc: Sequence[Any]) -> bool:
    node: Any = tree
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def validate(config: Mapping[str, Any], defaults: Mapping[str, Any],
             types: Mapping[str, Any] | None = None,
             sources: Sequence[tuple[str, Mapping[str, Any]]] = (),
             options: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``config`` checked against the schema of ``defaults`` (see :func:`settings_model`).

    ``sources`` are (name, settings) layers, most important first; an error names the first
    layer that holds the offending key (a config file's path, or the command line).  ``options``
    maps a setting to the option that sets it (``min_snr`` -> ``--min-snr``): a value typed on
    the command line is reported under the name the user typed.
    """
    model = settings_model(defaults, types)
    try:
        # exclude_unset drops only what a fields_of section was not given: every other key is
        # required, so always set
        return model.model_validate(dict(config)).model_dump(by_alias=True, exclude_unset=True)
    except ValidationError as exc:
        problems: list[str] = []
        where = None
        for err in exc.errors():
            loc = [part for part in err["loc"] if isinstance(part, str)]
            key = ".".join(loc)
            origin = next((name for name, layer in sources if _has(layer, loc)), None)
            where = where or origin
            if err["type"] == "extra_forbidden":
                close = closest_key(loc[-1], _section_keys(defaults, types, loc[:-1]))
                hint = f" (did you mean {'.'.join([*loc[:-1], close])!r}?)" if close else ""
                problems.append(f"unknown setting {key!r}{hint}")
            else:
                name = (options or {}).get(key, key) if origin == COMMAND_LINE else key
                problems.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(where, "; ".join(problems)) from None


def _nest(given: Mapping[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": 1}`` -> ``{"optim": {"lr": 1}}`` (and ``-`` in keys read as ``_``)."""
    nested: dict[str, Any] = {}
    for key, value in given.items():
        parts = key.replace("-", "_").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def resolve(
    defaults: Mapping[str, Any],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    *,
    types: Mapping[str, Any] | None = None,
    options: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Layer command-line values over a config file over ``defaults``, then validate.

    Dotted command-line keys (``optim.lr``) address nested settings.  ``types`` declares settings
    whose default is ``None`` (see :func:`settings_model`) and ranges (:func:`bounded`).  Raises
    :class:`ConfigError` naming the file (or the command line) and the key (or, for the command
    line, its option in ``options``) for an unknown setting, a wrong type or a value out of range.
    A command that takes its config file as an argument (``config_file``) and also gets
    ``--config`` is told to give one: which of the two should win is anyone's guess.
    """
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args or {})
    option_file = given.pop("config", None)
    if option_file and config_file:
        raise ConfigError(COMMAND_LINE, f"two config files, {config_file} and --config "
                                        f"{option_file}: give one")
    config_file = option_file or config_file
    given.pop("verbose", None)
    from_file = load_config_file(config_file) if config_file else {}
    from_cli = _nest(given)
    layered = deep_merge(deep_merge(defaults, from_file), from_cli)
    sources = [(COMMAND_LINE, from_cli)]
    if config_file:
        sources.append((str(config_file), from_file))
    return validate(layered, defaults, types, sources, options)


def resolve_or_exit(parser: argparse.ArgumentParser, defaults: Mapping[str, Any],
                    args: argparse.Namespace | Mapping[str, Any], *,
                    config_file: str | os.PathLike[str] | None = None,
                    types: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`resolve` for a command line: a :class:`ConfigError` (or a config file that cannot
    be read or parsed) becomes the parser's usage error (exit status 2, the file and key named, a
    command-line value by its option), never a traceback."""
    try:
        return resolve(defaults, args, config_file, types=types, options=option_names(parser))
    except FormatError as exc:  # ConfigError is one
        parser.error(str(exc))


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Setting -> the long option that sets it (``min_snr`` -> ``--min-snr``), so an error in a
    value typed on the command line names what the user typed."""
    names: dict[str, str] = {}
    for action in parser._actions:  # argparse keeps its options nowhere public
        longs = [o for o in action.option_strings if o.startswith("--")]
        setting = action.dest.replace("-", "_")
        if longs and setting not in names:
            names[setting] = longs[0]
    return names


#: The commands' log lines: time, level, logger, message.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: int | None = 0) -> None:
    """Our own messages at INFO and other libraries' at WARNING; ``-v`` (1) adds other
    libraries' INFO, ``-vv`` (2 or more) our DEBUG too, as ``cli_parser``'s help says.  Each
    line starts with the time: a batch job's log otherwise says what happened but not when."""
    level = int(verbose or 0)
    logging.basicConfig(format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger().setLevel(logging.INFO if level >= 1 else logging.WARNING)
    log.setLevel(logging.DEBUG if level >= 2 else logging.INFO)


def _config_option(argv: Sequence[str]) -> str | None:
    """The file ``--config`` names in ``argv`` (as :func:`cli_parser` reads it), or None."""
    finder = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    finder.add_argument("--config")
    try:
        known, _ = finder.parse_known_args(list(argv))
    except (argparse.ArgumentError, SystemExit):  # "--config" without a value: none given
        return None
    return known.config


def record(config: Mapping[str, Any], path: str | os.PathLike[str] | None, command: str,
           argv: Sequence[str] | None = None,
           config_file: str | os.PathLike[str] | None = None) -> None:
    """Log the resolved configuration and, if ``path`` is given, save it there as JSON.

    ``argv`` None means the process's own arguments (what a console script's ``main(None)``
    parsed), not "none".  The config file (``config_file``, else the ``--config`` in ``argv``) is
    saved as an absolute path and the working directory beside ``argv``, so the record leads back
    to the file and to every relative path typed; the package's version beside them says which
    code made the run (the model's weights have their own digest where a command records one).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_file = config_file if config_file is not None else _config_option(argv)
    log.info("%s configuration: %s", command, dict(config))
    if path is not None:
        from peaknet_xtal import __version__

        write_json_atomic(path, {
            "command": command, "version": __version__, "argv": argv, "cwd": os.getcwd(),
            "config_file": None if config_file is None else str(Path(config_file).absolute()),
            "config": dict(config)})


def add_to_record(path: str | os.PathLike[str], used: Mapping[str, Any]) -> None:
    """Add to the record :func:`record` saved before a run what the run chose as it ran, where
    the configuration left it to the machine (the CPU threads: ``threads: null`` said nothing
    of those used), under ``"used"``: beside the configuration as given, never into it, so
    that the record still says which settings were given, and a command built from them runs
    on another machine's cores rather than this one's.  A record that cannot be read or
    written any more is said in a warning: the run's outputs stand without it."""
    try:
        saved = json.loads(Path(path).read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a run record")
        saved["used"] = {**saved.get("used", {}), **used}
        write_json_atomic(path, saved)
    except (OSError, ValueError) as exc:
        log.warning("could not add %s to the run record %s: %s",
                    ", ".join(f"{k} {v}" for k, v in used.items()), path, exc)


_ABSENT = object()


def setting_differences(run: Mapping[str, Any], now: Mapping[str, Any],
                        may_change: Iterable[str] = (), prefix: str = "") -> list[str]:
    """``key: <run's value> in the run, <value> now`` for every setting that differs between
    an earlier run's record and this run, nested sections as dotted keys, except those in
    ``may_change`` (dotted).  A setting only one side has differs too: a run made before a
    setting existed cannot say it ran as that setting's default does now.  What a command
    says when it refuses to continue a run with other settings (peaknet-train,
    peaknet-integrate)."""
    allowed = set(may_change)
    found: list[str] = []
    for key in sorted(set(run) | set(now)):
        dotted = f"{prefix}{key}"
        if dotted in allowed:
            continue
        old, new = run.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += setting_differences(old, new, allowed, f"{dotted}.")
        elif old != new:
            shown = ["(not set)" if v is _ABSENT else "(not given)" if v is None
                     else json.dumps(v, default=str) for v in (old, new)]
            found.append(f"{dotted}: {shown[0]} in the run, {shown[1]} now")
    return found
