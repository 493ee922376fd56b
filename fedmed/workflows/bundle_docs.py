"""What a bundle says about its model: `configs/metadata.json`, the handed-over run config, README and licence.

Names only (run, sites, strategy, privacy spent), never where anything lies on disk: a bundle leaves the
federation, and the sites' folders, the run directory and the training data's paths stay behind.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import monai
import nibabel
import numpy
import torch

import fedmed
from fedmed.config import RunConfig
from fedmed.runs.run_dir import FLOWER_RUNS, STARTING_POINT_FILE
from fedmed.runs.summary import privacy_spent, run_start

from .trained_model import TrainedModel

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# What `python -m monai.bundle run` needs besides the bundle: MONAI's command line comes from `fire`.
RUNNER_EXTRA = "fire"


def bundle_metadata(trained: TrainedModel, *, weights: Path) -> dict[str, Any]:
    task = trained.config.task
    names = channel_names(trained.config)
    channel_def = {str(i): name for i, name in enumerate(names or [f"channel{i}" for i in range(task.channels)])}
    output = _output_format(trained.config, channel_def=channel_def)
    described = handover_description(trained)
    record = provenance(trained) | {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    any_size = ["*"] * task.spatial_dims  # whole scans of any size: resampled (or resized) inside the bundle
    use = intended_use(trained.config)
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fedmed {fedmed.__version__} from the {described}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__},
        "name": f"fedmed {trained.config.name} {task.kind}",
        "task": f"{task.spatial_dims}D {task.kind} of {use['modality']} ({', '.join(channel_def.values())})",
        "description": f"{described}, trained by federated learning with fedmed; data never left the sites. "
        + _geometry_sentence(trained.config),
        "authors": "the sites of the federation (see fedmed.sites)",
        "copyright": "the federation's members",
        "data_source": "federated: " + ", ".join(record.get("sites", [])),
        "data_type": "nibabel",
        "image_classes": f"{task.channels} channel(s): " + ", ".join(channel_def.values()),
        "label_classes": ", ".join(f"{k}: {v}" for k, v in output["channel_def"].items()),
        "intended_use": _use_sentence(trained.config, use),  # a sentence, as MONAI's model zoo writes it
        "intended_use_details": use,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": use["modality"],
                    "num_channels": task.channels,
                    "spatial_shape": any_size,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": channel_def,
                }
            },
            "outputs": {"pred": {**output, "spatial_shape": any_size, "is_patch_data": False}},
        },
        "fedmed": record,
    }


def channel_names(config: RunConfig) -> list[str] | None:
    """The modality of each input channel: task.channel_names (a simulation fills it from the sites'
    dataset.json), else [synth]'s modalities; None when nobody recorded them."""
    names = list(config.task.channel_names or [])
    if not names and config.synth is not None:
        names = list(getattr(config.synth, "modalities", None) or [])
    return names if len(names) == config.task.channels else None


def intended_use(config: RunConfig) -> dict[str, Any]:
    """What the model is for and what it expects: the task, labels, modality, and the geometry it was trained at."""
    task = config.task
    names = channel_names(config)
    use: dict[str, Any] = {
        "task": f"{task.spatial_dims}D {task.kind}",
        "modality": _modality(names),
        "input_channels": names,
        "intensity_normalization": task.intensity,
    }
    if not names:
        use["input_channels_note"] = _UNNAMED
    if task.kind == "segmentation":
        use["labels"] = {str(value): task.class_name(value) for value in range(1, task.num_classes)}
    elif task.kind == "classification":
        use["classes"] = {str(value): task.class_name(value) for value in range(task.num_classes)}
    if task.scan_geometry:
        use["trained_spacing_mm"] = list(task.spacing or [])
        use["trained_orientation"] = task.orientation
        use["patch_size"] = list(config.roi_size)  # the sliding window's roi: not the input's size
        use["input"] = "whole scans of any size and spacing, resampled to the trained spacing and back"
    else:
        use["fixed_grid"] = list(task.image_size)
        use["trained_orientation"] = "RAS" if task.spatial_dims == 3 else None
        use["input"] = f"images of any size, resized to the fixed grid {list(task.image_size)} and back"
    use["not_for"] = "clinical decisions unless certified as a medical device; check the federation's terms of use"
    return use


