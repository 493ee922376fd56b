"""A site's model state for one run: the network it reuses every round and its key partition (shared,
site-local, frozen), the values the coordinator sends for the keys the shared weights leave out, the site's
own local layers, a second network for its own model, and its optimizer's state kept between rounds."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.models import KeyPartition, partition_keys, starting_model
from fedmed.site.local_layers import LocalParameterStore, OptimizerStateStore
from fedmed.site.spec import SiteSpec, StateDict


class ModelMismatchError(FedmedError):
    """Stored site-local parameters do not fit the model this site builds from the run config."""


class SiteModels:
    """The site's networks, built when first used and reused across rounds; what it keeps of them on its disk."""

    def __init__(self, spec: SiteSpec, config: RunConfig, *, device: torch.device) -> None:
        self.spec = spec
        self.config = config
        self.device = device
        self.local_store = LocalParameterStore(spec.state_dir)
        self._held: StateDict | None = None

    def build_model(self) -> tuple[nn.Module, KeyPartition]:
        """A fresh model (model.freeze applied) and its keys: shared, site-local, frozen. model.init is not read
        here: it is a path on the coordinator's disk, whose values arrive with the round (use_held)."""
        start = starting_model(
            self.config.task,
            self.config.model,
            load_init=False,
            trainable=self.config.trainable,
            fedbn=self.config.strategy.fedbn,
        )
        return start.network, partition_keys(start.network, fedbn=self.config.strategy.fedbn, frozen=start.frozen)

    @cached_property
    def _model_and_keys(self) -> tuple[nn.Module, KeyPartition, StateDict]:
        """The session's model (reused: every round overwrites all its parameters and buffers), its
        keys, and the site-local parameters' initial values."""
        model, keys = self.build_model()
        state = model.state_dict()
        initial_local = {key: state[key].detach().clone() for key in keys.local}
        return model.to(self.device), keys, initial_local

    @property
    def network(self) -> nn.Module:
        """The session's model, as the latest round left it."""
        return self._model_and_keys[0]

    def shared_template(self) -> StateDict:
        """The shared parameters in state-dict order (initial values): what travels each round."""
        model, keys, _ = self._model_and_keys
        state = model.state_dict()
        return {key: state[key] for key in keys.shared}

    def held_template(self) -> StateDict:
        """The site-local and frozen entries (initial values), in the order the coordinator sends their values."""
        model, keys, _ = self._model_and_keys
        state = model.state_dict()
        return {key: state[key] for key in keys.held}

    def full_template(self) -> StateDict:
        """Every parameter and buffer of the model, in state-dict order."""
        return self._model_and_keys[0].state_dict()

    def use_held(self, held: StateDict) -> None:
        """The coordinator's values for the keys the shared weights leave out, sent with every round when the run
        sets model.init, model.freeze or [pretrain]: frozen parameters, and the site-local layers' starting values."""
        self._held = held

    def model_with(self, global_state: StateDict) -> tuple[nn.Module, list[str]]:
        """The model with the global shared parameters, the coordinator's frozen ones and this site's local ones.

        The caller has checked that `global_state` fits the model (fedmed.flower.records.Layout);
        load_state_dict still refuses anything missing or misshapen.
        """
        model, keys, initial_local = self._model_and_keys
        local = keys.local
        state = dict(global_state)
        if self.config.sends_held_values and keys.held:
            if self._held is None:
                raise ModelMismatchError(
                    f"site {self.spec.name}: the run sets model.init, model.freeze or [pretrain] but the coordinator "
                    "sent no values for the frozen and site-local parameters; coordinator and site must run the same "
                    "fedmed version"
                )
            state.update({key: self._held[key] for key in keys.frozen})
            initial_local = {key: self._held[key] for key in local}
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

    @cached_property
    def personal_network(self) -> nn.Module:
        """A second network for the site's own model (Ditto, fine-tuning), so the global one stays as received."""
        return self.build_model()[0].to(self.device)

    def personal_keys(self, *, final: bool) -> list[str]:
        """The parameters in which this site's personalized model differs from the global model: all but the
        frozen ones once trained at the site (fine-tune or Ditto, at the end of the run), else its site-local
        layers."""
        model, keys, _ = self._model_and_keys
        if final and self.config.evaluation.personal_training:
            return [key for key in model.state_dict() if key not in keys.frozen]
        return list(keys.local)

    def kept_optimizer(self, file_name: str) -> OptimizerStateStore | None:
        """Where the optimizer's state waits for the next round (train.keep_optimizer_state), else None."""
        if not self.config.train.keep_optimizer_state:
            return None
        return OptimizerStateStore(self.spec.state_dir, file_name=file_name)

    def load_optimizer_state(self, store: OptimizerStateStore | None) -> dict | None:
        state = store.load() if store is not None else None
        if state is not None and len(state.get("param_groups", [{}])[0].get("params", [])) != sum(
            1 for p in self._model_and_keys[0].parameters() if p.requires_grad
        ):
            raise ModelMismatchError(
                f"site {self.spec.name}: {store.path} holds the optimizer state of a different model; move it aside "
                "to restart this site's optimizer from scratch"
            )
        return state
