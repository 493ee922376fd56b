"""What a site keeps of its own between rounds: FedBN's normalization parameters, its optimizer's state, Ditto's
personal model, and its personalized and delivered models at the end of the run, on its disk.

None of it leaves the site (fedmed.models says which keys are site-local). Kept on disk so it survives
rounds, process restarts (Flower starts a fresh ClientApp process per message in deployment) and
daemon restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedmed.core.errors import FedmedError
from fedmed.core.files import atomic_path

LOCAL_FILE = "local_parameters.pt"
OPTIMIZER_FILE = "optimizer_state.pt"  # train.keep_optimizer_state: the optimizer's moments after the last round
DITTO_FILE = "ditto_model.pt"  # evaluation.ditto_lambda: the personal model, trained every round, never sent
DITTO_OPTIMIZER_FILE = "ditto_optimizer_state.pt"
PERSONALIZED_FILE = "personalized_model.pt"  # the site's model at the end of the run (global + local, fine-tuned)
DELIVERED_FILE = "delivered_model.pt"  # the better of global and personalized on the site's tuning split
START_FILE = "start_model.pt"  # evaluation.local_baseline: the first global model the site received
LOCAL_ONLY_FILE = "local_only_model.pt"  # evaluation.local_baseline: trained on this site's data alone


class SiteStateFileError(FedmedError):
    """A file the site keeps between rounds cannot be read (truncated by a full disk, overwritten)."""


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for the same damage
        raise SiteStateFileError(
            f"{path} cannot be read ({type(error).__name__}: {error}); move it aside to start that state afresh "
            "(the site's other files and the run's checkpoints are untouched)"
        ) from error


class LocalParameterStore:
    """The site-local parameters of one run at one site, written atomically."""

    def __init__(self, directory: Path, *, file_name: str = LOCAL_FILE) -> None:
        self.path = Path(directory) / file_name

    def load(self) -> dict[str, torch.Tensor] | None:
        if not self.path.exists():
            return None
        return _load(self.path)

    def save(self, parameters: dict[str, torch.Tensor]) -> None:
        cpu = {key: value.detach().cpu().clone() for key, value in parameters.items()}
        with atomic_path(self.path) as temporary:
            torch.save(cpu, temporary)


class OptimizerStateStore:
    """An optimizer's state_dict (nested numbers and tensors), written atomically."""

    def __init__(self, directory: Path, *, file_name: str = OPTIMIZER_FILE) -> None:
        self.path = Path(directory) / file_name

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return _load(self.path)

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as temporary:
            torch.save(state, temporary)
