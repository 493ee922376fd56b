"""[pretrain]: privacy-free pre-training before the federation starts, on synthetic phantoms of the run's task or
on a public data set the coordinator holds (`public`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig
    from .task import TaskConfig

# Label classes the phantoms can draw: segmentation lesions nest up to 4 classes; classification is lesion or not.
MAX_PHANTOM_SEGMENTATION_CLASSES = 4


# Fields that describe the phantoms only: with `public` the data set's own training and validation cases are used.
PHANTOM_FIELDS = ("cases", "val_cases", "variations")


class PretrainConfig(StrictModel):
    """Train the run's network centrally, no DP, on fedmed's own phantoms (the [synth] generator) or on a public
    data set (`public`): neither holds a patient of the federation, so it spends no privacy; the federation then
    starts from these weights (fedmed.tasks.pretrain, fedmed.tasks.public_pretrain)."""

    enabled: bool = Field(
        False,
        description="pre-train before round 1 and start the federation from the result (cached in the run "
        "directory's pretrain/); not together with model.init. True by itself when `public` is set",
    )
    public: Path | None = Field(
        None,
        description="pre-train on this public data set instead of phantoms: a site folder (dataset.json), an MSD "
        "dataset.json (without a validation split every 5th training case is held out) or a MedMNIST-style .npz, on "
        "the coordinator's disk (relative paths start at the config file's folder); fedmed never downloads it",
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

    @model_validator(mode="before")
    @classmethod
    def _public_implies_enabled(cls, data: Any) -> Any:
        """`public` switches pretraining on unless `enabled` is given; enabled = false beside it is a contradiction."""
        if not isinstance(data, dict) or data.get("public") is None:
            return data
        if "enabled" not in data:
            return {**data, "enabled": True}
        try:
            enabled = TypeAdapter(bool).validate_python(data["enabled"])
        except ValidationError:
            return data  # the field's own check reports it
        if not enabled:
            raise ValueError(
                f"pretrain.enabled = false but pretrain.public = {str(data['public'])!r} asks for public pretraining; "
                "remove pretrain.enabled (public implies it), or remove pretrain.public to start without pretraining"
            )
        return data


def check_pretrain(run: RunConfig) -> None:
    """[pretrain] sets the starting weights alone, from phantoms the sites never see, for a task they can draw,
    or from a public data set (whose own cases and labels decide what it can teach)."""
    if not run.pretrain.enabled:
        return
    if run.model.init is not None:
        what = "pretrain.public" if run.pretrain.public is not None else "pretrain.enabled = true"
        raise ValueError(
            f"{what} and model.init both set the run's starting weights; keep one: remove model.init to start "
            "from pretraining, or remove [pretrain] (pretrain.enabled = false) to start from "
            f"model.init ({run.model.init})"
        )
    if run.pretrain.public is not None:
        check_public(run.pretrain)
        return
    if run.synth is not None and run.pretrain.seed == run.synth.seed:
        raise ValueError(
            f"pretrain.seed {run.pretrain.seed} is synth.seed: the phantoms would repeat the simulated sites' own "
            "cases, validation included; choose another pretrain.seed or remove it (default: synth.seed + 1)"
        )
    if problem := pretraining_unsupported(run.task):
        raise ValueError(f"pretrain.enabled: {problem}")


def check_public(pretrain: PretrainConfig) -> None:
    """With a public data set the phantoms' own settings mean nothing: refuse those set to something else."""
    changed = [name for name in PHANTOM_FIELDS if getattr(pretrain, name) != PretrainConfig.model_fields[name].default]
    if changed:
        fields = ", ".join(f"pretrain.{name}" for name in changed)
        raise ValueError(
            f"{fields} describe synthetic phantoms, but pretrain.public trains on the public data set's own "
            f"training cases and scores its validation cases; remove {fields}"
        )


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