def _use_sentence(config: RunConfig, use: dict[str, Any]) -> str:
    task = config.task
    targets = ", ".join((use.get("labels") or use.get("classes") or {}).values())
    channels = ", ".join(use["input_channels"] or [f"{task.channels} unnamed channel(s)"])
    what = f"{use['task']}{f' ({targets})' if targets else ''} of {use['modality']} images ({channels})"
    return f"{what}. {_geometry_sentence(config)} Research use only unless certified as a medical device."


def _output_format(config: RunConfig, *, channel_def: dict[str, str]) -> dict[str, Any]:
    task = config.task
    if task.kind == "segmentation":
        classes = {"0": "background"} | {str(v): task.class_name(v) for v in range(1, task.num_classes)}
        return {"type": "image", "format": "segmentation", "num_channels": 1, "dtype": "uint8", "channel_def": classes}
    if task.kind == "classification":
        return {
            "type": "probabilities",
            "format": "classes",
            "num_channels": task.num_classes,
            "dtype": "float32",
            "channel_def": {str(v): f"p_{task.class_name(v)}" for v in range(task.num_classes)},
        }
    return {
        "type": "image",
        "format": "magnitude",
        "num_channels": task.channels,
        "dtype": "float32",
        "value_range": [0, 1],
        "channel_def": channel_def,
    }


def _geometry_sentence(config: RunConfig) -> str:
    task = config.task
    if task.scan_geometry:
        spacing = " x ".join(f"{value:g}" for value in task.spacing or [])
        return (
            f"Trained at {spacing} mm in {task.orientation} orientation on {list(config.roi_size)} patches; applied "
            "to whole scans by sliding window, outputs on each scan's own grid."
        )
    return f"Trained on images resized to {list(task.image_size)}; outputs on each image's own grid."


_CT = {"ct", "cect", "ncct", "cta"}
_MR = re.compile(r"^(mri?|flair|t1|t2|t1c|t1ce|t1gd|t1w|t2w|t2f|t1n|pd|pdw|adc|dwi|swi|dce|bold|gre)$")


def _modality(names: list[str] | None) -> str:
    """MR or CT as the channel names say (FLAIR, T1c → MR); the names themselves when they say neither."""
    if not names:
        return "unknown (channel names not recorded)"
    words = [re.sub(r"[^0-9a-z]", "", name.lower()) for name in names]
    kinds = {"CT" if word in _CT else "MR" if _MR.match(word) else name for word, name in zip(words, names)}
    return "/".join(sorted(kinds))


def handover_description(trained: TrainedModel) -> str:
    """The model named by run and site, never by a folder (a site model's own description names its folder)."""
    if trained.site is None:
        return trained.description  # "global model of run R after N round(s)" or "bundle NAME": names only
    kind = str(trained.provenance.get("model", "personalized")).split(":")[0]
    run = trained.run_dir.path.name if trained.run_dir else None
    return f"{kind} model of site {trained.site}" + (f" of run {run}" if run else "")


def provenance(trained: TrainedModel) -> dict[str, Any]:
    """Who and what made the model: run, rounds, sites (names only), strategy, DP ε per site, app digest, and
    where its training started."""
    config = trained.config
    record: dict[str, Any] = {
        "fedmed_version": fedmed.__version__,
        "model": trained.provenance.get("model", "global"),
        "run_id": trained.run_dir.path.name if trained.run_dir else trained.provenance.get("run_id"),
        "rounds": trained.provenance.get("rounds", config.train.rounds),
        "strategy": config.strategy.name,
        "fedbn": bool(getattr(config.strategy, "fedbn", False)),
        "sites": [],
        "dp_sgd": config.dp_sgd.enabled,
        "client_dp": config.client_dp.enabled,
        "secagg": config.secagg.enabled,
    }
    if trained.run_dir is not None:
        record["sites"] = sorted({row["site"] for row in trained.run_dir.read_metrics() if "site" in row})
        spent = privacy_spent(trained.run_dir)
        if spent:
            record["dp_epsilon"] = {site: values.get("epsilon") for site, values in spent.items()}
            record["dp_delta"] = {site: values.get("delta") for site, values in spent.items()}
        record["app_digest"] = _app_digest(trained)
        record["start"] = starting_point(trained)
        if (fitted := temperature(trained)) is not None:
            record["temperature"] = fitted  # the bundle's softmax(logits / T), from the run's model card
    return record


