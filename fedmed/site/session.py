"""A site's session in one run, framework-free: global weights in, shared update and metrics out.

It lives as long as its process and serves every round of the run. The Flower ClientApp is a thin
adapter around it; the same code serves the in-process engine, Flower's simulation engine and
deployment. The session is a composition of the site's parts (fedmed.site.parts): its cases
(fedmed.site.cases), its model state (fedmed.site.model_state) and its trainer (fedmed.site.trainer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedmed.config import RunConfig
from fedmed.data import SiteData
from fedmed.data.scan_site import ScanSite
from fedmed.site.parts import SiteParts
from fedmed.site.privacy import DpPlanPreview, SitePrivacy
from fedmed.site.spec import NUM_EXAMPLES, SiteSpec, StateDict, site_seed
from fedmed.site.trainer import SiteTrainer
from fedmed.tasks import Task

__all__ = ["NUM_EXAMPLES", "SiteSession", "SiteSpec", "StateDict", "site_seed"]


class SiteSession:
    """A site's data, task and model partition for one run; cheap to reuse across rounds."""

    def __init__(self, spec: SiteSpec, config: RunConfig) -> None:
        self.parts = SiteParts.open(spec, config)
        self.trainer = SiteTrainer(self.parts)

    @property
    def spec(self) -> SiteSpec:
        return self.parts.spec

    @property
    def config(self) -> RunConfig:
        return self.parts.config

    @property
    def task(self) -> Task:
        return self.parts.task

    @property
    def device(self) -> torch.device:
        return self.parts.device

    # The site's cases (fedmed.site.cases).

    @property
    def raw_data(self) -> SiteData:
        return self.parts.cases.raw_data

    @property
    def data(self) -> SiteData | ScanSite:
        return self.parts.cases.data

    @property
    def training_cases(self) -> Sequence:
        return self.parts.cases.training_cases

    @property
    def personal_training_cases(self) -> Sequence:
        return self.parts.cases.personal_training_cases

    @property
    def tuning_cases(self) -> Sequence | None:
        return self.parts.cases.tuning_cases

    def describe_intensities(self) -> dict:
        return self.parts.cases.describe_intensities()

    def use_standard_landmarks(self, landmarks: list[float]) -> None:
        self.parts.cases.use_standard_landmarks(landmarks)

    def harmonized_histogram(self) -> dict:
        return self.parts.cases.harmonized_histogram()

    # The site's model state (fedmed.site.model_state).

    def shared_template(self) -> StateDict:
        return self.parts.models.shared_template()

    def held_template(self) -> StateDict:
        return self.parts.models.held_template()

    def full_template(self) -> StateDict:
        return self.parts.models.full_template()

    def use_held(self, held: StateDict) -> None:
        self.parts.models.use_held(held)

    def personal_keys(self, *, final: bool) -> list[str]:
        return self.parts.models.personal_keys(final=final)

    # The site's rounds (fedmed.site.trainer).

    @property
    def privacy(self) -> SitePrivacy | None:
        return self.trainer.privacy

    def dp_plan(self) -> DpPlanPreview:
        return self.trainer.dp_plan()

    def train(self, global_state: StateDict, *, server_round: int, proximal_mu: float) -> tuple[StateDict, dict]:
        return self.trainer.train(global_state, server_round=server_round, proximal_mu=proximal_mu)

    def evaluate(self, global_state: StateDict) -> dict:
        return self.trainer.evaluate(global_state)

    def score(self, model: nn.Module, *, started: float, cases_file: str | None = None) -> dict:
        return self.trainer.score(model, started=started, cases_file=cases_file)

    def lends_personalized_model(self, *, final: bool) -> bool:
        return self.trainer.lends_personalized_model(final=final)

    def personalize(self, global_state: StateDict, *, server_round: int, final: bool) -> tuple[StateDict, dict]:
        return self.trainer.personalize(global_state, server_round=server_round, final=final)

    def evaluate_models(self, global_state: StateDict, personal: dict[str, StateDict]) -> dict[str, dict]:
        return self.trainer.evaluate_models(global_state, personal)
