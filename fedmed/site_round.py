"""One round of work at a site, framework-free: global weights in, shared update and metrics out.

The Flower ClientApp is a thin adapter around this; the same code serves the in-process engine,
Flower's simulation engine and deployment.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from fedmed.config import RunConfig
from fedmed.errors import FedmedError
from fedmed.strategies import LocalParameterStore, shared_keys

StateDict = dict[str, torch.Tensor]


class ModelMismatchError(FedmedError):
    """The server's parameters do not fit the model this site builds from the run config."""


@dataclass(frozen=True)
class SiteSpec:
    name: str
    data_path: Path
    state_dir: Path  # this site's private folder for this run (site-local parameters)
    threads: int | None = None  # torch CPU threads, when the site caps them


def site_seed(base_seed: int, site_name: str, server_round: int) -> int:
    """A per-site, per-round seed that is the same in every engine and process."""
    return (base_seed * 1_000_003 + zlib.crc32(site_name.encode()) + server_round * 7_919) % (2**31 - 1)


class SiteSession:
    """A site's data, task and model partition for one run; cheap to reuse across rounds."""

    def __init__(self, spec: SiteSpec, config: RunConfig) -> None:
        from fedmed.tasks import get_task, select_device

        self.spec = spec
        self.config = config
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.task = get_task(config.task)
        self.device = select_device(config.train.device)
        self.local_store = LocalParameterStore(spec.state_dir)

    @cached_property
    def data(self):  # noqa: ANN201 - fedmed.data.SiteData, imported lazily to keep start-up lean
        from fedmed.data import load_site

        return load_site(self.spec.data_path, task=self.config.task)

    def build_model(self) -> tuple[nn.Module, list[str], list[str]]:
        """A fresh model plus its shared and site-local key lists."""
        from fedmed.models import build_model, site_local_keys

        model = build_model(self.config.task, self.config.model)
        local = site_local_keys(model) if self.config.strategy.fedbn else []
        return model, shared_keys(model.state_dict(), local), local

    @cached_property
    def _model_and_keys(self) -> tuple[nn.Module, dict[str, torch.Size], list[str], StateDict]:
        """The session's model (reused: every round overwrites all its parameters and buffers), the
        shapes of the shared keys, the site-local keys and their initial values."""
        model, shared, local = self.build_model()
        state = model.state_dict()
        initial_local = {key: state[key].detach().clone() for key in local}
        return model.to(self.device), {key: state[key].shape for key in shared}, local, initial_local

    def shared_template(self) -> StateDict:
        """The shared parameters in state-dict order (initial values): what travels each round."""
        model, shared_shapes, _, _ = self._model_and_keys
        state = model.state_dict()
        return {key: state[key] for key in shared_shapes}

    def _model_with(self, global_state: StateDict) -> tuple[nn.Module, list[str]]:
        model, shared_shapes, local, initial_local = self._model_and_keys
        received, expected = set(global_state), set(shared_shapes)
        if received != expected:
            missing, unexpected = sorted(expected - received)[:5], sorted(received - expected)[:5]
            raise ModelMismatchError(
                f"site {self.spec.name}: the server's parameters do not match the model built from the run "
                f"config (missing {missing}, unexpected {unexpected}); coordinator and site must run the same "
                f"fedmed version and task/model config"
            )
        for key, value in global_state.items():
            if value.shape != shared_shapes[key]:
                raise ModelMismatchError(
                    f"site {self.spec.name}: parameter '{key}' has shape {tuple(value.shape)} from the server "
                    f"but {tuple(shared_shapes[key])} here; check task.image_size / model config on both sides"
                )
        state = dict(global_state)
        if local:
            stored = self.local_store.load()
            if stored is not None and set(stored) != set(local):
                raise ModelMismatchError(
                    f"site {self.spec.name}: {self.local_store.path} holds site-local parameters of a different "
                    f"model; move it aside to restart this site's normalization layers from scratch"
                )
            # Before a site's first round its local layers start from the model's initial values.
            state.update(stored if stored is not None else initial_local)
        model.load_state_dict(state)
        return model, local

    def train(self, global_state: StateDict, *, server_round: int, proximal_mu: float) -> tuple[StateDict, dict]:
        from fedmed.tasks import train_local

        model, local = self._model_with(global_state)
        result = train_local(
            model,
            self.data.train,
            task=self.task,
            train=self.config.train,
            epochs=self.config.train.local_epochs,
            seed=site_seed(self.config.seed, self.spec.name, server_round),
            device=self.device,
            proximal_mu=proximal_mu,
            proximal_keys=set(global_state),
        )
        trained = model.state_dict()
        if local:
            self.local_store.save({key: trained[key] for key in local})
        update = {key: trained[key].detach().cpu() for key in global_state}
        metrics = {
            "num-examples": result.num_examples,
            "train_loss": result.loss,
            "train_steps": result.steps,
            "train_seconds": result.seconds,
        }
        return update, metrics

    def evaluate(self, global_state: StateDict) -> dict:
        started = time.perf_counter()
        model, _ = self._model_with(global_state)
        metrics = self.task.evaluate(model, self.data.val, device=self.device)
        return {"num-examples": len(self.data.val), **metrics, "eval_seconds": time.perf_counter() - started}
