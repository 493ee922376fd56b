"""The Flower App (FAB) that carries a fedmed run, and its digest.

The FAB holds only a pyproject.toml naming fedmed's ServerApp and ClientApp; the code runs from the
fedmed package installed at each party. Flower builds FABs reproducibly, so the digest identifies
this fedmed version's app and is what coordinators and sites approve.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

APP_PROJECT = Path(__file__).resolve().parent / "app_project"


def app_digest() -> str:
    """SHA-256 of the FAB that `fedmed run` submits (Flower's FAB hash)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(APP_PROJECT)).hexdigest()
