"""Hand a trained model over: a MONAI Bundle that runs without fedmed, or one TorchScript file.

The bundle follows MONAI's layout: `configs/metadata.json` (network, inputs and outputs, channels,
labels, and fedmed's provenance), `configs/inference.json` (MONAI's ConfigParser syntax), `models/model.pt`
(the network's state dict), a README and a licence note. Scan-geometry models are pure MONAI: the run's
preprocessing as dictionary transforms, a SlidingWindowInferer and `Invertd` back onto each scan's grid.
Fixed-grid models resize like training did; that code ships in `scripts/` (copied from fedmed.data, which
imports nothing of fedmed), as MONAI bundles ship their own code.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

import fedmed.data
import fedmed.models
from fedmed.config import RunConfig, dump_toml
from fedmed.core.errors import FedmedError
from fedmed.core.files import atomic_path, unwritable_reason, write_text_atomic
from fedmed.data.loading import per_image_intensity
from fedmed.data.scans import intensity_transform
from fedmed.models import build_model
from fedmed.models.enhancer import ResidualEnhancer

from .bundle_docs import bundle_metadata, bundle_readme, handover_config, licence_note, provenance
from .trained_model import BUNDLE_RUN_CONFIG, BUNDLE_WEIGHTS, TrainedModel

_FIXED_GRID_SCRIPTS = ("preprocess.py", "fixed_grid.py")  # from fedmed/data
EXPORT_FORMATS = ("bundle", "torchscript")


class ExportOutputError(FedmedError):
    """The export's destination cannot be written."""


def export_model(trained: TrainedModel, *, out: Path, output_format: str) -> Path:
    """`bundle`: a MONAI Bundle in the new folder `out`; `torchscript`: one TorchScript file at `out`."""
    if output_format == "bundle":
        return write_bundle(trained, out_dir=out)
    if output_format == "torchscript":
        return write_torchscript(trained, path=out)
    raise FedmedError(f"--format '{output_format}' is not known; use {' or '.join(EXPORT_FORMATS)}")


def write_bundle(trained: TrainedModel, *, out_dir: Path) -> Path:
    """The bundle in `out_dir` (new, or an empty folder); on any failure nothing of it is left there."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FedmedError(f"{out_dir}: exists and is not an empty folder; give a new folder for the bundle")
    config = trained.config
    if config.task.kind == "enhancement" and config.task.scan_geometry:
        raise FedmedError(
            f"{trained.description}: bundles of scan-geometry enhancement models are not supported yet; export "
            "--format torchscript, or apply it with fedmed predict"
        )
    network = _network_def(config)
    created = not out_dir.exists()
    if problem := unwritable_reason(out_dir):
        _remove_partial(out_dir, created=created)
        raise ExportOutputError(_cannot_write(out_dir, problem))
    try:
        _write_bundle_files(trained, out_dir=out_dir, network=network)
    except BaseException as error:
        _remove_partial(out_dir, created=created)  # half a bundle would load and then fail somewhere else
        if isinstance(error, OSError):
            raise ExportOutputError(_cannot_write(out_dir, error.strerror or str(error))) from None
        raise
    return out_dir


def _write_bundle_files(trained: TrainedModel, *, out_dir: Path, network: dict[str, Any]) -> None:
    config = trained.config
    for folder in ("configs", "models"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    torch.save({key: value.detach().cpu() for key, value in trained.state_dict.items()}, out_dir / BUNDLE_WEIGHTS)
    if not config.task.scan_geometry:  # scan geometry is pure MONAI
        _copy_scripts(out_dir, enhancer=config.task.kind == "enhancement")
    inference = (
        _scan_inference(config, network) if config.task.scan_geometry else _fixed_grid_inference(config, network)
    )
    _write_json(out_dir / "configs" / "inference.json", inference)
    _write_json(out_dir / "configs" / "metadata.json", bundle_metadata(trained, weights=out_dir / BUNDLE_WEIGHTS))
    write_text_atomic(out_dir / BUNDLE_RUN_CONFIG, dump_toml(handover_config(config)), private=False)
    write_text_atomic(out_dir / "README.md", bundle_readme(trained), private=False)
    write_text_atomic(out_dir / "LICENSE", licence_note(), private=False)


def _remove_partial(out_dir: Path, *, created: bool) -> None:
    """Undo a failed export: the folder was new or empty before it, so all it holds now is the export's."""
    if created:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for child in out_dir.iterdir() if out_dir.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _cannot_write(target: Path, reason: str) -> str:
    return (
        f"{target}: cannot write the export there ({reason}); give --out a place on a disk you can write to "
        "(not read-only, not full), or fix that folder's permissions"
    )


def write_torchscript(trained: TrainedModel, *, path: Path) -> Path:
    """One file any PyTorch stack loads with torch.jit.load (the network only: preprocessing is the caller's)."""
    path = Path(path)
    model = trained.build(device=torch.device("cpu"))
    if problem := unwritable_reason(path.parent):
        raise ExportOutputError(_cannot_write(path, problem))
    extra = {"fedmed.json": json.dumps(provenance(trained))}
    with warnings.catch_warnings():
        # torch deprecates TorchScript for torch.export, but deployment stacks (Triton, LibTorch) still load it.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            scripted = torch.jit.script(model)
        except Exception:  # scripting fails on some MONAI blocks; tracing a fully convolutional net is equivalent
            example = torch.zeros(1, trained.config.task.channels, *_example_size(trained.config))
            scripted = torch.jit.trace(model, example, check_trace=False)
        try:  # written beside and renamed: a failure leaves no half file under the name
            with atomic_path(path, private=False) as temporary:
                torch.jit.save(scripted, str(temporary), _extra_files=extra)
        except OSError as error:
            raise ExportOutputError(_cannot_write(path, error.strerror or str(error))) from None
    return path


