"""What a bundle says about its model: `configs/metadata.json`, the handed-over run config, README and licence.

Names only (run, sites, strategy, privacy spent), never where anything lies on disk: a bundle leaves the
federation, and the sites' folders, the run directory and the training data's paths stay behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import monai
import nibabel
import numpy
import torch

import fedmed
from fedmed.config import RunConfig
from fedmed.runs.run_dir import FLOWER_RUNS
from fedmed.runs.summary import privacy_spent

from .trained_model import TrainedModel


def bundle_metadata(trained: TrainedModel, *, weights: Path) -> dict[str, Any]:
    task = trained.config.task
    channel_names = {str(i): name for i, name in enumerate(_modalities(trained.config))}
    if task.kind == "segmentation":
        classes = {"0": "background"} | {str(v): task.class_name(v) for v in range(1, task.num_classes)}
        output = {
            "type": "image",
            "format": "segmentation",
            "num_channels": 1,
            "dtype": "uint8",
            "channel_def": classes,
        }
    elif task.kind == "classification":
        classes = {str(v): f"p_{task.class_name(v)}" for v in range(task.num_classes)}
        output = {
            "type": "probabilities",
            "format": "classes",
            "num_channels": task.num_classes,
            "dtype": "float32",
            "channel_def": classes,
        }
    else:
        output = {
            "type": "image",
            "format": "magnitude",
            "num_channels": task.channels,
            "dtype": "float32",
            "value_range": [0, 1],
            "channel_def": channel_names,
        }
    patch = list(trained.config.roi_size) if task.scan_geometry else list(task.image_size)
    described = handover_description(trained)
    record = provenance(trained) | {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fedmed {fedmed.__version__} from the {described}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "optional_packages_version": {"nibabel": nibabel.__version__},
        "name": f"fedmed {trained.config.name} {task.kind}",
        "task": f"{task.spatial_dims}D {task.kind}",
        "description": f"{described}, trained by federated learning with fedmed; data never left the sites",
        "authors": "the sites of the federation (see fedmed.sites)",
        "copyright": "the federation's members",
        "data_source": "federated: " + ", ".join(record.get("sites", [])),
        "data_type": "nibabel",
        "image_classes": f"{task.channels} channel(s): " + ", ".join(channel_names.values()),
        "label_classes": ", ".join(f"{k}: {v}" for k, v in output["channel_def"].items()),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR/CT",
                    "num_channels": task.channels,
                    "spatial_shape": patch,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": task.scan_geometry,
                    "channel_def": channel_names,
                }
            },
            "outputs": {"pred": {**output, "spatial_shape": patch, "is_patch_data": task.scan_geometry}},
        },
        "fedmed": record,
    }


def handover_description(trained: TrainedModel) -> str:
    """The model named by run and site, never by a folder (a site model's own description names its folder)."""
    if trained.site is None:
        return trained.description  # "global model of run R after N round(s)" or "bundle NAME": names only
    kind = str(trained.provenance.get("model", "personalized")).split(":")[0]
    run = trained.run_dir.path.name if trained.run_dir else None
    return f"{kind} model of site {trained.site}" + (f" of run {run}" if run else "")


def provenance(trained: TrainedModel) -> dict[str, Any]:
    """Who and what made the model: run, rounds, sites (names only), strategy, DP ε per site, app digest."""
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
    return record


def _app_digest(trained: TrainedModel) -> str | None:
    """The FAB hash of the Flower app that trained a deployed run (the last submission); a simulation has none."""
    path = trained.run_dir.path / FLOWER_RUNS if trained.run_dir else None
    if path is None or not path.is_file():
        return None
    submissions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return submissions[-1].get("fab_hash") if submissions else None


def _modalities(config: RunConfig) -> list[str]:
    names = list(getattr(config.synth, "modalities", None) or []) if config.synth else []
    return names if len(names) == config.task.channels else [f"channel{i}" for i in range(config.task.channels)]


def handover_config(config: RunConfig) -> RunConfig:
    """The run config without where the sites keep their data (folder names stay at the coordinator)."""
    update: dict[str, Any] = {"sites": [], "synth": None, "output_dir": Path("runs")}
    handed = config.model_copy(update=update)
    if getattr(handed.model, "init", None) is not None:
        handed.model = handed.model.model_copy(update={"init": None})
    return handed


def bundle_readme(trained: TrainedModel) -> str:
    config = trained.config
    return f"""# {config.name}: {config.task.kind} model exported by fedmed

{handover_description(trained)}. Federated training: the images never left the sites; only model updates did.
Provenance (run, rounds, sites, strategy, privacy spent): `configs/metadata.json`, key `fedmed`.

## Run it with MONAI (no fedmed needed: torch, monai and nibabel)

    python -c "from monai.bundle import run; run(config_file='configs/inference.json', \\
        meta_file='configs/metadata.json', bundle_root='.', dataset_dir='/path/to/niftis', output_dir='eval')"

or, with `fire` installed, `python -m monai.bundle run --config_file configs/inference.json
--meta_file configs/metadata.json --bundle_root . --dataset_dir /path/to/niftis`.

Each NIfTI file in `dataset_dir` is one case ({config.task.channels} channel(s)); for several modalities per
case pass `datalist` as a list of lists of files in the training order. Outputs land in `output_dir` on each
input's own grid and affine ({_outputs(config)}).

## With fedmed

    fedmed predict {"<this folder>"} IMAGES... --out DIR

## Files
- `models/model.pt`: the network's state dict (`network_def` in `configs/inference.json` builds it).
- `configs/fedmed_run.toml`: the run's config (task, model, preprocessing), without the sites' data paths.
- `scripts/`: code the config imports (fixed-grid preprocessing, fedmed's residual enhancer), when needed.
"""


def _outputs(config: RunConfig) -> str:
    kind = config.task.kind
    return {"segmentation": "`<case>_seg.nii.gz`", "enhancement": "`<case>_enhanced.nii.gz`"}.get(
        kind, "`predictions.csv`"
    )


def licence_note() -> str:
    return (
        "The code in this bundle (configs, scripts) is from fedmed, Apache License 2.0.\n\n"
        "The model weights were trained on data held by the federation's sites. Terms of use of the weights\n"
        "are set by those sites and the federation's agreement, not by fedmed; check them before sharing\n"
        "this bundle beyond the federation. Not a medical device: for research use unless certified.\n"
    )
