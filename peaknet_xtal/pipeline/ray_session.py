"""The one place Ray is started and stopped: :func:`ray_session`.

Both Ray users -- the inference pipeline (``peaknet2cxi --workers N``) and the labelling engine
(``stream2labels``) -- enter this context manager, so a local Ray is configured the same way
everywhere (CPU count, no dashboard, one BLAS thread per task), a cluster is joined the same way
(``address``), and a Ray that the caller already started is reused and left running.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: Default CPUs of a local Ray (the project's development machines have two cores).
DEFAULT_NUM_CPUS = 2
#: Worker environment of a local Ray: each task is one core, BLAS included.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """``with ray_session() as ray: ...``: Ray initialised for the block, shut down after it.

    A local session uses ``num_cpus`` (default 2) and no dashboard; ``address`` (``auto`` or
    ``host:port``) joins a running cluster instead.  A session that was already up is reused and
    not shut down, so library code can nest inside an application's own session.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    # log_to_driver=False: the stage processes' output (every worker's INFO lines, Ray's own
    # chatter, prefixed "(ModelWorker pid=...)") stays in Ray's log files, off the terminal and
    # the progress bar; the project's warnings from them reach the user through the pipeline's
    # relay instead (pipeline/worker_logs.py)
    try:
        with _keeping_sigterm_handler():
            if address:
                check_reachable(address)
                ray.init(address=address, log_to_driver=False)
            else:
                # address="local": a Ray of its own, whatever RAY_ADDRESS, a `ray start` head
                # on this node or a stale /tmp/ray/ray_current_cluster says (Ray joined those,
                # then refused its own num_cpus: "When connecting to an existing cluster,
                # num_cpus and num_gpus must not be provided")
                ray.init(address="local", num_cpus=num_cpus or DEFAULT_NUM_CPUS,
                         include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": dict(WORKER_ENV)})
    except BaseException:  # a stop while Ray started: what it started goes with it
        if ray.is_initialized():
            ray.shutdown()
        raise
    try:
        yield ray
    finally:
        ray.shutdown()


#: Seconds a cluster address is given to answer before the run is refused.
CONNECT_TIMEOUT = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """A ConnectionError naming ``address`` when nothing accepts a connection there within
    ``timeout`` seconds (``auto`` and addresses without a port are left to Ray).  Why: Ray
    retries an unreachable cluster for minutes, printing a retry line a second, before it
    fails (a trial: killed after 3 minutes, no error of its own)."""
    import socket

    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster answers at {address} ({exc}); start one there "
                              "(ray start --head) or check the address") from None


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """``ray.init`` replaces the driver's SIGTERM handler with one that calls ``sys.exit(15)``
    (Ray's documented behaviour): a command that handles SIGTERM itself (``peaknet2cxi``: as
    Ctrl-C, exit 143, the run's record saying so; the pipeline: a stop request) would lose that
    to a bare exit with status 15.  A handler of the caller's own (a Python function) is put back
    after it; Python's default (die at once) is left to Ray's, which at least shuts Ray down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as exc:
        # a SIGTERM that came while Ray started met Ray's handler (exit 15, nothing said): it
        # is the caller's stop, as one a moment later would be
        if exc.code != signal.SIGTERM or not callable(before):
            raise
        signal.signal(signal.SIGTERM, before)
        before(signal.SIGTERM, None)
        raise
    finally:
        if callable(before) and signal.getsignal(signal.SIGTERM) is not before:
            signal.signal(signal.SIGTERM, before)
