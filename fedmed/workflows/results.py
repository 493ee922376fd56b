"""A run directory a person names, checked before anything is read from it (`fedmed report`, fedmed.api.open_run)."""

from __future__ import annotations

from pathlib import Path

from fedmed.core.errors import FedmedError
from fedmed.runs import RunDirectory


def existing_run(path: Path) -> RunDirectory:
    """The run directory at `path`; FedmedError naming the fix when it is none (no config.toml)."""
    directory = RunDirectory(Path(path))
    if not directory.config_file.is_file():
        raise FedmedError(f"{path}: no config.toml; give a run directory that 'fedmed simulate' or 'fedmed run' made")
    return directory
