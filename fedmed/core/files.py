"""Atomic file writes: a reader, or a crash, never sees half a file."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path, *, private: bool = True) -> Iterator[Path]:
    """A fresh temporary path beside `path` to write to; it replaces `path` only if the block succeeds.

    Beside it, so the final rename stays on one file system and is atomic. A replaced file keeps its
    permissions (an admin's chmod 600 on a config survives); a new one is readable by its owner only,
    or as the umask allows when `private` is false.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    existing = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666))
    try:
        if existing is not None:
            os.chmod(temporary, existing)
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, *, private: bool = True) -> None:
    with atomic_path(path, private=private) as temporary:
        temporary.write_text(text, encoding="utf-8")


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (made if missing), or None when they can.

    Probed by writing, not by permission bits: root, ACLs and read-only mounts make the bits lie.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fedmed-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return error.strerror or type(error).__name__
    return None
