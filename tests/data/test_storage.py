"""Atomic writes: the file holds exactly what was written (text as UTF-8, bytes as they are), gets the
permissions a plain open() would give under the current umask, and a failed write leaves the old
file and no temporary file behind."""

from __future__ import annotations

import os

import pytest

from cascade_bench.data import storage
from cascade_bench.data.storage import write_bytes_atomic, write_json_atomic, write_text_atomic


def test_text_bytes_and_json_arrive_whole_with_plain_permissions(tmp_path):
    write_text_atomic(tmp_path / "deep" / "a.txt", "héllo\n")
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\xff")
    write_json_atomic(tmp_path / "c.json", {"x": 1})
    (tmp_path / "plain.txt").write_text("")  # what open() makes under this process's umask
    assert (tmp_path / "deep" / "a.txt").read_bytes() == "héllo\n".encode("utf-8")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "c.json").read_text() == '{\n  "x": 1\n}\n'
    for name in ("deep/a.txt", "b.bin", "c.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777, name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "kept.txt"
    path.write_text("old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
    assert os.path.exists(path)
