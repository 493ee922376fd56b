"""A trained model and the run config that made it, from wherever it was left.

`fedmed predict` and `fedmed export` accept a run directory (its global model, or with `site` a site's
personalized model), a checkpoint inside one, a site's own run folder (a deployed site's personalized
model, without the coordinator) or a bundle that `fedmed export` wrote.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmed.config import RunConfig, load_run_config
from fedmed.core.errors import FedmedError
from fedmed.models import build_model
from fedmed.runs import RunDirectory
from fedmed.runs.cross_site import final_evaluation, personal_model_name
from fedmed.runs.model_card import ModelCard, read_model_card
from fedmed.site.local_layers import DELIVERED_FILE, PERSONALIZED_FILE

BUNDLE_RUN_CONFIG = "configs/fedmed_run.toml"
BUNDLE_WEIGHTS = "models/model.pt"
BUNDLE_MODEL_CARD_DIR = "configs"  # configs/model_card.json: the run's card travels with its bundle


class ModelSourceError(FedmedError):
    """The given path holds no model fedmed can apply."""


@dataclass
class TrainedModel:
    config: RunConfig
    state_dict: dict[str, torch.Tensor]
    description: str  # "global model of run X after N rounds", for logs and provenance
    run_dir: RunDirectory | None = None
    site: str | None = None  # set for a site's personalized model
    provenance: dict[str, Any] = field(default_factory=dict)
    card: ModelCard | None = None  # the run's model card: temperature, OOD reference (a bundle carries a copy)

    def build(self, *, device: torch.device) -> nn.Module:
        """The network with these weights, in eval mode, on `device`."""
        model = build_model(self.config.task, self.config.model)
        try:
            model.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            raise ModelSourceError(
                f"{self.description}: the weights do not fit the network its config describes ({_first_line(error)}); "
                "the config or the weights file was changed after training"
            ) from None
        return model.to(device).eval()


def load_trained_model(path: Path, *, site: str | None = None, ensemble: bool = False) -> TrainedModel:
    """The model at `path`; with `ensemble`, a run directory whose global model FedBN left untrained gives its first
    shared personalized model instead (the ensemble's members come from `ensemble_members`)."""
    path = Path(path)
    if ensemble and site is None and (path / "checkpoints").is_dir() and (path / "config.toml").is_file():
        return ensemble_members(RunDirectory(path))[0]
    if not path.exists():
        raise ModelSourceError(f"{path}: not found; give a run directory, a checkpoint (.pt) or an exported bundle")
    if path.is_file():
        return _from_checkpoint_file(path, site=site)
    if (path / BUNDLE_RUN_CONFIG).is_file():
        return _from_bundle(path)
    if (path / "checkpoints").is_dir() and (path / "config.toml").is_file():
        return _from_run_dir(RunDirectory(path), site=site)
    if (path / PERSONALIZED_FILE).is_file() and (path / "config.toml").is_file():
        return _personalized(path, config_file=path / "config.toml", name=site or path.name)
    raise ModelSourceError(
        f"{path}: holds no trained model; give a run directory ('fedmed simulate' or 'fedmed run' printed it), "
        f"a site's run folder (<site state>/runs/<run>, holding {PERSONALIZED_FILE}) or a bundle from 'fedmed export'"
    )


def ensemble_members(run_dir: RunDirectory | None, *, source: str = "the model") -> list[TrainedModel]:
    """The models an ensemble prediction combines: the run's global model (unless FedBN left it without
    normalization layers) and every site's personalized model that its site let travel, i.e. that the other
    sites scored in the run's final cross-site evaluation. A model a site kept home is never used."""
    if run_dir is None:
        raise ModelSourceError(
            f"{source}: an ensemble combines the personalized models the sites of a run shared, and this holds one "
            "model; give the run directory, or use --uncertainty tta"
        )
    members: list[TrainedModel] = []
    final = run_dir.checkpoints / "final.pt"
    if final.is_file():
        # FedBN: the global model was never trained whole; the sites' models are the ensemble
        with contextlib.suppress(ModelSourceError):
            members.append(_global(final, run_dir=run_dir))
    for site in _travelling_sites(run_dir):
        if (run_dir.site_dir(site) / PERSONALIZED_FILE).is_file():
            members.append(_from_run_dir(run_dir, site=site))
    if len(members) < 2:
        raise ModelSourceError(
            f"{run_dir.path}: an ensemble needs at least two models, and this run has {len(members)} it may use "
            "(the global model, and sites' personalized models only where the site's policy "
            "share_personalized_model let them travel); use --uncertainty tta"
        )
    return members


def _travelling_sites(run_dir: RunDirectory) -> list[str]:
    evaluation = final_evaluation(run_dir) or {}
    metrics = evaluation.get("metrics", {})
    return sorted(
        site
        for site in evaluation.get("sites", [])
        if set(metrics.get(personal_model_name(site), {})) - {site}  # scored away from home: it travelled
    )


def _from_run_dir(run_dir: RunDirectory, *, site: str | None) -> TrainedModel:
    if site is not None:
        folder = run_dir.site_dir(site)
        if not (folder / PERSONALIZED_FILE).is_file():
            sites = sorted(p.parent.name for p in (run_dir.path / "sites").glob(f"*/{PERSONALIZED_FILE}"))
            raise ModelSourceError(
                f"{run_dir.path}: no personalized model for site '{site}' "
                f"({'sites with one: ' + ', '.join(sites) if sites else 'this run kept none at the coordinator'}); "
                "a deployed site applies its own from its state folder: fedmed predict <state>/runs/<run> ..."
            )
        return _personalized(folder, config_file=run_dir.config_file, name=site, run_dir=run_dir)
    final = run_dir.checkpoints / "final.pt"
    if not final.is_file():
        raise ModelSourceError(
            f"{run_dir.path}: the run has not finished (no checkpoints/final.pt); resume it, or give "
            f"--site NAME for a site's personalized model"
        )
    return _global(final, run_dir=run_dir)


def _from_checkpoint_file(path: Path, *, site: str | None) -> TrainedModel:
    if path.name == PERSONALIZED_FILE:
        config_file = path.parent / "config.toml"
        if not config_file.is_file():
            config_file = path.parent.parent.parent / "config.toml"  # a simulation's sites/<site>/
        return _personalized(path.parent, config_file=config_file, name=site or path.parent.name)
    run_dir = RunDirectory(path.parent.parent)  # <run>/checkpoints/<name>.pt
    if not run_dir.config_file.is_file():
        raise ModelSourceError(
            f"{path}: no config.toml in {run_dir.path}, so the network and preprocessing are unknown; give the "
            "run directory the checkpoint came from, or an exported bundle"
        )
    return _global(path, run_dir=run_dir)


def _global(checkpoint_file: Path, *, run_dir: RunDirectory) -> TrainedModel:
    try:  # tensors and plain values only: a model file is never a way to run code here
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        checkpoint = {}  # objects beyond tensors: latest.pt (random-number state for resuming) or a foreign file
    except Exception as error:  # torch raises OS, zip and runtime errors for a cut-short or damaged file
        raise ModelSourceError(
            f"{checkpoint_file}: cannot be read as a model checkpoint ({_first_line(error)}: the file is cut short "
            "or damaged, e.g. by a full disk or an interrupted copy); copy it again from where the run was trained, "
            "or restore it from a backup"
        ) from None
    if "state_dict" not in checkpoint:
        raise ModelSourceError(
            f"{checkpoint_file}: not a model checkpoint (a resume checkpoint holds the shared parameters only, and "
            "nothing but tensors and plain values is read); give checkpoints/final.pt of a finished run"
        )
    local = checkpoint.get("site_local_keys") or []
    if local:
        raise ModelSourceError(
            f"{run_dir.path}: trained with FedBN, so the global model's {len(local)} normalization parameters never "
            "left the sites and were never trained; apply a site's personalized model with --site NAME"
        )
    config = load_run_config(run_dir.config_file)
    rounds = checkpoint.get("round", config.train.rounds)
    return TrainedModel(
        config=config,
        state_dict=checkpoint["state_dict"],
        description=f"global model of run {run_dir.path.name} after {rounds} round(s)",
        run_dir=run_dir,
        provenance={"model": "global", "rounds": rounds},
        card=read_model_card(run_dir.path),
    )


def _read_state_dict(path: Path, *, instead: str) -> dict:
    try:  # tensors only, as for the global model
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip, OS and runtime errors for the same damage
        raise ModelSourceError(
            f"{path}: cannot be read as a model ({type(error).__name__}: {error}); restore it from a backup{instead}"
        ) from None


def _personalized(folder: Path, *, config_file: Path, name: str, run_dir: RunDirectory | None = None) -> TrainedModel:
    if not config_file.is_file():
        raise ModelSourceError(f"{folder}: no config.toml beside {PERSONALIZED_FILE}; give the run directory")
    if (folder / DELIVERED_FILE).is_file():  # the site chose between global and personalized on its tuning split
        state = _read_state_dict(folder / DELIVERED_FILE, instead=" or move it aside to apply the personalized model")
        description, model = f"delivered model of site {name} ({folder})", f"delivered:{name}"
    else:
        state = _read_state_dict(folder / PERSONALIZED_FILE, instead="")
        description, model = f"personalized model of site {name} ({folder})", f"personalized:{name}"
    return TrainedModel(
        config=load_run_config(config_file),
        state_dict=state,
        description=description,
        run_dir=run_dir,
        site=name,
        provenance={"model": model},
        card=read_model_card(run_dir.path) if run_dir is not None else None,
    )


def _from_bundle(path: Path) -> TrainedModel:
    metadata_file = path / "configs" / "metadata.json"
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8")) if metadata_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelSourceError(
            f"{metadata_file}: unreadable ({_first_line(error)}); copy the bundle again, or export it again "
            "from its run"
        ) from None
    return TrainedModel(
        config=load_run_config(path / BUNDLE_RUN_CONFIG),
        state_dict=_read_state_dict(path / BUNDLE_WEIGHTS, instead=", or export the bundle again from its run"),
        description=f"bundle {path.name}",
        provenance=metadata.get("fedmed", {}),
        card=read_model_card(path / BUNDLE_MODEL_CARD_DIR),
    )


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