# Network -----------------------------------------------------------------------------------------


def _network_def(config: RunConfig) -> dict[str, Any]:
    """The network as MONAI's ConfigParser builds it: the same constructor call fedmed.models makes."""
    model = build_model(config.task, config.model)
    described = _describe(model)
    if described is None:
        raise FedmedError(f"model '{config.model.name}' cannot be described for a MONAI bundle; export torchscript")
    return described


def _describe(model: torch.nn.Module) -> dict[str, Any] | None:
    if isinstance(model, ResidualEnhancer):
        body = _describe(model.body)
        if body is None:
            return None
        head = model.head
        return {
            "_target_": "scripts.enhancer.ResidualEnhancer",
            "body": body,
            "spatial_dims": 3 if isinstance(head, torch.nn.Conv3d) else 2,
            "body_channels": head.in_channels,
            "channels": head.out_channels,
        }
    recorded = getattr(model, "constructor_config", None)
    return None if recorded is None else json.loads(json.dumps(recorded))  # tuples as JSON lists


def _example_size(config: RunConfig) -> list[int]:
    if config.task.scan_geometry:
        return list(config.roi_size)
    return list(config.task.image_size)


# inference.json ------------------------------------------------------------------------------------


def _common(config: RunConfig, network: dict[str, Any]) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch", "$import monai"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/images'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network,
        "network": "$@network_def.to(@device)",
        "load_weights": "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
        "map_location=@device, weights_only=True))",
    }


def _scan_inference(config: RunConfig, network: dict[str, Any]) -> dict[str, Any]:
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
    segmentation = task.kind == "segmentation"
    post: list[dict[str, Any]] = []
    if segmentation:
        post.append({"_target_": "Activationsd", "keys": "pred", "softmax": True})
    else:
        post.append({"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: x.clamp(0.0, 1.0)"})
    post += [
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": False,
            "to_tensor": True,
        },
    ]
    if segmentation:
        post.append({"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
    post.append(_saver("pred", postfix="seg" if segmentation else "enhanced", label=segmentation))
    return {
        **_common(config, network),
        "preprocessing": {"_target_": "Compose", "transforms": steps},
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': item} for item in @datalist]",
            "transform": "@preprocessing",
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(config.roi_size),
            "sw_batch_size": inference.sw_batch_size,
            "overlap": inference.overlap,
            "mode": inference.blend,
            "sw_device": "@device",
            "device": "$torch.device('cpu')",
        },
        "postprocessing": {"_target_": "Compose", "transforms": post},
        # The network's output takes the image's metadata, so Invertd finds the preprocessing to undo.
        "predict": "$lambda d: @postprocessing(dict(d, pred=monai.data.MetaTensor(@inferer(d['image'].as_tensor()[None]"
        ".float(), @network)[0].float().cpu(), meta=dict(d['image'].meta))))",
        "run": [
            "$@load_weights",
            "$@network.eval()",
            "$torch.set_grad_enabled(False)",
            "$[@predict(item) for item in @dataset]",
        ],
    }


def _fixed_grid_inference(config: RunConfig, network: dict[str, Any]) -> dict[str, Any]:
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
    common = {
        **_common(config, network),
        "load_image": {
            "_target_": "LoadImage",
            "image_only": True,
            "ensure_channel_first": True,
            "reader": "NibabelReader",
            "dtype": None,
        },
        "apply": apply,
    }
    setup = ["$@load_weights", "$@network.eval()", "$torch.set_grad_enabled(False)"]
    if task.kind == "classification":
        names = [task.class_name(value) for value in range(task.num_classes)]
        header = "case," + ",".join(f"p_{name}" for name in names)
        return {
            **common,
            "case_name": "$lambda f: os.path.basename(str(f if isinstance(f, str) else f[0])).split('.nii')[0]",
            "probability_row": "$lambda f: @case_name(f) + ',' + ','.join('%.6f' % float(p) for p in "
            "@apply(image=@load_image(f)))",
            "run": [
                *setup,
                "$os.makedirs(@output_dir, exist_ok=True)",
                f"$open(os.path.join(@output_dir, 'predictions.csv'), 'w').write('{header}\\n' + "
                "''.join(@probability_row(f) + '\\n' for f in @datalist))",
            ],
        }
    segmentation = task.kind == "segmentation"
    return {
        **common,
        "saver": {
            k: v
            for k, v in _saver("pred", postfix="seg" if segmentation else "enhanced", label=segmentation).items()
            if k != "keys"
        }
        | {"_target_": "SaveImage"},
        "run": [
            *setup,
            "$[@saver(monai.data.MetaTensor(@apply(image=image), meta=dict(image.meta))) for image in "
            "(@load_image(f) for f in @datalist)]",
        ],
    }


def _saver(key: str, *, postfix: str, label: bool) -> dict[str, Any]:
    return {
        "_target_": "SaveImaged",
        "keys": key,
        "output_dir": "@output_dir",
        "output_postfix": postfix,
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.uint8" if label else "$numpy.float32",
        "resample": False,
        "separate_folder": False,
        "print_log": False,
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


def _copy_scripts(out_dir: Path, *, enhancer: bool) -> None:
    scripts = out_dir / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "__init__.py").write_text("", encoding="utf-8")
    data = Path(fedmed.data.__file__).parent
    for name in _FIXED_GRID_SCRIPTS:
        shutil.copyfile(data / name, scripts / name)
    if enhancer:
        shutil.copyfile(Path(fedmed.models.__file__).parent / "enhancer.py", scripts / "enhancer.py")


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", private=False)
