"""Atomic file output: a crash never leaves a half-written file under the final name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The temporary file lives in the same directory so the final ``os.replace`` is atomic on POSIX.
    Its contents reach the disk before the rename, and the rename before the block returns
    (``fsync`` of the file, then of the folder): without them a machine that goes down (a
    node's reboot) may keep the new name over an empty file, which a rerun would take for a
    finished one (a CXI file it cannot read refuses the whole output folder).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            # mkstemp creates 0600; results must be readable like any file the user writes.
            os.chmod(tmp_path, 0o666 & ~_umask())
            _fsync(tmp_path)
        os.replace(tmp_path, final)
        _fsync(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk; a file system that cannot
    (some network ones) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_parts(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what :func:`atomic_path` left of ``path`` in a process killed while it wrote
    (``.NAME.*.part``, which only a kill -9 leaves: the block's end removes it otherwise);
    for a file one run writes once, before it writes it again (two processes writing the
    same file at once would race anyway).  Returns what was removed."""
    final = Path(path)
    removed = []
    for stale in final.parent.glob(f".{final.name}.*.part"):
        try:
            stale.unlink()
            removed.append(stale)
        except OSError:
            continue
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def make_output_folder(path: str | os.PathLike[str]) -> Path:
    """Create an output folder (and its parents); where that cannot be done, a PeakNetError
    naming it and why in words (an existing file of that name, a folder one cannot write in),
    not the bare ``[Errno 17] File exists`` that reads like a crash."""
    from peaknet_xtal.errors import PeakNetError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise PeakNetError(f"{folder}: exists and is a file; the output is a folder: give "
                           "another name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError as exc:
        why = exc.strerror or str(exc)
    # raised outside the handler: said in full, and no OSError behind it that would make a
    # command offer to continue a run that never began
    raise PeakNetError(f"{folder}: cannot create the output folder here ({why}): choose a "
                       "place you can write to")
