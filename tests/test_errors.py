"""The package's errors travel between processes intact (Ray actors raise them far from users)."""
from __future__ import annotations

import pickle

import pytest
from ray import cloudpickle  # what Ray sends an actor's exception with

import peaknet_xtal.config
import peaknet_xtal.labelling.job  # noqa: F401  (registers its FormatError subclass)
from peaknet_xtal.errors import FormatError


def _every_format_error() -> list[type[FormatError]]:
    found, todo = [], [FormatError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _every_format_error(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_a_format_error_pickles_with_its_file_place_and_message(cls, dumps):
    error = cls("/data/run7.cxi", "no image dataset", line=12, dataset="/entry_1/data_1/data")
    error.hint = "use another output folder"  # what a raiser adds to it travels too
    back = pickle.loads(dumps(error))
    assert type(back) is cls
    assert (back.path, back.message, back.line, back.dataset) == (
        "/data/run7.cxi", "no image dataset", 12, "/entry_1/data_1/data")
    assert str(back) == str(error)
    assert back.hint == "use another output folder"


def test_config_errors_are_format_errors():
    assert issubclass(peaknet_xtal.config.ConfigError, FormatError)


def test_torch_running_out_of_memory_becomes_a_memory_error_and_nothing_else_does():
    """Torch's CPU allocator says it with a RuntimeError (a real one here), numpy with a
    MemoryError: one type for every entry point to say it by."""
    import torch

    from peaknet_xtal.errors import out_of_memory_as_memory_error

    with pytest.raises(MemoryError, match="ran out of memory .*can't allocate memory"):
        with out_of_memory_as_memory_error():
            torch.empty(2 ** 50, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with out_of_memory_as_memory_error():
            torch.ones(2, 3) @ torch.ones(2, 3)


@pytest.mark.parametrize("load", [True, False], ids=["imported", "looked-for"])
def test_dials_missing_is_one_line_naming_what_needs_it_and_the_import_error(monkeypatch, load):
    """A Python without DIALS (pip alone): what needs it, the import's own words, and what to
    do, in one line; an ImportError too, for callers who try DIALS and go on without it."""
    from peaknet_test_support import hide_dials

    from peaknet_xtal.errors import DialsUnavailable, PeakNetError, require_dials

    hide_dials(monkeypatch)
    with pytest.raises(DialsUnavailable) as info:
        require_dials("reading images/x.cbf through dxtbx", "dxtbx.model.experiment_list",
                      otherwise="give -g", load=load)
    said = str(info.value)
    assert said.startswith("reading images/x.cbf through dxtbx needs DIALS, which this Python "
                           "cannot import (No module named 'dxtbx'): install Debian's dials "
                           "package or a conda DIALS")
    assert said.endswith("; or give -g") and "\n" not in said
    assert isinstance(info.value, ImportError) and isinstance(info.value, PeakNetError)
    for dumps in (pickle.dumps, cloudpickle.dumps):  # raised in a Ray actor, it arrives whole
        back = pickle.loads(dumps(info.value))
        assert type(back) is DialsUnavailable and str(back) == said


def test_a_dials_that_fails_to_load_is_said_with_its_own_error(monkeypatch):
    """Debian's DIALS without LIBTBX_BUILD raises a FileNotFoundError on import: importing it
    says the module and its error, not 'install'."""
    from peaknet_test_support import hide_dials

    from peaknet_xtal.errors import DialsUnavailable, require_dials

    hide_dials(monkeypatch, broken=FileNotFoundError(2, "No such file or directory",
                                                      "/venv/lib/cctbx/python3.11"))
    with pytest.raises(DialsUnavailable) as info:
        require_dials("--dials", "dials.array_family.flex")
    said = str(info.value)
    assert said.startswith("--dials needs DIALS, which is installed but fails to load in this "
                           "Python (importing dials.array_family.flex: FileNotFoundError: "
                           "[Errno 2] No such file or directory: '/venv/lib/cctbx/python3.11')")
    assert "LIBTBX_BUILD" in said and "install Debian" not in said


@pytest.mark.dials
@pytest.mark.parametrize("crash", [False, True], ids=["import-error", "crash"])
def test_the_check_at_a_start_imports_dials_in_a_child_and_names_what_failed(
        tmp_path, monkeypatch, crash):
    """A user trial: a DIALS whose compiled extension does not load passed the check at
    peaknet2cxi's start, which only looked for its packages, and stopped the run at the
    export, after all the finding.  The check (load=False) now imports the modules in a child
    process: one line naming the module, its error (or the signal that ended its importer)
    and, made before anything is written, that nothing was; this process imports nothing of
    DIALS (cctbx's OpenMP, loaded before torch, would hold it to one thread)."""
    from peaknet_test_support import break_dials

    from peaknet_xtal.errors import DialsUnavailable, require_dials

    broken = break_dials(monkeypatch, tmp_path / "broken", crash=crash)
    with pytest.raises(DialsUnavailable) as info:
        require_dials("--dials", "dxtbx.model.experiment_list", "dials.array_family.flex",
                      otherwise="run without --dials", load=False, before_writing=True)
    failed = "killed by SIGSEGV" if crash else f"ImportError: {broken}"
    assert str(info.value) == (
        "--dials needs DIALS, which is installed but fails to load in this Python (importing "
        f"dials.array_family.flex: {failed}): Debian's DIALS needs "
        "LIBTBX_BUILD=/usr/lib/cctbx/python3.11 and numpy < 2 (README, Quick start); or run "
        "without --dials; nothing was written")


@pytest.mark.dials
def test_a_dials_that_loads_passes_the_check_without_being_imported_here():
    """The check at a start, in a fresh process with a DIALS that loads: nothing said, and
    none of DIALS' packages imported in the process that asked."""
    import subprocess
    import sys

    code = ("import sys; from peaknet_xtal.errors import DIALS_PACKAGES, require_dials; "
            "require_dials('--dials', 'dials.array_family.flex', load=False); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in DIALS_PACKAGES))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.dials
def test_the_check_at_a_start_starts_no_child_where_the_modules_are_loaded(monkeypatch):
    """Inside DIALS (a cctbx script calling ``PeakFinder.find_reflections``) the modules are
    loaded already: the check asks no child process (a second of DIALS' import) to load them
    again."""
    import dials.array_family.flex  # noqa: F401  (loaded, as in a DIALS process)

    import peaknet_xtal.errors as errors

    def child(*args):
        raise AssertionError("a child process was asked to import loaded modules")

    monkeypatch.setattr(errors, "_import_in_a_child", child)
    errors.require_dials("--dials", "dials.array_family.flex", load=False)
