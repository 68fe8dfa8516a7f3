"""Exceptions raised for bad input.

Every reader raises :class:`FormatError` (or a subclass) for malformed input, carrying the file and
the place inside it (line number or HDF5 dataset), so that a user with a thousand files knows which
one to look at and where.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from os import PathLike


class PeakNetError(Exception):
    """Base class of every error this package raises on purpose."""


class FormatError(PeakNetError, ValueError):
    """A file is malformed, truncated or inconsistent with what it claims to be."""

    def __init__(
        self,
        path: str | PathLike[str] | None,
        message: str,
        *,
        line: int | None = None,
        dataset: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.dataset = dataset
        self.message = message
        where = self.path or "<input>"
        if line is not None:
            where += f", line {line}"
        if dataset is not None:
            where += f", dataset {dataset}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled by its fields: an error raised in a Ray actor (a source, a writer) reaches the
        driver as itself, message and all.  Exception's own pickling calls ``cls(*args)`` with
        the one formatted message, which this signature cannot take, so Ray answered "Failed to
        deserialize exception" instead of the file and what is wrong with it."""
        return (_rebuild_format_error, (type(self), self.path, self.message, self.line,
                                        self.dataset, dict(self.__dict__)))


def _rebuild_format_error(cls: type[FormatError], path: str | None, message: str,
                          line: int | None, dataset: str | None,
                          state: dict[str, object]) -> FormatError:
    """:meth:`FormatError.__reduce__`'s inverse (any subclass keeping its signature)."""
    error = cls(path, message, line=line, dataset=dataset)
    error.__dict__.update(state)
    return error


class DialsUnavailable(PeakNetError, ImportError):
    """DIALS (dxtbx, cctbx, dials) cannot be imported where an option or an input needs it
    (:func:`require_dials`).  An ImportError too, so that a caller who tries DIALS and goes on
    without it catches it as it would catch the import's own error."""


#: The packages of the DIALS distribution: one of them missing is DIALS absent, where anything
#: else failing in their import is a DIALS that is there but fails to load.
DIALS_PACKAGES = ("dials", "dxtbx", "cctbx", "scitbx", "libtbx", "iotbx", "boost_adaptbx")


def require_dials(what: str, *modules: str, otherwise: str = "", load: bool = True,
                  before_writing: bool = False) -> None:
    """Import ``modules`` (default: dxtbx's models) or raise :class:`DialsUnavailable`, one
    line saying that ``what`` (an option, ``--dials``; an input, ``reading x.cbf through
    dxtbx``) needs DIALS, with the module that failed to import and the import's own error,
    and ``otherwise``, what else the user can do (``give the detector's geometry with -g``),
    at its end.

    ``load=False`` is the check made before the work (a command's start, before its model
    runs): the packages are looked for here and the modules imported in a child process of
    this Python (same ``sys.path`` and environment), so that this process loads nothing.
    ``before_writing``: the check comes before the command writes anything, and its error
    says that nothing was written.  Why a child: cctbx's stub OpenMP, loaded before torch, limits
    torch to one thread (:func:`peaknet_xtal.threads.openmp_shadowed`), so a check that
    imported DIALS here would slow a run that imports it only at its end (``--dials``); and a
    check that only looked for the packages passed a DIALS that is there but fails to load,
    which then stopped the run where it first imported DIALS: after every frame had been found
    (a user trial).  A child costs about a second (DIALS' import), once a process: a module
    set that imported is not asked again.

    Why at all: DIALS is no pip requirement (no PyPI package holds dxtbx/cctbx), and a run
    without it ended in a traceback (``No module named 'dials'``) after every frame had been
    found, or at the first CBF file.  The import's own words stay in the message because a
    DIALS that is installed but fails to load (Debian's without ``LIBTBX_BUILD``, or under
    numpy 2, or a compiled extension that does not load) ends here too, and only they say
    what is wrong with it."""
    names = modules or ("dxtbx.model.experiment_list",)
    for name in names:
        try:
            if load:
                importlib.import_module(name)
            else:
                top = name.partition(".")[0]
                if importlib.util.find_spec(top) is None:
                    raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        except Exception as exc:  # noqa: BLE001 - a broken DIALS raises OSError and more
            missing = isinstance(exc, ModuleNotFoundError) and _is_dials(exc.name)
            said = f"{type(exc).__name__}: {exc}"
            raise DialsUnavailable(_dials_message(what, name, said, missing, otherwise,
                                                  before_writing)) from exc
    if not load and not all(name in sys.modules for name in names):  # loaded here: it loads
        _import_in_a_child(what, names, otherwise, before_writing)


def _is_dials(module: str | None) -> bool:
    """Whether ``module`` is (in) one of the DIALS distribution's packages."""
    return (module or "").split(".")[0] in DIALS_PACKAGES


#: Module sets a child process imported (:func:`_import_in_a_child`), with the interpreter,
#: ``sys.path`` and environment it imported them under.
_IMPORTED: set[tuple[object, ...]] = set()

