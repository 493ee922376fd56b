"""[pretrain]: privacy-free pre-training on synthetic phantoms of the run's task before the federation starts."""

from __future__ import annotations

from pydantic import Field

from .base import StrictModel


class PretrainConfig(StrictModel):
    """Train the run's network centrally on fedmed's own phantoms (the [synth] generator), no DP: the data are
    synthetic, so it spends no privacy; the federation then starts from these weights (fedmed.tasks.pretrain)."""

    enabled: bool = Field(
        False,
        description="pre-train on synthetic phantoms before round 1 and start the federation from the result "
        "(cached in the run directory's pretrain/); not together with model.init",
    )
    cases: int = Field(
        64, ge=1, le=100_000, description="training phantoms, dealt over the reference scanner and the variations"
    )
    val_cases: int = Field(
        16, ge=1, le=100_000, description="held-out phantoms the pretraining's own validation metric is measured on"
    )
    epochs: int = Field(5, ge=1, le=10_000, description="epochs over the training phantoms (fedmed's training loop)")
    seed: int | None = Field(
        None,
        ge=0,
        description="seed of the phantoms and of the training; default synth.seed + 1 (run seed + 1 without "
        "[synth]); never the sites' synth.seed, so no phantom repeats a simulated site's case",
    )
    variations: bool = Field(
        True,
        description="besides the drift-free reference scanner, draw phantoms through every [[synth.sites]] "
        "scanner drift (simulation with [synth]); false: the reference scanner only",
    )
