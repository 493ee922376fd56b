"""A bundle's `configs/inference.json`: the model's inference in MONAI's ConfigParser syntax.

Every bundle finds its cases with `scripts/case_layout.py` (a copy of fedmed.data.case_layout) through
`scripts/runner.py` (a copy of fedmed.workflows.bundle_runner), so a folder of subject folders, nnU-Net's
`_0000` numbering or a dataset.json give the cases `fedmed predict` finds, named by the same ids. Scan-geometry
models are otherwise pure MONAI: the run's preprocessing as dictionary transforms, a SlidingWindowInferer
and `Invertd` back onto each scan's grid. Fixed-grid models resize like training did (`scripts/fixed_grid.py`).
"""

from __future__ import annotations

from typing import Any

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.data.loading import per_image_intensity
from fedmed.data.scans import intensity_transform
from fedmed.tasks.uncertainty import tta_augmentations

OUTPUT_POSTFIX = {"segmentation": "seg", "enhancement": "enhanced"}


def inference_config(
    config: RunConfig, network: dict[str, Any], *, channel_names: list[str] | None, temperature: float | None = None
) -> dict[str, Any]:
    """`temperature`: a classifier's calibration, fitted by the federation (the run's model card), as
    `fedmed predict` applies it."""
    if config.task.scan_geometry:
        return _scan_inference(config, network, channel_names=channel_names)
    return _fixed_grid_inference(config, network, channel_names=channel_names, temperature=temperature)


def _common(config: RunConfig, network: dict[str, Any], *, channel_names: list[str] | None) -> dict[str, Any]:
    task = config.task
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch", "$import monai"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/images'",
        # The modality of each input channel, in order: subject folders' files are matched to channels by it.
        "channel_names": channel_names,
        # Cases as `fedmed predict` finds them: NIfTI files, subject folders, nnU-Net numbering or a dataset.json.
        "datalist": {
            "_target_": "scripts.runner.find_cases",
            "inputs": "@dataset_dir",
            "finder": {"_target_": "scripts.case_layout.find_cases", "_mode_": "callable"},
            "channels": task.channels,
            "channel_names": "@channel_names",
        },
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "load_weights": "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
        "map_location=@device, weights_only=True))",
    }


def _setup() -> list[str]:
    # The cases first: a wrong input layout is reported before the network is built.
    return [
        "$print(len(@datalist), 'case(s) found in', @dataset_dir, flush=True)",
        "$@load_weights",
        "$@network.eval()",
        "$torch.set_grad_enabled(False)",
    ]


def _scan_inference(config: RunConfig, network: dict[str, Any], *, channel_names: list[str] | None) -> dict[str, Any]:
    """Scan geometry (segmentation only: scan-geometry enhancement has no bundle yet)."""
    task = config.task
    steps: list[dict[str, Any]] = [
        {
            "_target_": "LoadImaged",
            "keys": "image",
            "image_only": True,
            "ensure_channel_first": True,
            "reader": "NibabelReader",
        },
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32", "track_meta": True},
        {
            "_target_": "Orientationd",
            "keys": "image",
            "axcodes": task.orientation,
            "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
        },
        {"_target_": "Spacingd", "keys": "image", "pixdim": list(task.spacing or []), "mode": "bilinear"},
    ]
    if task.crop_foreground:
        steps.append(
            {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "allow_smaller": True, "margin": 2}
        )
    steps += [_as_config(transform) for transform in intensity_transform(task, config.normalization)]
    inference = config.inference
    invert = {
        "_target_": "Invertd",
        "keys": "pred",
        "transform": "@preprocessing",
        "orig_keys": "image",
        "nearest_interp": False,
        "to_tensor": True,
    }
    return {
        **_common(config, network, channel_names=channel_names),
        # Test-time augmentation: `--tta true` averages the passes `fedmed predict --uncertainty tta` makes and
        # writes <case>_uncertainty.nii.gz (normalized entropy, 0 certain to 1 a coin toss) beside each label map.
        "tta": False,
        "tta_augmentations": _tta_augmentations(config),
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(config.roi_size),
            "sw_batch_size": inference.sw_batch_size,
            "overlap": inference.overlap,
            "mode": inference.blend,
            "sw_device": "@device",
            "device": "$torch.device('cpu')",
        },
        "probabilities": {
            "_target_": "scripts.runner.averaged_probabilities",
            "_mode_": "callable",
            "inferer": "@inferer",
            "network": "@network",
            "augmentations": "$@tta_augmentations if @tta else []",
        },
        "postprocessing": {"_target_": "Compose", "transforms": [invert]},
        # The class probabilities take the image's metadata, so Invertd finds the preprocessing to undo.
        "infer": "$lambda d: @postprocessing(dict(d, pred=monai.data.MetaTensor(@probabilities(d['image']), "
        "meta=dict(d['image'].meta))))",
        "outputs": {"_target_": "scripts.runner.labels_and_uncertainty", "_mode_": "callable", "uncertainty": "@tta"},
        "predict": "$lambda case: @outputs(@infer(@preprocessing(dict(case)))['pred'])",
        "run": [*_setup(), _runner(config)],
    }


