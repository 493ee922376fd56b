"""Command lines and environments for Flower's processes, as fedmed runs them."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

from fedmed.core.errors import FedmedError
from fedmed.flower.runtime.environment import FLOWER_ENVIRONMENT


def executable(name: str) -> str:
    """A console script of this installation (flower-superlink, flwr, ...), next to this Python."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedmedError(
            f"'{name}' not found next to {sys.executable} or on PATH; reinstall fedmed (pip install fedmed)"
        )
    return found


def flower_environment(*, flower_home: Path) -> dict[str, str]:
    flower_home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, **FLOWER_ENVIRONMENT, "PYTHONUNBUFFERED": "1", "FLWR_HOME": str(flower_home)}


def split_address(address: str) -> tuple[str, int]:
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit():
        raise FedmedError(f"'{address}' is not host:port (e.g. coordinator.example.org:8000)")
    return host.strip("[]"), int(port)


def shared_secret(path: Path) -> Path:
    """A random secret file (0600) that lets only fedmed's executor take tasks from a runtime API."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return path
