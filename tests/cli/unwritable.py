"""Folders that refuse writes with the operating system's own error, for tests of output-folder handling.

Root ignores permission bits, so a chmod 0o555 folder is writable to it: as root these are real tmpfs
mounts (read-only, or too small), and a test skips, saying why, where mounting is not allowed. Anyone else
gets a chmod 0o555 folder, which the kernel refuses with EACCES.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """An empty folder at `path` in which creating anything fails (EROFS as root, EACCES otherwise)."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    with _tmpfs(path, options="ro,size=64k"):
        yield path


@contextlib.contextmanager
def full_folder(path: Path, *, size_kib: int) -> Iterator[Path]:
    """An empty folder at `path` on a file system of `size_kib` KiB, so that a larger write fails with ENOSPC."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("a small file system to fill needs a tmpfs mount, which only root may make")
    with _tmpfs(path, options=f"size={size_kib}k"):
        yield path


@contextlib.contextmanager
def _tmpfs(path: Path, *, options: str) -> Iterator[None]:
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "fedmed-test", str(path)], capture_output=True, text=True
        )
        reason = mounted.stderr.strip() or f"exit code {mounted.returncode}"
    except FileNotFoundError:
        mounted, reason = None, "no mount command"
    if mounted is None or mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({reason}), and root ignores permission bits, so no folder can refuse "
            "its writes"
        )
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)