def _tta_augmentations(config: RunConfig) -> list[dict[str, Any]]:
    """The passes beside the plain one, as `fedmed predict --uncertainty tta` chooses them for this model."""
    train = config.train
    flips = bool(train.augment and train.augmentation.flips)
    chosen = tta_augmentations(config.task.spatial_dims, trained_with_flips=flips)
    return [{"flip": list(a.flip), "shift": list(a.shift), "gain": a.gain} for a in chosen]


def _fixed_grid_inference(
    config: RunConfig, network: dict[str, Any], *, channel_names: list[str] | None, temperature: float | None
) -> dict[str, Any]:
    task = config.task
    # A partial of fedmed's own function, shipped in scripts/ (bundle_root is on sys.path while it runs).
    apply = {
        "_target_": "scripts.fixed_grid.apply_on_source_grid",
        "_mode_": "callable",
        "network": "@network",
        "kind": task.kind,
        "spatial_dims": task.spatial_dims,
        "image_size": list(task.image_size),
        "intensity": per_image_intensity(task),
    }
    calibration: dict[str, Any] = {}
    if task.kind == "classification":
        # softmax(logits / T) with the federation's fitted T (1: uncalibrated); override with --temperature 1.
        calibration["temperature"] = float(temperature or 1.0)
        apply["temperature"] = "@temperature"
    return {
        **_common(config, network, channel_names=channel_names),
        **calibration,
        "load_image": {
            "_target_": "LoadImage",
            "image_only": True,
            "ensure_channel_first": True,
            "reader": "NibabelReader",
            "dtype": None,
        },
        "apply": apply,
        "predict": "$lambda case: @apply(image=@load_image(case['image']))",
        "run": [*_setup(), _runner(config)],
    }


def _runner(config: RunConfig) -> dict[str, Any]:
    """The per-case loop: progress per case, outputs named by case id, a non-zero exit when a case failed."""
    task = config.task
    common = {
        "cases": "@datalist",
        "predict": "@predict",
        "output_dir": "@output_dir",
        "channels": task.channels,
        "spatial_dims": task.spatial_dims,
    }
    if task.kind == "classification":
        names = [task.class_name(value) for value in range(task.num_classes)]
        return {"_target_": "scripts.runner.classify_cases", **common, "class_names": names}
    return {
        "_target_": "scripts.runner.predict_cases",
        **common,
        "postfix": OUTPUT_POSTFIX[task.kind],
        "label": task.kind == "segmentation",
    }


def _as_config(transform: Any) -> dict[str, Any]:
    """A MONAI intensity transform that fedmed built, as a ConfigParser entry (same class, same arguments)."""
    name = type(transform).__name__
    if name == "NormalizeIntensityd":
        inner = transform.normalizer
        return {"_target_": name, "keys": "image", "nonzero": inner.nonzero, "channel_wise": inner.channel_wise}
    if name == "ScaleIntensityRangePercentilesd":
        inner = transform.scaler
        return {
            "_target_": name,
            "keys": "image",
            "lower": inner.lower,
            "upper": inner.upper,
            "b_min": inner.b_min,
            "b_max": inner.b_max,
            "clip": inner.clip,
            "channel_wise": inner.channel_wise,
        }
    if name == "ScaleIntensityd":
        inner = transform.scaler
        return {
            "_target_": name,
            "keys": "image",
            "minv": inner.minv,
            "maxv": inner.maxv,
            "channel_wise": inner.channel_wise,
        }
    if name == "ScaleIntensityRanged":
        inner = transform.scaler
        return {
            "_target_": name,
            "keys": "image",
            "a_min": inner.a_min,
            "a_max": inner.a_max,
            "b_min": inner.b_min,
            "b_max": inner.b_max,
            "clip": inner.clip,
        }
    raise FedmedError(f"intensity transform {name} has no bundle form; export torchscript instead")
