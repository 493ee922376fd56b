"""Atomic writes: the old file survives a failed write, a replaced file keeps its permissions, new files
are private unless asked otherwise."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedmed.core.files import atomic_path, write_text_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:  # noqa: PT012 - it must fail mid-write
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "site.toml"
    target.write_text("old")
    target.chmod(0o600)
    write_text_atomic(target, "new")
    assert (target.read_text(), _mode(target)) == ("new", 0o600)
    target.chmod(0o640)
    write_text_atomic(target, "newer")
    assert _mode(target) == 0o640


def test_new_files_are_private_unless_shared(tmp_path: Path) -> None:
    write_text_atomic(tmp_path / "local.json", "{}")
    assert _mode(tmp_path / "local.json") == 0o600
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "dataset.json", "{}", private=False)
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "dataset.json") == 0o644
