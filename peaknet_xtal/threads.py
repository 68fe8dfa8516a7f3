"""CPU threads that fit the machine: never more torch threads than free cores.

Why: torch's intra-op pool ends every parallel region at a barrier, so one of its threads
descheduled by another process stalls all the others.  On a 2-core machine with one competing
process, torch's default (one thread per core) ran ``peaknet2cxi`` 3-11 times slower than one
thread.  The default here is therefore

    cores this process may run on (``os.sched_getaffinity``, and a cgroup CPU quota if lower)
    minus the cores other processes keep busy (1-minute load average, less this process)
    divided by the worker processes sharing them on this host,

at least 1.  An explicit thread count always wins.  ``benchmarks/bench_threads.py`` measures the
default against ``--threads 1`` on a loaded machine.  :func:`torch_threads_for` chooses it for
everything that runs torch on the CPU, one thread where cctbx's stub OpenMP would make more give
wrong results (:func:`openmp_shadowed`); ``peaknet-integrate`` sets it for the process
(:func:`use_torch_threads`), the finding engine only while its model runs (:func:`torch_threads`),
since a script's own torch work goes on in the same process.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by ``/sys/fs/cgroup/cpu.max`` ("max" or "QUOTA PERIOD"), None if unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except OSError:
        return None
    if len(text) != 2 or text[0] == "max":
        return None
    try:
        return float(text[0]) / float(text[1])
    except (ValueError, ZeroDivisionError):
        return None


def busy_cores(own: float = 1.0) -> float:
    """Cores other processes keep busy: the 1-minute load average less ``own`` (this process,
    which is usually running while it asks)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    return max(0.0, load - own)


def default_threads(workers: int = 1, *, load_aware: bool = True) -> int:
    """torch threads for one of ``workers`` processes sharing this host (module docstring)."""
    cores = available_cores()
    free = cores - math.ceil(busy_cores() - 0.25) if load_aware else cores  # 0.25: noise
    return max(1, min(cores, free) // max(1, int(workers)))


def describe_default(workers: int = 1) -> str:
    """One line saying how :func:`default_threads` came to its number."""
    return (f"{default_threads(workers)} torch thread(s) by default: {available_cores()} "
            f"core(s) available to this process, {busy_cores():.1f} busy with other work "
            f"(load average), {workers} worker process(es)")


def stub_openmp_message(library: str, requested: int | None) -> str:
    """The one line users see when cctbx's stub OpenMP forces a single torch thread;
    ``requested``: the threads the run would have had (asked for, or the default)."""
    # "not N": whoever chose N, the user or the default that divides the free cores among a
    # host's worker processes ("asked for 2" read as if the user had, on a default run)
    asked = f", not {requested}" if requested and requested > 1 else ""
    return (f"PeakNet runs on 1 CPU thread per process{asked}: {library}, the stub OpenMP library "
            f"of this cctbx build (Debian's DIALS), shadows the real one, and more threads would "
            f"give wrong results. For parallelism run several processes: mp.nproc=N in "
            f"dials.stills_process (a list of stills), spotfinder.mp.nproc=N in "
            f"dials.find_spots (a sequence), or peaknet2cxi --workers N.")


def openmp_shadowed() -> str | None:
    """The library whose stub ``omp_get_thread_num`` the process resolves first, if not a real
    OpenMP runtime.

    cctbx's ``omptbx`` (imported by dxtbx/DIALS) exports OpenMP stubs when built without OpenMP,
    as Debian's is.  Loaded before torch, the stubs answer "thread 0 of 1" inside torch's OpenMP
    parallel regions, so every thread computes the same chunk and the rest of the output is left
    uninitialised: different, wrong probabilities on every call.  One thread is then the only
    safe setting.
    """
    import ctypes

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        process = ctypes.CDLL(None)
        symbol = process.omp_get_thread_num
        info = DlInfo()
        if not process.dladdr(ctypes.cast(symbol, ctypes.c_void_p), ctypes.byref(info)):
            return None
    except (AttributeError, OSError):
        return None  # no OpenMP symbol in the global scope at all: torch uses its own
    name = os.path.basename((info.dli_fname or b"").decode(errors="replace"))
    real = ("libgomp", "libiomp", "libomp.so", "libomp-")  # GNU, Intel, LLVM runtimes
    return None if name.startswith(real) else name


def _single_thread(torch: Any) -> None:
    """One thread in torch *and* in every real OpenMP runtime mapped into the process: with the
    stubs in front, ``torch.set_num_threads`` cannot reach libgomp, whose parallel regions would
    still start one thread per core."""
    import ctypes
    import re

    torch.set_num_threads(1)
    with open("/proc/self/maps") as maps:
        runtimes = set(re.findall(r"(/\S*/lib(?:gomp|iomp5)[^/\s]*\.so[^/\s]*)", maps.read()))
    for path in sorted(runtimes):
        try:
            ctypes.CDLL(path).omp_set_num_threads(1)
        except (OSError, AttributeError):
            continue


def torch_threads_for(requested: int | None) -> int:
    """torch's CPU threads for a model: ``requested``, else :func:`default_threads` but never
    more than the process's own setting; one where cctbx's stub OpenMP shadows the real runtime
    (:func:`openmp_shadowed`: then set for the whole process, which no more threads can run
    correctly), said in one line (a warning where that takes threads the run would have had)."""
    import torch

    shadow = openmp_shadowed()
    if shadow is not None:
        wanted = int(requested or default_threads())
        (log.warning if wanted > 1 else log.info)("%s", stub_openmp_message(shadow, wanted))
        _single_thread(torch)
        return 1
    if requested:
        log.info("%d torch thread(s) as asked", int(requested))
        return int(requested)
    threads, own = default_threads(), torch.get_num_threads()
    if own < threads:
        # the process's own setting is a ceiling: torch.set_num_threads or OMP_NUM_THREADS in
        # a script that runs several (an MPI rank, a pool worker; a forked one, below), which
        # the default raised to the cores it saw free, oversubscribing the machine
        log.info("%d torch thread(s): the process's own setting (torch.set_num_threads, "
                 "OMP_NUM_THREADS or a forked worker), under the %d the cores would allow",
                 own, threads)
        return own
    log.info("%s", describe_default())
    return threads


def use_torch_threads(requested: int | None) -> int:
    """Set torch's CPU threads for the rest of the process to :func:`torch_threads_for`
    (``requested``), for a command that is the whole process; returns the threads set."""
    import torch

    threads = torch_threads_for(requested)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch at ``threads`` CPU threads inside, the process's own setting back after (an
    exception or Ctrl-C included).  Why: a library call that set them for good changed a
    script's own torch work behind its back (a notebook at torch's 2 threads ran at 1 after
    its first ``PeakFinder.find`` on a loaded machine), and a second finder's setting became
    the first's (``threads=1`` then ran at the other's 2)."""
    import torch

    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_thread_after_fork() -> None:
    """In a forked child of a process that ran torch: one thread.  Why: a pool of forked
    workers shares the parent's cores (several threads each oversubscribe them), and the GNU
    OpenMP runtime of a parent that ran parallel regions hangs a child's first one at its
    barrier (a user trial: a fork Pool after the parent's first find, for good, at 2 threads;
    at 1 it ran), as PyTorch's own DataLoader workers are set to one thread."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.set_num_threads(1)
        except Exception:  # noqa: BLE001 - a child must not fail in a fork hook
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)
