"""[pretrain]: privacy-free pre-training on synthetic phantoms of the run's task before the federation starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig
    from .task import TaskConfig

# Label classes the phantoms can draw: segmentation lesions nest up to 4 classes; classification is lesion or not.
MAX_PHANTOM_SEGMENTATION_CLASSES = 4


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


def check_pretrain(run: RunConfig) -> None:
    """[pretrain] sets the starting weights alone, from phantoms the sites never see, for a task they can draw."""
    if not run.pretrain.enabled:
        return
    if run.model.init is not None:
        raise ValueError(
            "pretrain.enabled = true and model.init both set the run's starting weights; keep one: remove "
            "model.init to start from synthetic pretraining, or set pretrain.enabled = false to start from "
            f"model.init ({run.model.init})"
        )
    if run.synth is not None and run.pretrain.seed == run.synth.seed:
        raise ValueError(
            f"pretrain.seed {run.pretrain.seed} is synth.seed: the phantoms would repeat the simulated sites' own "
            "cases, validation included; choose another pretrain.seed or remove it (default: synth.seed + 1)"
        )
    if problem := pretraining_unsupported(run.task):
        raise ValueError(f"pretrain.enabled: {problem}")


def pretraining_unsupported(task: TaskConfig) -> str | None:
    """Why synthetic phantoms cannot pre-train this task's network, or None when they can."""
    if task.kind == "classification" and task.num_classes != 2:
        return (
            f"the phantoms are binary (lesion or not) but task.num_classes = {task.num_classes}; pre-train a 2-class "
            "copy of this config with `fedmed pretrain` and start from it with model.init and "
            "model.init_exclude = ['class_layers'] (a new head)"
        )
    if task.kind == "segmentation" and not task.binarize_labels and task.num_classes > MAX_PHANTOM_SEGMENTATION_CLASSES:
        return (
            f"the phantoms draw at most {MAX_PHANTOM_SEGMENTATION_CLASSES} label classes (background, oedema, core, "
            f"enhancing) but task.num_classes = {task.num_classes}; set pretrain.enabled = false"
        )
    return None
