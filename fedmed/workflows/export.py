"""Hand a trained model over: a MONAI Bundle that runs without fedmed, or one TorchScript file.

The bundle follows MONAI's layout: `configs/metadata.json` (network, inputs and outputs, channels,
labels, and fedmed's provenance), `configs/inference.json` (MONAI's ConfigParser syntax), `models/model.pt`
(the network's state dict), a README and a licence note. Scan-geometry models are pure MONAI: the run's
preprocessing as dictionary transforms, a SlidingWindowInferer and `Invertd` back onto each scan's grid.
Fixed-grid models resize like training did; that code ships in `scripts/` (copied from fedmed.data, which
imports nothing of fedmed), as MONAI bundles ship their own code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from fedmed.config import RunConfig, dump_toml
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.runs.run_dir import FLOWER_RUNS

from .trained_model import BUNDLE_RUN_CONFIG, BUNDLE_WEIGHTS, TrainedModel

_FIXED_GRID_SCRIPTS = ("preprocess.py", "fixed_grid.py")  # from fedmed/data


def write_bundle(trained: TrainedModel, *, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FedmedError(f"{out_dir}: exists and is not empty; give a new folder for the bundle")
    config = trained.config
    if config.task.kind == "enhancement" and config.task.scan_geometry:
        raise FedmedError(
            f"{trained.description}: bundles of scan-geometry enhancement models are not supported yet; export "
            "--format torchscript, or apply it with fedmed predict"
        )
    network = _network_def(config)
    for folder in ("configs", "models"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    torch.save({key: value.detach().cpu() for key, value in trained.state_dict.items()}, out_dir / BUNDLE_WEIGHTS)
    if not config.task.scan_geometry:  # scan geometry is pure MONAI
        _copy_scripts(out_dir, enhancer=config.task.kind == "enhancement")
    inference = (
        _scan_inference(config, network) if config.task.scan_geometry else _fixed_grid_inference(config, network)
    )
    _write_json(out_dir / "configs" / "inference.json", inference)
    _write_json(out_dir / "configs" / "metadata.json", _metadata(trained, weights=out_dir / BUNDLE_WEIGHTS))
    write_text_atomic(out_dir / BUNDLE_RUN_CONFIG, dump_toml(_handover_config(config)), private=False)
    write_text_atomic(out_dir / "README.md", _readme(trained), private=False)
    write_text_atomic(out_dir / "LICENSE", _licence_note(), private=False)
    return out_dir


def write_torchscript(trained: TrainedModel, *, path: Path) -> Path:
    """One file any PyTorch stack loads with torch.jit.load (the network only: preprocessing is the caller's)."""
    path = Path(path)
    model = trained.build(device=torch.device("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"fedmed.json": json.dumps(_provenance(trained))}
    with warnings.catch_warnings():
        # torch deprecates TorchScript for torch.export, but deployment stacks (Triton, LibTorch) still load it.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            scripted = torch.jit.script(model)
        except Exception:  # scripting fails on some MONAI blocks; tracing a fully convolutional net is equivalent
            example = torch.zeros(1, trained.config.task.channels, *_example_size(trained.config))
            scripted = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(scripted, str(path), _extra_files=extra)
    return path


# Network -----------------------------------------------------------------------------------------


def _network_def(config: RunConfig) -> dict[str, Any]:
    """The network as MONAI's ConfigParser builds it: the same constructor call fedmed.models makes."""
    from fedmed.models import build_model

    model = build_model(config.task, config.model)
    described = _describe(model)
    if described is None:
        raise FedmedError(f"model '{config.model.name}' cannot be described for a MONAI bundle; export torchscript")
    return described


def _describe(model: torch.nn.Module) -> dict[str, Any] | None:
    from fedmed.models.enhancer import ResidualEnhancer

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
    from fedmed.data.scans import intensity_transform

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
    from fedmed.data.loading import per_image_intensity

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


# Metadata, README, licence ---------------------------------------------------------------------------


def _metadata(trained: TrainedModel, *, weights: Path) -> dict[str, Any]:
    import monai
    import nibabel
    import numpy

    import fedmed

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
    provenance = _provenance(trained) | {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by fedmed {fedmed.__version__} from the {trained.description}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "optional_packages_version": {"nibabel": nibabel.__version__},
        "name": f"fedmed {trained.config.name} {task.kind}",
        "task": f"{task.spatial_dims}D {task.kind}",
        "description": f"{trained.description}, trained by federated learning with fedmed; data never left the sites",
        "authors": "the sites of the federation (see fedmed.sites)",
        "copyright": "the federation's members",
        "data_source": "federated: " + ", ".join(provenance.get("sites", [])),
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
        "fedmed": provenance,
    }


def _provenance(trained: TrainedModel) -> dict[str, Any]:
    """Who and what made the model: run, rounds, sites (names only), strategy, DP ε per site, app digest."""
    import fedmed

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
        from fedmed.runs.summary import privacy_spent

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


def _handover_config(config: RunConfig) -> RunConfig:
    """The run config without where the sites keep their data (folder names stay at the coordinator)."""
    update: dict[str, Any] = {"sites": [], "synth": None, "output_dir": Path("runs")}
    handed = config.model_copy(update=update)
    if getattr(handed.model, "init", None) is not None:
        handed.model = handed.model.model_copy(update={"init": None})
    return handed


def _readme(trained: TrainedModel) -> str:
    config = trained.config
    return f"""# {config.name}: {config.task.kind} model exported by fedmed

{trained.description}. Federated training: the images never left the sites; only model updates did.
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


def _licence_note() -> str:
    return (
        "The code in this bundle (configs, scripts) is from fedmed, Apache License 2.0.\n\n"
        "The model weights were trained on data held by the federation's sites. Terms of use of the weights\n"
        "are set by those sites and the federation's agreement, not by fedmed; check them before sharing\n"
        "this bundle beyond the federation. Not a medical device: for research use unless certified.\n"
    )


def _copy_scripts(out_dir: Path, *, enhancer: bool) -> None:
    import fedmed.data
    import fedmed.models

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
