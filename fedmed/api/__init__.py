"""fedmed's Python API: load a run config, simulate a federation, read its results, apply and export its model.

A thin facade over fedmed.workflows, fedmed.config and fedmed.runs, and the stable way in for scripts,
notebooks and fedmed's own `experiments/`: the packages below it may change their layout, these names do
not. Everything here is also importable from `fedmed` itself.

    import fedmed

    config = fedmed.load_config("my-run.toml", overrides=["train.rounds=3"])
    run = fedmed.simulate(config)
    print(run.table)
    fedmed.predict(run.run_dir, ["new-scans/"], out="predictions")
    fedmed.export(run.run_dir, out="bundle")

Components that fedmed's benchmarks measure on purpose (the local training loop, SecAgg+ masking,
sliding-window inference, a deployed federation on this machine) are in `fedmed.api.bench`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn

from fedmed.config import (
    ClientDpConfig,
    DpSgdConfig,
    InferenceConfig,
    ModelConfig,
    NormalizationConfig,
    RunConfig,
    SecAggConfig,
    ServerConfig,
    SiteDrift,
    SiteEntry,
    SynthConfig,
    TaskConfig,
    TrainConfig,
    apply_overrides,
    load_run_config,
    load_server_config,
    read_toml,
    run_config_from_dict,
)
from fedmed.core.errors import ConfigError, FedmedError
from fedmed.data import Case, SiteData, cases_from_folder_pairs, cases_from_subfolders, split_into_sites, write_manifest
from fedmed.flower.runtime.environment import set_flower_verbosity
from fedmed.models import build_model as _build_model
from fedmed.tasks import Task, select_device
from fedmed.tasks import get_task as _get_task
from fedmed.workflows import demo
from fedmed.workflows import simulate as simulation
from fedmed.workflows.export import export_model
from fedmed.workflows.predict import CaseOutcome, PredictOptions, input_cases, predict_cases
from fedmed.workflows.trained_model import load_trained_model

from .results import Prediction, RunResults, open_run, read_results
from .sites import load_site, materialize_sites, site_data, synthesize_federation

__all__ = [
    "Case",
    "CaseOutcome",
    "ClientDpConfig",
    "ConfigError",
    "DpSgdConfig",
    "FedmedError",
    "InferenceConfig",
    "ModelConfig",
    "NormalizationConfig",
    "Prediction",
    "RunConfig",
    "RunResults",
    "SecAggConfig",
    "ServerConfig",
    "SiteData",
    "SiteDrift",
    "SiteEntry",
    "SynthConfig",
    "Task",
    "TaskConfig",
    "TrainConfig",
    "build_model",
    "cases_from_folder_pairs",
    "cases_from_subfolders",
    "demo_config",
    "demo_config_file",
    "export",
    "get_task",
    "load_config",
    "load_server_config",
    "load_site",
    "materialize_sites",
    "open_run",
    "predict",
    "read_toml",
    "resume",
    "set_flower_verbosity",
    "simulate",
    "site_data",
    "split_into_sites",
    "synthesize_federation",
    "write_manifest",
]

# --- configs -----------------------------------------------------------------------------------------------


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    base: str | os.PathLike[str] | None = None,
    label: str | None = None,
) -> RunConfig:
    """Load and validate a run config.

    Args:
        source: A TOML file, or the TOML's content as a mapping (sections as nested mappings).
        overrides: `section.key=value` changes applied before validation, as `fedmed simulate --set`
            takes them, e.g. `["train.rounds=3", "strategy.name=fedprox"]`.
        base: For a mapping: the folder relative `output_dir`, site and `model.init` paths start at
            (default: the working folder). A file's paths start at the file's folder.
        label: For a mapping: how error messages name it (default: "run config").

    Returns:
        The validated config, its paths absolute.

    Raises:
        ConfigError: The file is missing or not TOML, or a value is invalid; the message names the
            file, every field at fault and the fix.
    """
    changes = [overrides] if isinstance(overrides, str) else list(overrides)
    if isinstance(source, Mapping):
        raw = apply_overrides(copy.deepcopy(dict(source)), changes)
        folder = Path(base) if base is not None else Path.cwd()
        return run_config_from_dict(raw, base=folder, source=label or "run config")
    return load_run_config(Path(source), overrides=changes)


def demo_config(
    *,
    output_dir: str | os.PathLike[str] = "runs",
    engine: Literal["inprocess", "ray"] | None = None,
    private: bool = False,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """The built-in demo's run config, as `fedmed demo` runs it.

    Three hospitals whose scanners differ segment lesions (2D), with local-only and pooled baselines.

    Args:
        output_dir: Where the synthetic data and the run directory go (relative: to the working folder).
        engine: "inprocess" or "ray" (default: the demo's own, in-process).
        private: DP-SGD at every hospital (ε 8), fine-tuning from pre-training on synthetic phantoms,
            over 4 rounds (`fedmed demo --private`).
        overrides: `section.key=value` changes, applied last (see `load_config`).

    Returns:
        The validated config.
    """
    changes = [overrides] if isinstance(overrides, str) else list(overrides)
    return demo.demo_config(output_dir=Path(output_dir), engine=engine, private=private, overrides=changes)


def demo_config_file() -> Path:
    """The packaged demo config file: a complete example to copy and edit.

    Returns:
        The path of demo.toml inside the installed fedmed.
    """
    return demo.demo_config_file()


# --- runs --------------------------------------------------------------------------------------------------


def simulate(config: RunConfig, *, flower_logs: bool = False) -> RunResults:
    """Simulate the federation on this machine: the federated run, its baselines, summary and report.

    Everything that can be checked from the config and the data is checked before the run directory
    is made, so a bad input leaves no half-made run behind.

    Args:
        config: The run config (`load_config`, `demo_config`); a [synth] section generates its sites
            under `output_dir` first.
        flower_logs: Show Flower's own INFO logging (fedmed logs its progress either way).

    Returns:
        The run's results, read back from its new run directory under `config.output_dir`.

    Raises:
        ConfigError: The config or the data cannot make this run (the message names the fix).
        FedmedError: The run failed or was interrupted; an interrupted run can be resumed (`resume`).
    """
    set_flower_verbosity(flower_logs)
    result = simulation.simulate(config)
    return read_results(result.run_dir, config=result.config, summary=result.summary)


def resume(run_dir: str | os.PathLike[str], *, flower_logs: bool = False) -> RunResults:
    """Continue an interrupted simulation from its last checkpoint, with its own config.

    Args:
        run_dir: The interrupted run's directory.
        flower_logs: Show Flower's own INFO logging.

    Returns:
        The run's results once it has finished.

    Raises:
        FedmedError: The folder is no run that can be resumed, or the run failed again.
    """
    set_flower_verbosity(flower_logs)
    result = simulation.resume_simulation(Path(run_dir))
    return read_results(result.run_dir, config=result.config, summary=result.summary)


# --- trained models ----------------------------------------------------------------------------------------


def predict(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    site: str | None = None,
    device: str = "auto",
    uncertainty: Literal["none", "tta", "ensemble"] = "none",
    explain: bool = True,
    report: bool = True,
) -> Prediction:
    """Apply a trained model to new scans, as `fedmed predict` does.

    Each case is checked like training data; a bad case is reported (in the result and cases.csv) with
    the reason and the fix, and the others still complete.

    Args:
        model: A run directory (its global model), a checkpoint inside one, a site's run folder or a
            bundle that `export` wrote.
        images: NIfTI files (one per case), folders of them, folders of subject folders (one multi-modal
            case each) or a dataset.json.
        out: The output folder: label maps or restored images on each scan's own grid named by case id,
            cases.csv (inputs, outputs, scores), predictions.csv with the class probabilities of a
            classifier, and report.html.
        site: Apply this site's personalized model from the run directory instead of the global one.
        device: "auto" (CUDA when present), "cpu" or "cuda".
        uncertainty: "tta" (test-time flips) or "ensemble" (the models the sites shared): an uncertainty
            map per case on its source grid and a per-case score.
        explain: Classification: a saliency map per case.
        report: Write report.html.

    Returns:
        The output folder, the model applied and one outcome per case.

    Raises:
        FedmedError: The model or the inputs cannot be found or read, or `out` cannot be written.
    """
    trained = load_trained_model(Path(model), site=site, ensemble=uncertainty == "ensemble")
    inputs = [images] if isinstance(images, str | os.PathLike) else list(images)
    cases = input_cases([Path(path) for path in inputs], task=trained.config.task)
    options = PredictOptions(uncertainty=uncertainty, explain=explain, report=report)
    outcomes = list(predict_cases(trained, cases, out_dir=Path(out), device=select_device(device), options=options))
    return Prediction(out_dir=Path(out), model=trained.description, cases=outcomes)


def export(
    model: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    format: Literal["bundle", "torchscript"] = "bundle",
    site: str | None = None,
) -> Path:
    """Hand a trained model over, as `fedmed export` does.

    Args:
        model: A run directory, a checkpoint inside one, a site's run folder or an exported bundle.
        out: "bundle": a new (or empty) folder for a MONAI Bundle that MONAI's bundle runner applies
            without fedmed; "torchscript": the file to write.
        format: "bundle" or "torchscript" (the network only: preprocessing is the caller's).
        site: Export this site's personalized model from the run directory instead of the global one.

    Returns:
        The bundle folder or the TorchScript file.

    Raises:
        FedmedError: The model cannot be read, the format is unknown or `out` cannot be written.
    """
    trained = load_trained_model(Path(model), site=site)
    return export_model(trained, out=Path(out), output_format=format)


def build_model(task: TaskConfig, model: ModelConfig | None = None) -> nn.Module:
    """The network a run with these [task] and [model] sections trains, freshly initialized.

    Args:
        task: The run's task (`config.task`).
        model: The run's model (`config.model`; default: fedmed's default network for the task).

    Returns:
        The network (torch.nn.Module), on the CPU, with weights from torch's current random state.
    """
    return _build_model(task, model if model is not None else ModelConfig())


def get_task(task: TaskConfig) -> Task:
    """The task object that trains and scores a network for `task`: its loss, metrics and evaluation.

    Args:
        task: The run's task (`config.task`).

    Returns:
        The task; `primary_metric` and `higher_is_better` say how its runs are compared.
    """
    return _get_task(task)
