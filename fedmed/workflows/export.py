"""Hand a trained model over: a MONAI Bundle that runs without fedmed, or one TorchScript file.

The bundle follows MONAI's layout: `configs/metadata.json` (network, inputs and outputs, channel names,
labels, intended use and fedmed's provenance), `configs/inference.json` (MONAI's ConfigParser syntax, see
bundle_inference.py), `configs/logging.conf`, `models/model.pt` (the network's state dict), a README and a
licence note. The code the config imports ships in `scripts/`, copied from fedmed modules that import nothing
of fedmed (case finding, the per-case runner, fixed-grid resizing), as MONAI bundles ship their own code.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

import fedmed
import fedmed.data
import fedmed.models
from fedmed.config import RunConfig, dump_toml
from fedmed.core.errors import FedmedError
from fedmed.core.files import atomic_path, unwritable_reason, write_text_atomic
from fedmed.models import build_model
from fedmed.models.enhancer import ResidualEnhancer
from fedmed.runs.model_card import write_model_card

from .bundle_docs import (
    bundle_metadata,
    bundle_readme,
    channel_names,
    handover_config,
    licence_note,
    logging_conf,
    provenance,
    temperature,
)
from .bundle_inference import inference_config
from .trained_model import BUNDLE_MODEL_CARD_DIR, BUNDLE_RUN_CONFIG, BUNDLE_WEIGHTS, TrainedModel

_CASE_SCRIPTS = {"case_layout.py": "data/case_layout.py", "runner.py": "workflows/bundle_runner.py"}  # in fedmed/
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
    _copy_scripts(out_dir, fixed_grid=not config.task.scan_geometry, enhancer=config.task.kind == "enhancement")
    names = channel_names(config)
    inference = inference_config(config, network, channel_names=names, temperature=temperature(trained))
    _write_json(out_dir / "configs" / "inference.json", inference)
    write_text_atomic(out_dir / "configs" / "logging.conf", logging_conf(), private=False)
    _write_json(out_dir / "configs" / "metadata.json", bundle_metadata(trained, weights=out_dir / BUNDLE_WEIGHTS))
    write_text_atomic(out_dir / BUNDLE_RUN_CONFIG, dump_toml(handover_config(config)), private=False)
    if trained.card is not None:
        write_model_card(out_dir / BUNDLE_MODEL_CARD_DIR, trained.card, private=False)
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


def _copy_scripts(out_dir: Path, *, fixed_grid: bool, enhancer: bool) -> None:
    scripts = out_dir / "scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "__init__.py").write_text("", encoding="utf-8")
    package = Path(fedmed.__file__).parent
    for name, source in _CASE_SCRIPTS.items():
        shutil.copyfile(package / source, scripts / name)
    data = Path(fedmed.data.__file__).parent
    for name in _FIXED_GRID_SCRIPTS if fixed_grid else ():
        shutil.copyfile(data / name, scripts / name)
    if enhancer:
        shutil.copyfile(Path(fedmed.models.__file__).parent / "enhancer.py", scripts / "enhancer.py")


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", private=False)
