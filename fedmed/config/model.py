"""[model]: the network (by its registry name), its starting weights and the parameters that stay fixed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel


class ModelConfig(StrictModel):
    name: str = Field(
        "default",
        description="network registry key (fedmed.models.NETWORKS), checked when the network is built; built in: "
        "unet, segresnet (segmentation), densenet-small, densenet121 (classification), residual-unet "
        "(enhancement); 'default' picks the task's default network",
    )
    channels: list[int] | None = None
    strides: list[int] | None = None
    num_res_units: int | None = Field(None, ge=0)
    norm: Literal["instance", "group", "batch"] | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    init: Path | None = Field(
        None,
        description="start from these weights (the global model at round 0): a run directory, its "
        "checkpoints/final.pt, a torch state dict file or a MONAI bundle folder (models/model.pt); never downloaded",
    )
    init_exclude: list[str] = Field(
        default_factory=list,
        description="module prefixes (e.g. 'class_layers') that keep their random init instead of model.init's "
        "weights: a new head for another task; every other key must match model.init exactly",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="module prefixes (e.g. 'features.conv0') whose parameters are not trained and not sent: "
        "every site and the coordinator keep their starting values",
    )

    @model_validator(mode="after")
    def _check_prefixes(self) -> ModelConfig:
        for field, prefixes in (("init_exclude", self.init_exclude), ("freeze", self.freeze)):
            if any(not prefix.strip(" .") for prefix in prefixes):
                raise ValueError(f"model.{field} {prefixes} has an empty prefix; name modules, e.g. ['features.conv0']")
        if self.init_exclude and self.init is None:
            raise ValueError("model.init_exclude needs model.init (the weights it excludes keys from); set model.init")
        return self

    @property
    def sends_held_values(self) -> bool:
        """Whether the coordinator sends the sites the values the shared weights leave out (frozen parameters;
        with model.init, the site-local layers' starting values): a site cannot read model.init, a path on the
        coordinator's disk, and must freeze exactly the coordinator's values."""
        return self.init is not None or bool(self.freeze)

    @property
    def total_stride(self) -> int:
        """How much a UNet-style network downsamples (inputs must be divisible by it); 1 for other networks."""
        if self.name not in ("default", "unet", "residual-unet"):
            return 1
        strides = self.strides or [2] * (len(self.channels or [16, 32, 64]) - 1)
        return math.prod(strides)
