"""A site's own layers: FedBN's normalization parameters and its personalized model, on its disk.

They never leave the site (fedmed.models says which keys they are). Kept on disk so they survive
rounds, process restarts (Flower starts a fresh ClientApp process per message in deployment) and
daemon restarts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedmed.core.files import atomic_path

LOCAL_FILE = "local_parameters.pt"
PERSONALIZED_FILE = "personalized_model.pt"  # the site's model at the end of the run (global + local, fine-tuned)


class LocalParameterStore:
    """The site-local parameters of one run at one site, written atomically."""

    def __init__(self, directory: Path, *, file_name: str = LOCAL_FILE) -> None:
        self.path = Path(directory) / file_name

    def load(self) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, parameters: dict[str, torch.Tensor]) -> None:
        cpu = {key: value.detach().cpu().clone() for key, value in parameters.items()}
        with atomic_path(self.path) as temporary:
            torch.save(cpu, temporary)
