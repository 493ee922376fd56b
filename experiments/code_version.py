"""The commit a benchmark's results were measured at, for the caches benchmarks keep between runs."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str:
    """`git describe --always --dirty` of this checkout ("-dirty": uncommitted changes), or "unknown"."""
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    )
    return described.stdout.strip() or "unknown"
