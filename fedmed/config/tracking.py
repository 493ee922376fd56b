"""[tracking]: where the per-round metrics go besides metrics.jsonl."""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel


class TrackingConfig(StrictModel):
    """Where the per-round metrics go besides metrics.jsonl: TensorBoard event files in the run directory's
    tensorboard/ always; an MLflow file store in its mlruns/ when asked (the mlflow extra; no server)."""

    mlflow: bool = Field(False, description="also log to an MLflow store in the run directory (fedmed[mlflow])")
