"""FedBN: normalization parameters stay at the site; only the rest is shared and aggregated.

The site-local part is stored on the site's own disk so it survives rounds, process restarts
(Flower starts a fresh ClientApp process per message in deployment) and daemon restarts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

LOCAL_FILE = "local_parameters.pt"
PERSONALIZED_FILE = "personalized_model.pt"  # the site's model at the end of the run (global + local, fine-tuned)


def shared_keys(all_keys: Iterable[str], local_keys: Iterable[str]) -> list[str]:
    """Keys that are sent and aggregated, in state-dict order."""
    local = set(local_keys)
    return [key for key in all_keys if key not in local]


class LocalParameterStore:
    """The site-local parameters of one run at one site, written atomically."""

    def __init__(self, directory: Path, *, file_name: str = LOCAL_FILE) -> None:
        self.path = Path(directory) / file_name

    def load(self) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, parameters: dict[str, torch.Tensor]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cpu = {key: value.detach().cpu().clone() for key, value in parameters.items()}
        # Write-then-rename so a crash mid-write never leaves a truncated file behind.
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".local-", suffix=".pt")
        os.close(handle)
        try:
            torch.save(cpu, temporary)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
