"""Thread defaults that fit the machine: affinity, cgroup quota, load and worker count."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peaknet_xtal import threads


def test_available_cores_follow_the_affinity_mask():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from peaknet_xtal.threads import available_cores, default_threads; "
            "print(available_cores(), default_threads(load_aware=False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    assert out.stdout.split() == ["1", "1"]


def test_cgroup_quota_caps_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2.5)
    assert threads.available_cores() == 2
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.available_cores() == 8


@pytest.mark.parametrize(("cores", "load", "workers", "expected"), [
    (8, 1.0, 1, 8),    # idle but for this process
    (8, 1.0, 4, 2),    # four workers share the cores
    (2, 2.0, 1, 1),    # one competing process on 2 cores: one thread, not two
    (2, 9.0, 1, 1),    # overloaded: still one
    (16, 5.0, 3, 4),   # 4 cores busy elsewhere, 12 free for 3 workers
])
def test_default_threads_never_oversubscribe(monkeypatch, cores, load, workers, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.default_threads(workers) == expected
    assert threads.default_threads(workers, load_aware=False) == max(1, cores // workers)


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` run in a clean Python process (its torch threads its own), which succeeds."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=dict(os.environ), timeout=300)


def test_engine_takes_the_default_when_no_threads_are_given():
    """In a clean process (no cctbx stubs) the engine's model runs at default_threads(), and
    the process keeps its own setting for the rest of the script."""
    code = ("import logging, numpy, torch; logging.basicConfig(level=logging.INFO)\n"
            "from unittest import mock\n"
            "from peaknet_xtal.finding.engine import InferenceEngine\n"
            "seen = []\n"
            "class Model(torch.nn.Module):\n"
            "    def forward(self, x, m):\n"
            "        seen.append(torch.get_num_threads())\n"
            "        return torch.zeros(x.shape[0], 2, *x.shape[2:])\n"
            "torch.set_num_threads(2)\n"
            "panel = numpy.arange(64, dtype=numpy.float32).reshape(8, 8)\n"
            "with mock.patch('peaknet_xtal.threads.default_threads', return_value=1):\n"
            "    InferenceEngine(Model(), device='cpu').predict_panels([panel])\n"
            "print(seen, torch.get_num_threads())\n")
    out = _python(code)
    assert out.stdout.strip().splitlines()[-1] == "[1] 2"
    assert "torch thread(s) by default" in out.stderr


def test_the_processs_own_lower_setting_is_a_ceiling():
    """A script that runs several processes sets one thread each (torch.set_num_threads,
    OMP_NUM_THREADS); the default raised it to the cores it saw free (a user trial: 1 -> 2 in
    each MPI-style rank), oversubscribing the machine.  An explicit count still wins."""
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from unittest import mock\n"
            "from peaknet_xtal import threads\n"
            "threads.openmp_shadowed = lambda: None\n"
            "torch.set_num_threads(1)\n"
            "with mock.patch('peaknet_xtal.threads.default_threads', return_value=2):\n"
            "    print(threads.use_torch_threads(None), torch.get_num_threads())\n"
            "    print(threads.use_torch_threads(2), torch.get_num_threads())\n")
    out = _python(code)
    assert out.stdout.split("\n")[:2] == ["1 1", "2 2"]
    assert "the process's own setting" in out.stderr and "2 torch thread(s) as asked" in out.stderr


def test_the_stub_line_names_the_default_threads_it_takes():
    """With no thread count asked for, the line says the threads the default would have given
    (it said nothing of them: it passed on the count asked for, None)."""
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from unittest import mock\n"
            "from peaknet_xtal import threads\n"
            "threads.openmp_shadowed = lambda: 'libomptbx.so.0'\n"
            "with mock.patch('peaknet_xtal.threads.default_threads', return_value=2):\n"
            "    print(threads.use_torch_threads(None), torch.get_num_threads())\n")
    out = _python(code)
    assert out.stdout.split("\n")[0] == "1 1"
    assert "WARNING" in out.stderr and "1 CPU thread per process, not 2: libomptbx" in out.stderr


def test_a_forked_child_runs_one_thread():
    """A fork Pool after the parent has run torch: the GNU OpenMP runtime of a parent that ran
    parallel regions hung the child's first one (a user trial, for good, at 2 threads), and
    the workers oversubscribed the cores; a forked child now starts at one thread."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once
            os.write(write, str(torch.get_num_threads()).encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        assert os.read(read, 16).decode() == "1"
        os.close(read)
        assert torch.get_num_threads() == 2  # the parent keeps its own
    finally:
        torch.set_num_threads(before)


def test_stub_message_names_the_library_and_the_way_out():
    line = threads.stub_openmp_message("libomptbx.so.0", 4)
    assert "libomptbx.so.0" in line and "per process, not 4: " in line and "\n" not in line
    assert "mp.nproc=N" in line and "--workers N" in line
