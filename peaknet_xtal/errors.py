"""Exceptions raised for bad input.

Every reader raises :class:`FormatError` (or a subclass) for malformed input, carrying the file and
the place inside it (line number or HDF5 dataset), so that a user with a thousand files knows which
one to look at and where.
"""
from __future__ import annotations

import contextlib
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
