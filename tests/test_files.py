"""pipelines/files.py: written files readable by the team (0644), renames made durable, and a
directory replaced with no moment where it is missing."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from pipelines import files


def test_written_files_are_0644_and_their_folder_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real = files._fsync_dir
    monkeypatch.setattr(files, "_fsync_dir", lambda p: (synced.append(p), real(p)))
    old = os.umask(0o077)  # a restrictive umask must not hide outputs
    try:
        files.write_json({"a": 1}, tmp_path / "out" / "x.json")
        files.write_bytes(b"data", tmp_path / "y.bin")
    finally:
        os.umask(old)
    for p in (tmp_path / "out" / "x.json", tmp_path / "y.bin"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert synced == [tmp_path / "out", tmp_path]  # after each rename
    assert not list(tmp_path.rglob("*.tmp"))


def test_replace_dir_swaps_with_no_moment_without_the_target(tmp_path):
    target = tmp_path / "export"
    first = tmp_path / "new1"
    first.mkdir()
    (first / "v").write_text("1")
    files.replace_dir(first, target)  # no target yet: a rename
    assert (target / "v").read_text() == "1" and not first.exists()

    second = tmp_path / "new2"
    second.mkdir()
    (second / "v").write_text("2")
    seen = []
    files.replace_dir(second, target, between=lambda: seen.append((target / "v").read_text()))
    assert seen == ["2"]  # already swapped in when the old one is still being removed
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the old one is gone


def test_replace_dir_without_an_atomic_exchange_still_ends_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a file system without renameat2
    target = tmp_path / "export"
    for v in ("1", "2"):
        new = tmp_path / f"new{v}"
        new.mkdir()
        (new / "v").write_text(v)
        files.replace_dir(new, target)
    assert (target / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's; elsewhere replace_dir falls back")
def test_exchange_is_atomic_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    (b / "y").touch()
    assert files._exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]
