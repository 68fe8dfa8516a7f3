"""A labelling run's checks made before any work (labelling/job.py)."""
from __future__ import annotations

import os

import pytest

from peaknet_xtal.errors import FormatError
from peaknet_xtal.labelling.job import check_output, label_run


def test_check_output_refuses_what_cannot_become_the_label_file(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FormatError, match="is a folder") as err:
        check_output(tmp_path / "folder")
    assert err.value.path == str(tmp_path / "folder")
    with pytest.raises(FormatError, match=r"file is not a folder"):
        check_output(tmp_path / "file" / "deeper" / "labels.h5")
    with pytest.raises(FormatError, match="not a regular file"):
        check_output(os.devnull)
    check_output(tmp_path / "new" / "sub" / "labels.h5")  # folders to be made are fine
    # a finished label file is replaced only when asked (a rerun with other settings or
    # inputs replaced a run's labels without a word), and then at the end
    with pytest.raises(FormatError, match="already holds a finished label file: give "
                       "--overwrite"):
        check_output(tmp_path / "file")
    check_output(tmp_path / "file", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # no probe left


def test_label_run_checks_its_output_before_reading_the_inputs(tmp_path):
    """Python callers get the same check: before the (here missing) inputs are read."""
    (tmp_path / "out").mkdir()
    with pytest.raises(FormatError, match="is a folder"):
        label_run([str(tmp_path / "missing.stream")], tmp_path / "out", {"run": {"ray": False}},
                  progress=False)


def test_dials_results_without_dials_are_refused_before_any_input_is_read(tmp_path,
                                                                          monkeypatch):
    """In a Python without DIALS, the inputs before an .expt were read and the .expt then
    failed with a traceback (No module named 'dxtbx').  It is now named first, with what to
    do: the broken stream before it is not even read."""
    from peaknet_test_support import hide_dials

    broken = tmp_path / "broken.stream"
    broken.write_text("CrystFEL stream format 2.3\ngarbage line\n")
    expt, refl = tmp_path / "stills.expt", tmp_path / "stills.refl"
    expt.write_text("{}")
    refl.write_bytes(b"")
    hide_dials(monkeypatch)
    with pytest.raises(ImportError, match=rf"^reading {expt} \(a DIALS experiment list\) needs "
                       r"DIALS, which this Python cannot import \(No module named 'dxtbx'\)"):
        label_run([str(broken), str(expt), str(refl)], tmp_path / "labels.h5",
                  {"run": {"ray": False}}, progress=False)
