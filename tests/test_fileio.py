"""Atomic writes: all or nothing, and files readable by others (a Triton server, a wheel)."""

import os
import stat

import pytest

from mpdeploy.fileio import atomic_dir, atomic_path, write_json


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_written_files_and_dirs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_atomic_dir_replace_and_refuse(tmp_path):
    target = tmp_path / "build"
    with atomic_dir(target) as d:
        (d / "v").write_text("1")
    with pytest.raises(FileExistsError), atomic_dir(target) as d:
        (d / "v").write_text("2")
    assert (target / "v").read_text() == "1"
    with atomic_dir(target, replace=True) as d:
        (d / "v").write_text("3")
    assert (target / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]