# What a bundle says about the run's starting point: names, counts and digests, never a path.
_START_KEYS = ("kind", "data_set", "cases", "val_cases", "epochs", "seed", "data_sha256", "metric", "value", "sha256")


def starting_point(trained: TrainedModel) -> dict[str, Any] | None:
    """Where the run started (random, synthetic or public pretraining with its data set's name, cases and digest,
    or a weights file's sha256), from its run directory."""
    if trained.run_dir is None:
        return trained.provenance.get("start")
    start = run_start(trained.run_dir.read_json(STARTING_POINT_FILE))
    return {key: start[key] for key in _START_KEYS if key in start}


def _start_sentence(trained: TrainedModel) -> str:
    start = starting_point(trained) or {}
    if start.get("kind") == "public pretraining":
        source = f"public pretraining on {start.get('data_set')} ({start.get('cases')} training cases, data sha256 "
        source += f"{str(start.get('data_sha256'))[:16]})"
    elif start.get("kind") == "synthetic pretraining":
        source = f"synthetic pretraining ({start.get('cases')} phantom cases)"
    elif start.get("kind") == "weights file":
        source = "a weights file"
    else:
        return ""
    return f"Starting point: {source}; weights sha256 {str(start.get('sha256'))[:16]}.\n"


def temperature(trained: TrainedModel) -> float | None:
    """A classifier's temperature as the federation fitted it (the run's model card), as `fedmed predict` uses it."""
    if trained.config.task.kind != "classification" or trained.card is None:
        return None
    return trained.card.temperature


def _app_digest(trained: TrainedModel) -> str | None:
    """The FAB hash of the Flower app that trained a deployed run (the last submission); a simulation has none."""
    path = trained.run_dir.path / FLOWER_RUNS if trained.run_dir else None
    if path is None or not path.is_file():
        return None
    submissions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return submissions[-1].get("fab_hash") if submissions else None


def handover_config(config: RunConfig) -> RunConfig:
    """The run config without where the sites keep their data (folder names stay at the coordinator), nor where
    its starting weights came from (the provenance's `start` says what they were)."""
    update: dict[str, Any] = {"sites": [], "synth": None, "output_dir": Path("runs")}
    handed = config.model_copy(update=update)
    if getattr(handed.model, "init", None) is not None:
        handed.model = handed.model.model_copy(update={"init": None})
    if handed.pretrain.public is not None:
        handed.pretrain = handed.pretrain.model_copy(update={"public": None, "enabled": False})
    return handed


_UNNAMED = (
    "the sites' channel names were not recorded (task.channel_names unset): give each case's files in the training "
    "order, numbered <case>_0000.nii.gz, <case>_0001.nii.gz ..., or list them in a dataset.json"
)


def runner_install() -> str:
    """The exact packages for MONAI's bundle runner, at the versions the bundle was exported with."""
    versions = f'torch=={torch.__version__.split("+")[0]} "monai[{RUNNER_EXTRA}]=={monai.__version__}"'
    return f"pip install {versions} nibabel=={nibabel.__version__}"


def monai_command(bundle: str = "BUNDLE") -> str:
    return (
        f"python -m monai.bundle run --bundle_root {bundle} --config_file {bundle}/configs/inference.json "
        "--dataset_dir IN --output_dir OUT"
    )


