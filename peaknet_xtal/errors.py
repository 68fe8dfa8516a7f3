"""Exceptions raised for bad input.

Every reader raises :class:`FormatError` (or a subclass) for malformed input, carrying the file and
the place inside it (line number or HDF5 dataset), so that a user with a thousand files knows which
one to look at and where.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
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


def require_dials(what: str, *modules: str, otherwise: str = "", load: bool = True) -> None:
    """Import ``modules`` (default: dxtbx's models) or raise :class:`DialsUnavailable`, one
    line saying that ``what`` (an option, ``--dials``; an input, ``reading x.cbf through
    dxtbx``) needs DIALS, with the import's own error, and ``otherwise``, what else the user
    can do (``give the detector's geometry with -g``), at its end.

    ``load=False`` only looks for their packages, importing nothing: for a check before a run
    whose model has yet to run.  Why: cctbx's stub OpenMP, loaded before torch, limits torch
    to one thread (:func:`peaknet_xtal.threads.openmp_shadowed`), so a check that imported
    DIALS there would slow a run that imports it only at its end (``--dials``); the import
    itself, where the run makes it, then says what a DIALS that is there but fails to load
    says.

    Why at all: DIALS is no pip requirement (no PyPI package holds dxtbx/cctbx), and a run
    without it ended in a traceback (``No module named 'dials'``) after every frame had been
    found, or at the first CBF file.  The import's own words stay in the message because a
    DIALS that is installed but fails to load (Debian's without ``LIBTBX_BUILD``, or under
    numpy 2) ends here too, and only they say what is wrong with it."""
    for name in modules or ("dxtbx.model.experiment_list",):
        try:
            if load:
                importlib.import_module(name)
            else:
                top = name.partition(".")[0]
                if importlib.util.find_spec(top) is None:
                    raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        except Exception as exc:  # noqa: BLE001 - a broken DIALS raises OSError and more
            raise DialsUnavailable(_dials_message(what, exc, otherwise)) from exc


def _dials_message(what: str, exc: Exception, otherwise: str) -> str:
    said = " ".join(str(exc).split())
    missing = (isinstance(exc, ModuleNotFoundError)
               and (exc.name or "").split(".")[0] in DIALS_PACKAGES)
    if missing:
        message = (f"{what} needs DIALS, which this Python cannot import ({said}): install "
                   "Debian's dials package or a conda DIALS and run from that environment "
                   "(README, Quick start)")
    else:
        message = (f"{what} needs DIALS, which is installed but fails to load in this Python "
                   f"({type(exc).__name__}: {said}): Debian's DIALS needs "
                   "LIBTBX_BUILD=/usr/lib/cctbx/python3.11 and numpy < 2 (README, Quick start)")
    return f"{message}; or {otherwise}" if otherwise else message


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
