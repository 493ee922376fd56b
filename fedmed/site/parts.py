"""One site's parts for a run, which its trainer (fedmed.site.trainer) and its own models (fedmed.site.personal)
share: what it is told, its task and device, its cases and its model state."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fedmed.config import RunConfig, TrainConfig
from fedmed.privacy import steps_per_epoch
from fedmed.site.cases import SiteCases
from fedmed.site.model_state import SiteModels
from fedmed.site.spec import SiteSpec, round_train_config
from fedmed.site.step_watch import TrainingWatch, watch_training
from fedmed.tasks import DpSgdStep, Task, get_task, select_device


@dataclass(frozen=True)
class SiteParts:
    """A site's session without its rounds: built once per process, its data and networks loaded on first use."""

    spec: SiteSpec
    config: RunConfig
    task: Task
    device: torch.device
    cases: SiteCases
    models: SiteModels

    @classmethod
    def open(cls, spec: SiteSpec, config: RunConfig) -> SiteParts:
        """The parts of a site's session; its data and networks are read and built when first used."""
        if spec.threads:
            torch.set_num_threads(spec.threads)
        task = get_task(config.task)
        device = select_device(config.train.device)
        models = SiteModels(spec, config, device=device)
        return cls(spec=spec, config=config, task=task, device=device, cases=SiteCases(spec, config), models=models)

    def round_train_config(self, server_round: int) -> TrainConfig:
        return round_train_config(self.config.train, server_round=server_round)

    def watch_steps(
        self, what: str, *, epochs: int, dp: DpSgdStep | None = None
    ) -> contextlib.AbstractContextManager[TrainingWatch]:
        """Slow local epochs shown live or logged (fedmed.site.step_watch); quick ones stay quiet."""
        batch = (dp and dp.logical_batch_size) or self.config.train.batch_size
        batches = steps_per_epoch(len(self.cases.training_cases), batch)
        steps = dp.steps if dp is not None else self.config.train.local_steps
        if steps is not None:  # a step budget (DP-SGD's or train.local_steps): passes as they fall
            epochs = -(-steps // batches)
        return watch_training(label=f"site {self.spec.name}: {what}", epochs=epochs, batches_per_epoch=batches)