#: What the child runs: each module named before it is imported (a crash names the one that
#: crashed), then its failure or "ok", one JSON object a line on stdout.
_CHILD = """
import importlib, json, sys
asked = json.load(sys.stdin)
sys.path[:] = asked["path"]
for name in asked["modules"]:
    print(json.dumps({"module": name}), flush=True)
    try:
        importlib.import_module(name)
    except BaseException as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        print(json.dumps({"module": name, "said": f"{type(exc).__name__}: {exc}",
                          "missing": missing}), flush=True)
        sys.exit(1)
print(json.dumps({"ok": True}), flush=True)
"""


def _import_in_a_child(what: str, modules: Sequence[str], otherwise: str,
                       before_writing: bool) -> None:
    """:func:`require_dials` with ``load=False``: import ``modules`` in a child process of this
    Python; raise :class:`DialsUnavailable` with the child's failure (its import error, or the
    signal that ended it: a compiled extension can crash its importer).  Where no child can be
    started (no interpreter path, no process left), nothing is said: the import where the run
    makes it says what fails."""
    import json
    import os
    import signal
    import subprocess

    key = (sys.executable, tuple(modules), tuple(sys.path), tuple(sorted(os.environ.items())))
    if key in _IMPORTED or not sys.executable:
        return
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                               errors="replace", check=False,
                               input=json.dumps({"path": sys.path, "modules": list(modules)}))
    except OSError:
        return
    said: list[dict[str, object]] = []
    for line in child.stdout.splitlines():
        try:
            item = json.loads(line)
        except ValueError:  # a module's own print
            continue
        if isinstance(item, dict):
            said.append(item)
    last = said[-1] if said else {}
    if child.returncode == 0 and last.get("ok"):
        _IMPORTED.add(key)
        return
    module = str(last.get("module", modules[0]))
    if "said" in last:
        missing = last.get("missing")  # set for a ModuleNotFoundError alone
        raise DialsUnavailable(_dials_message(
            what, module, str(last["said"]), isinstance(missing, str) and _is_dials(missing),
            otherwise, before_writing))
    if child.returncode < 0:
        try:
            text = f"killed by {signal.Signals(-child.returncode).name}"
        except ValueError:
            text = f"killed by signal {-child.returncode}"
    else:  # a library's own exit: its last word says why
        tail = [line.strip() for line in child.stderr.splitlines() if line.strip()]
        text = f"exit status {child.returncode}" + (f": {tail[-1]}" if tail else "")
    raise DialsUnavailable(_dials_message(what, module, text, False, otherwise, before_writing))


def _dials_message(what: str, module: str, said: str, missing: bool, otherwise: str,
                   before_writing: bool) -> str:
    """The one line of :func:`require_dials`: ``said``, the import's error (``Type: words``)
    in ``module``; ``missing``, DIALS is not there at all (else it is there but fails to
    load)."""
    said = " ".join(said.split())
    if missing:
        said = said.partition(": ")[2] or said  # "No module named 'dials'" says it all
        message = (f"{what} needs DIALS, which this Python cannot import ({said}): install "
                   "Debian's dials package or a conda DIALS and run from that environment "
                   "(README, Quick start)")
    else:
        message = (f"{what} needs DIALS, which is installed but fails to load in this Python "
                   f"(importing {module}: {said}): Debian's DIALS needs "
                   "LIBTBX_BUILD=/usr/lib/cctbx/python3.11 and numpy < 2 (README, Quick start)")
    message = f"{message}; or {otherwise}" if otherwise else message
    return f"{message}; nothing was written" if before_writing else message


class ImageRefused(FormatError):
    """An image file DIALS can open, refused for the reason its message states (cut short,
    frames this dxtbx cannot reach, a name without an image number): the message is the whole
    story, where a plain failure to read is explained as a damaged file."""


class GeometryError(FormatError):
    """A CrystFEL geometry file is malformed, or does not fit the data it is used with."""


class StreamError(FormatError):
    """A CrystFEL stream is malformed or truncated."""


#: How torch says memory ran out: its CPU allocator's RuntimeError ("DefaultCPUAllocator: can't
#: allocate memory: you tried to allocate ... bytes") and a GPU's OutOfMemoryError ("CUDA out of
#: memory"), both RuntimeErrors.
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory")


@contextlib.contextmanager
def out_of_memory_as_memory_error() -> Iterator[None]:
    """Torch's out-of-memory RuntimeErrors raised inside become :class:`MemoryError`, the one
    type numpy and Python raise for the same condition, so that every entry point says one
    thing for it (``peaknet2cxi``'s one-line error with what to lower, DIALS' user error, a
    ``MemoryError`` from the Python API).  Why: a user trial on 16-Mpx frames under a memory
    limit got a 65-line traceback ending in a torch RuntimeError from ``peaknet2cxi`` (a numpy
    ``ArrayMemoryError`` at another limit) and, inside DIALS, a request to report the crash to
    DIALS' developers."""
    try:
        yield
    except RuntimeError as exc:
        said = str(exc).lower()
        if not any(words in said for words in _OUT_OF_MEMORY):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if "memory" in line),
                     str(exc).strip())
        raise MemoryError(f"the model ran out of memory ({first})") from exc
