"""The global model at round 0: the configured network from the run's seed, model.init's weights loaded,
model.freeze applied; which keys travel, and what the coordinator holds for the rest.

Sites build the same network but cannot read model.init (a path on the coordinator's disk), so the
values of the keys the shared update leaves out (frozen parameters; with model.init, the site-local
layers' starting values) travel down with every message that carries the global weights
(fedmed.flower.server.exchange). Nothing travels back for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.flower.records import Layout
from fedmed.models import InitialWeights, KeyPartition
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import STARTING_POINT_FILE

INIT_DIGEST = "init_sha256"  # in checkpoints/latest.pt: a resumed run must start from the same weights


@dataclass
class GlobalStart:
    state: dict[str, torch.Tensor]  # every parameter and buffer at round 0
    keys: KeyPartition
    layout: Layout  # the shared keys: what travels both ways and is aggregated
    held: ArrayRecord | None  # site-local and frozen values, sent down only (None: sites build them alike)
    init: InitialWeights | None
    freeze: list[str]

    def describe(self) -> dict[str, Any]:
        """What the run directory records about its starting point (STARTING_POINT_FILE)."""
        return {
            "init": self.init.describe() if self.init is not None else None,
            "freeze": list(self.freeze),
            "frozen_parameters": len(self.keys.frozen),
            "frozen_values": sum(self.state[key].numel() for key in self.keys.frozen),
            "shared_values": sum(self.state[key].numel() for key in self.keys.shared),
        }


def global_start(config: RunConfig) -> GlobalStart:
    """The round-0 global model (random init from the current torch seed, then model.init and model.freeze)."""
    from fedmed.models import partition_keys, starting_model

    start = starting_model(config.task, config.model)
    state = {key: value.detach().clone() for key, value in start.network.state_dict().items()}
    keys = partition_keys(start.network, fedbn=config.strategy.fedbn, frozen=start.frozen)
    held = None
    if config.model.sends_held_values and keys.held:
        held = Layout.of(state, keys.held).pack(state)
    return GlobalStart(
        state=state,
        keys=keys,
        layout=Layout.of(state, keys.shared),
        held=held,
        init=start.init,
        freeze=list(config.model.freeze),
    )


def record_start(run_dir: RunDirectory, start: GlobalStart) -> dict[str, Any]:
    """Fields for checkpoints/latest.pt; the run directory notes model.init's digest and the frozen keys."""
    if start.init is None and not start.freeze:
        return {}
    run_dir.write_json(STARTING_POINT_FILE, start.describe())
    return {INIT_DIGEST: start.init.sha256 if start.init is not None else None}


def check_resumed_start(checkpoint: dict[str, Any], start: GlobalStart, *, run_dir: RunDirectory) -> None:
    """A resumed run keeps its starting point: frozen values and site-local starts come from model.init again."""
    before = checkpoint.get(INIT_DIGEST)
    now = start.init.sha256 if start.init is not None else None
    if before != now and (before is not None or now is not None):
        path = start.init.path if start.init is not None else "(none)"
        raise FedmedError(
            f"{run_dir.path.name}: model.init {path} has changed since the run started (sha256 {str(before)[:12]} "
            f"then, {str(now)[:12]} now); restore the original weights file to resume, or start a new run"
        )
