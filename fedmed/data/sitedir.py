"""Writing a site folder safely: build it beside the target, then move it into place in one rename.

A crash half-way leaves only a hidden staging folder, never a site that looks complete; two processes
generating the same site at once end with one intact copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedmed.core.log import logger

from .manifest import MANIFEST_NAME
from .problems import DataOutputError


def stored_fedmed_section(site_dir: Path) -> dict[str, Any] | None:
    """The "fedmed" section of an existing dataset.json, or None when there is none to read."""
    try:
        raw = json.loads((site_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    section = raw.get("fedmed") if isinstance(raw, dict) else None
    return section if isinstance(section, dict) else None


def listed_files_exist(site_dir: Path) -> bool:
    try:
        raw = json.loads((site_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        entries = list(raw.get("training", [])) + list(raw.get("validation", []))
        for entry in entries:
            for key in ("image", "label"):
                value = entry.get(key)
                if isinstance(value, str) and not (site_dir / value).is_file():
                    return False
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    return True


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_replaceable(target: Path) -> None:
    """Refuse to delete a folder that is not a site folder: overwrite must never eat unrelated data."""
    if not target.exists() or is_empty_dir(target):
        return
    if not target.is_dir() or not (target / MANIFEST_NAME).is_file():
        raise DataOutputError(
            f"{target}: exists and is not a site folder (no {MANIFEST_NAME}); refusing to overwrite it. "
            "Fix: choose another output folder, or move that folder away"
        )


@contextlib.contextmanager
def staging_dir(parent: Path, *, name: str) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, target: Path, *, replace: bool) -> bool:
    """Move `staging` to `target`; returns False when another writer got there first (and replace is off)."""
    old: Path | None = None
    if target.exists():
        if is_empty_dir(target):
            target.rmdir()
        elif replace:
            old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            os.rename(target, old)
        else:
            return False
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        if target.exists():
            logger.info("%s was written by another process meanwhile; keeping that copy", target)
            return False
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True
