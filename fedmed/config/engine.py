"""[engine]: how a simulation runs its sites (in this process, or as Ray actors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrictModel


class EngineConfig(StrictModel):
    name: Literal["inprocess", "ray"] = "inprocess"
    cpus_per_site: float = Field(1.0, gt=0, description="ray: CPUs reserved per simulated site")
    gpus_per_site: float = Field(0.0, ge=0, description="ray: GPU fraction per simulated site")
    num_cpus: int | None = Field(None, ge=1, description="ray: CPUs Ray may use (default: all)")
