from __future__ import annotations

import pytest

from peaknet_xtal.atomic import atomic_path, write_json_atomic


def test_failed_block_leaves_old_content_and_no_temp_files(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_successful_block_replaces_target(tmp_path):
    target = tmp_path / "new" / "out.json"
    write_json_atomic(target, {"x": [1, 2]})
    assert target.read_text().strip().startswith("{")
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    target = tmp_path / "shared.json"
    old = os.umask(0o022)
    try:
        write_json_atomic(target, {})
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644


def test_an_output_folder_that_cannot_be_made_is_said_in_words(tmp_path):
    """``[Errno 17] File exists: 'afile'`` read like a crash: a file in the way and a place
    no folder can be made are each one line naming the path and why, with no OSError behind
    it (peaknet2cxi offered to continue a run that never began)."""
    from peaknet_xtal.atomic import make_output_folder
    from peaknet_xtal.errors import PeakNetError

    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    with pytest.raises(PeakNetError, match=f"^{afile}: exists and is a file"):
        make_output_folder(afile)
    inside = afile / "out"
    with pytest.raises(PeakNetError, match=f"^{inside}: cannot create the output folder") as err:
        make_output_folder(inside)
    assert err.value.__context__ is None and err.value.__cause__ is None
    assert afile.read_text() == "mine\n"
    assert make_output_folder(tmp_path / "a" / "b").is_dir()