def bundle_readme(trained: TrainedModel) -> str:
    config = trained.config
    task = config.task
    names = channel_names(config)
    use = intended_use(config)
    channels = ", ".join(names) if names else f"{task.channels} channel(s) whose names were not recorded"
    return f"""# {config.name}: {task.kind} model exported by fedmed

{handover_description(trained)}. Federated training: the images never left the sites; only model updates did.
{_geometry_sentence(config)}
Inputs: {use["modality"]} ({channels}). Provenance (run, rounds, sites, strategy, privacy spent) and the intended
use: `configs/metadata.json`, keys `fedmed`, `intended_use` and `intended_use_details`.
{_start_sentence(trained)}
## Run it with MONAI (no fedmed needed)

    {runner_install()}
    {monai_command()}

`BUNDLE` is this folder, `IN` the scans, `OUT` where the outputs go (created). `fire` gives MONAI's
`python -m monai.bundle` its command line; without it, the same run from Python:

    python -c "from monai.bundle import run; run(config_file='BUNDLE/configs/inference.json', \\
        bundle_root='BUNDLE', dataset_dir='IN', output_dir='OUT')"

## What goes in

`IN` is found as `fedmed predict` finds cases: {_layouts(task.channels, names)}. A `dataset.json`
(Medical Decathlon style, `"test": [{{"image": [...]}}]`) can be given as `IN` too. Each case is named by a stable
id: its file stem where stems are unique, else its subject folder's name. A layout that does not give the
model's cases stops the run with the reason and the fix, before anything is written; so do two cases that would
get the same name.{" " + _UNNAMED[0].upper() + _UNNAMED[1:] + "." if not names else ""}

## What comes out

One line per case as it goes ({_progress(config)}), then in `OUT`:
{_outputs(config)}, on each input's own grid with its affine and header (units included), and `cases.csv`
(case id, status, output, input files, error). A case that fails is reported and the others complete; the run
then exits non-zero, as it does when `IN` holds no case.
{_tta_section(config)}
## With fedmed

    fedmed predict {"<this folder>"} IN --out OUT

## Files
- `models/model.pt`: the network's state dict (`network_def` in `configs/inference.json` builds it).
- `configs/metadata.json`: inputs (channel names, modality), outputs, labels, intended use, provenance.
- `configs/fedmed_run.toml`: the run's config (task, model, preprocessing), without the sites' data paths.
- `scripts/`: code the config imports: `case_layout.py` (finding cases), `runner.py` (the per-case loop and
  writer) and, where needed, fixed-grid preprocessing and fedmed's residual enhancer.
"""


def _layouts(channels: int, names: list[str] | None) -> str:
    if channels == 1:
        return "a folder of NIfTI files (one case each), or a folder of subject folders each holding one scan"
    example = ", ".join(f"{name}.nii.gz" for name in names) if names else "one file per channel"
    return (
        f"a folder of subject folders, each holding the {channels} modality files of one case "
        f"({example}: matched to the channels by name), or a folder of nnU-Net-numbered files "
        f"(`<case>_0000.nii.gz` ... `<case>_{channels - 1:04d}.nii.gz`, in the channel order)"
    )


def _tta_section(config: RunConfig) -> str:
    if not config.task.scan_geometry:
        return ""
    return """
## How sure it is

Add `--tta True` to the command: each case is also predicted with the test-time augmentations `fedmed predict
--uncertainty tta` uses (the label map is their average), and `<case>_uncertainty.nii.gz` is written beside it:
per voxel, the normalized entropy of the class probabilities (0 certain, 1 a coin toss), on the scan's grid.
`cases.csv` gets the case's score (the mean over the voxels some class beside background is likely in). Each
augmentation costs one more sliding-window pass.
"""


def _progress(config: RunConfig) -> str:
    postfix = {"segmentation": "_seg.nii.gz", "enhancement": "_enhanced.nii.gz"}.get(config.task.kind)
    if postfix is None:
        return f"`case 3/10 case_7 → {config.task.class_name(1)} (p = 0.912)`"
    return f"`case 3/10 case_7 → OUT/case_7{postfix}`"


def _outputs(config: RunConfig) -> str:
    kind = config.task.kind
    return {"segmentation": "`<case>_seg.nii.gz`", "enhancement": "`<case>_enhanced.nii.gz`"}.get(
        kind, "`predictions.csv`"
    )


def logging_conf() -> str:
    """MONAI's usual bundle logging (INFO to the console); its runner warns when a bundle has none."""
    return (
        "[loggers]\nkeys=root\n\n[handlers]\nkeys=consoleHandler\n\n[formatters]\nkeys=fullFormatter\n\n"
        "[logger_root]\nlevel=INFO\nhandlers=consoleHandler\n\n"
        "[handler_consoleHandler]\nclass=StreamHandler\nlevel=INFO\nformatter=fullFormatter\nargs=(sys.stdout,)\n\n"
        "[formatter_fullFormatter]\nformat=%(asctime)s - %(name)s - %(levelname)s - %(message)s\n"
    )


def licence_note() -> str:
    return (
        "The code in this bundle (configs, scripts) is from fedmed, Apache License 2.0.\n\n"
        "The model weights were trained on data held by the federation's sites. Terms of use of the weights\n"
        "are set by those sites and the federation's agreement, not by fedmed; check them before sharing\n"
        "this bundle beyond the federation. Not a medical device: for research use unless certified.\n"
    )
