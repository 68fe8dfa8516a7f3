"""Running DIALS command-line programs from Python, as the venv's users do.

The tests and the benchmark drive real ``dials.*`` commands: that is what users run, and it is
the only way to exercise entry-point discovery, PHIL parsing and DIALS' worker processes exactly
as in production.  The commands must be the ones beside this interpreter (the project venv's
wrappers), because only those see this package's entry points.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


class DialsCommandError(RuntimeError):
    """A ``dials.*`` command exited non-zero; the message holds the tail of its output, and
    ``stderr`` what it wrote there (where a command that stops with ``sys.exit(message)``, as
    dials.index does on an indexing error, leaves its reason)."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def dials_program(command: str, path: str | None = None) -> str:
    """Path of ``dials.<command>``: beside ``sys.executable`` first, else on ``path``/PATH."""
    beside = Path(sys.executable).parent / f"dials.{command}"
    if beside.exists():
        return str(beside)
    found = shutil.which(f"dials.{command}", path=path)
    if found is None:
        raise DialsCommandError(f"dials.{command} is neither beside {sys.executable} nor on PATH")
    return found


def dials_environment(base: Mapping[str, str] | None = None, threads: int = 1) -> dict[str, str]:
    """``base`` (default: this process's environment) with this venv's ``bin`` first on PATH,
    Debian's cctbx build path, and BLAS/OpenMP limited to ``threads`` per DIALS process."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("LIBTBX_BUILD", "/usr/lib/cctbx/python3.11")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_dials(command: str, *args: str, cwd: str | os.PathLike[str],
              env: Mapping[str, str] | None = None, timeout: float = 900) -> tuple[str, float]:
    """Run ``dials.<command> args...`` in ``cwd``; return (stdout, wall seconds).

    Raises :class:`DialsCommandError` with the last lines of the output when the command fails,
    so a failing test or benchmark shows DIALS' own explanation.
    """
    environ = dict(os.environ if env is None else env)
    program = dials_program(command, environ.get("PATH"))
    start = time.perf_counter()
    proc = subprocess.run([program, *args], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=timeout)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise DialsCommandError(f"dials.{command} {' '.join(args)} exited {proc.returncode}:\n"
                                f"{tail}", proc.stderr)
    return proc.stdout, elapsed


#: How a DIALS program's last words begin: its user error, or an exception's name.
_LAST_WORDS = re.compile(r"^(Sorry|[A-Za-z_.]*(Error|Exception)):")


def dials_reason(text: str, stderr: str = "", limit: int = 200) -> str:
    """DIALS' reason for a failure, at most ``limit`` characters: the last user error
    ("Sorry: ...") or exception in its output with the lines after it, joined; else the last
    paragraph of what it wrote to ``stderr`` (dials.index ends with ``sys.exit(message)``);
    else the output's last line.  Its messages run over several lines, and the last alone was
    a fragment ("sanity check set disable_unit_cell_volume_sanity_check=True.")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for k in range(len(lines) - 1, -1, -1):
        if _LAST_WORDS.match(lines[k]):
            return " ".join(lines[k:])[:limit]
    paragraphs = [" ".join(line.strip() for line in block.splitlines() if line.strip())
                  for block in re.split(r"\n\s*\n", stderr)]
    paragraphs = [p for p in paragraphs if p]
    if paragraphs:
        return paragraphs[-1][:limit]
    return lines[-1][:limit] if lines else ""


def stills_process_status(debug_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Last ``dials.stills_process`` status per image (``index_ok_N``, ``index_failed``, ...).

    stills_process records every step of every image in ``debug/*.txt`` as CSV lines
    ``host,image,time,done?,status``; the last status of an image is its outcome.
    """
    status: dict[str, str] = {}
    for log in sorted(Path(debug_dir).glob("*.txt")):
        for line in log.read_text().splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) >= 5:
                status[fields[1]] = fields[4]
    return status
