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


def test_the_contents_reach_the_disk_before_the_new_name(tmp_path, monkeypatch):
    """A node that goes down after the rename but before the page cache is written keeps the
    new name over an empty file; the file is flushed before the rename, and the rename
    itself (the folder) before the block returns."""
    import os

    from peaknet_xtal import atomic

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync " + ("folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.write_text_atomic(tmp_path / "summary.json", "{}\n")
    assert events == ["fsync file", "rename", "fsync folder"]
    assert (tmp_path / "summary.json").read_text() == "{}\n"
