"""The global model at round 0: the configured network from the run's seed, model.init's weights (or, with
[pretrain], the run's synthetic or public pretraining) loaded, model.freeze applied; which keys travel, and what the
coordinator holds for the rest.

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
from fedmed.models import InitialWeights, KeyPartition, partition_keys, starting_model
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import PRETRAIN_DIR, STARTING_POINT_FILE
from fedmed.tasks.start_weights import pretrained_start

INIT_DIGEST = "init_sha256"  # in checkpoints/latest.pt: a resumed run must start from the same weights


@dataclass
class GlobalStart:
    state: dict[str, torch.Tensor]  # every parameter and buffer at round 0
    keys: KeyPartition
    layout: Layout  # the shared keys: what travels both ways and is aggregated
    held: ArrayRecord | None  # site-local and frozen values, sent down only (None: sites build them alike)
    init: InitialWeights | None  # model.init's weights, or the pretraining's
    freeze: list[str]
    pretraining: dict[str, Any] | None = None  # [pretrain]: what made `init` (fedmed.tasks.start_weights)
    seed: int | None = None  # the run's seed (the random init's)
    trainable: str = "all"  # what DP-SGD trains (dp_sgd.trainable resolved); the rest is in keys.frozen

    @property
    def kind(self) -> str:
        """Where the run starts: "random", "synthetic pretraining", "public pretraining" or "weights file"
        (model.init)."""
        if self.pretraining is not None:
            return str(self.pretraining.get("kind", "synthetic pretraining"))
        return "weights file" if self.init is not None else "random"

    def release_shared(self) -> None:
        """Let go of the shared values once the round loop carries them as the global arrays (a model's worth of
        memory); the final checkpoint puts them back, in their place."""
        for key in self.keys.shared:
            self.state[key] = torch.empty(0, dtype=self.state[key].dtype)

    def describe(self) -> dict[str, Any]:
        """What the run directory records about its starting point (STARTING_POINT_FILE)."""
        pretraining = None
        if self.pretraining is not None:
            pretraining = {key: value for key, value in self.pretraining.items() if key not in ("kind", "settings")}
        return {
            "kind": self.kind,
            "seed": self.seed,
            "init": self.init.describe() if self.init is not None and self.pretraining is None else None,
            "pretraining": pretraining,
            "freeze": list(self.freeze),
            "trainable": self.trainable,
            "frozen_parameters": len(self.keys.frozen),
            "frozen_values": sum(self.state[key].numel() for key in self.keys.frozen),
            "shared_values": sum(self.state[key].numel() for key in self.keys.shared),
        }


def global_start(config: RunConfig, *, run_dir: RunDirectory | None = None) -> GlobalStart:
    """The round-0 global model (random init from the current torch seed, then model.init or the run's
    pretraining, and model.freeze). With [pretrain] the pretraining runs here, before the first round, at the
    coordinator (or the simulation's ServerApp), its weights kept in the run directory's pretrain/ folder and
    reused when the run resumes."""
    init, pretraining = None, None
    if config.pretrain.enabled:
        if run_dir is None:
            raise FedmedError("[pretrain] needs the run directory to keep its weights in; pass run_dir")
        init, pretraining = pretrained_start(config, folder=run_dir.path / PRETRAIN_DIR)
    start = starting_model(
        config.task, config.model, init=init, trainable=config.trainable, fedbn=config.strategy.fedbn
    )
    state = {key: value.detach().clone() for key, value in start.network.state_dict().items()}
    keys = partition_keys(start.network, fedbn=config.strategy.fedbn, frozen=start.frozen)
    held = None
    if config.sends_held_values and keys.held:
        held = Layout.of(state, keys.held).pack(state)
    return GlobalStart(
        state=state,
        keys=keys,
        layout=Layout.of(state, keys.shared),
        held=held,
        init=start.init,
        freeze=list(config.model.freeze),
        pretraining=pretraining,
        seed=config.seed,
        trainable=config.trainable,
    )


def record_start(run_dir: RunDirectory, start: GlobalStart) -> dict[str, Any]:
    """Fields for checkpoints/latest.pt; the run directory notes where the run started (random, pretraining or
    model.init with its digest) and the frozen keys."""
    run_dir.write_json(STARTING_POINT_FILE, start.describe())
    if start.init is None and not start.freeze:
        return {}
    return {INIT_DIGEST: start.init.sha256 if start.init is not None else None}


def check_resumed_start(checkpoint: dict[str, Any], start: GlobalStart, *, run_dir: RunDirectory) -> None:
    """A resumed run keeps its starting point: frozen values and site-local starts come from model.init (or the
    run's pretrained weights) again."""
    before = checkpoint.get(INIT_DIGEST)
    now = start.init.sha256 if start.init is not None else None
    if before != now and (before is not None or now is not None):
        path = start.init.path if start.init is not None else "(none)"
        what = "the run's pretrained weights" if start.pretraining is not None else "model.init"
        fix = _public_data_change(start, run_dir=run_dir) or "restore the original weights file to resume"
        raise FedmedError(
            f"{run_dir.path.name}: {what} {path} has changed since the run started (sha256 {str(before)[:12]} "
            f"then, {str(now)[:12]} now); {fix}, or start a new run"
        )


def _public_data_change(start: GlobalStart, *, run_dir: RunDirectory) -> str:
    """For public pretraining, whether its data set changed since the run started (as its starting point says)."""
    now = start.pretraining or {}
    then = (run_dir.read_json(STARTING_POINT_FILE) or {}).get("pretraining") or {}
    if now.get("kind") != "public pretraining" or then.get("data_sha256") in (None, now.get("data_sha256")):
        return ""
    return (
        f"its public data set '{now.get('data_set')}' at {now.get('data_path')} changed since (data sha256 "
        f"{str(then.get('data_sha256'))[:12]} then, {str(now.get('data_sha256'))[:12]} now) and was trained on "
        "again: restore the data set as it was to resume (the pretraining is then made from it again)"
    )
