"""Free knowledge first: pre-train the run's network on fedmed's own synthetic phantoms, privately free.

A DP run pays for every step it takes on patient data; what a network can learn from synthetic images costs
nothing, so it is learnt before the federation starts (`[pretrain]`, `fedmed pretrain`). The choices:

- **Phantoms.** The generator `[synth]` uses (fedmed.data.synthetic), for the run's task, dimensionality, classes
  and modalities: written as NIfTI site folders in a temporary folder and read back through the sites' own
  loading, resampling and intensity normalization (site-level modes fitted per scanner, as each site fits its
  own; Nyúl's landmarks averaged over the scanners), so the network sees phantoms exactly as a site's
  preprocessing presents images. With `[synth]` the phantoms use its image size, modalities, classes and
  spacing; without it (a deployed run, real `[[sites]]`) they follow `[task]` (scan geometry: a field of view
  of twice the training patch at `task.spacing`).
- **Scanners.** Always the drift-free reference scanner; in a simulation with `[synth]` also each
  `[[synth.sites]]` drift (`pretrain.variations`, on by default), the cases dealt evenly over them. The
  reference teaches anatomy and lesions; the variations teach the network to ignore the intensity, noise and
  resolution shifts the federation will meet. A deployed run's coordinator knows no site's scanner, so there
  the pretraining sees the reference scanner only. Honest caveat for simulations: the phantoms then come from
  the very generator and drifts of the simulated sites (other cases, never the same ones: see the seed), so a
  simulation overstates what pretraining gives on real data.
- **Seed.** `pretrain.seed`, default the sites' `synth.seed` + 1 (the run seed + 1 without `[synth]`); it is
  never the sites' seed (a config error), so no phantom repeats a simulated site's case, validation included.
- **Training.** Centrally with fedmed's own loop (`train_local`, the sites' optimizer, learning rate, batch
  size and augmentations, `pretrain.epochs` epochs) and no DP: the phantoms hold no patient, so no privacy
  budget is spent. The validation metric is the task's primary metric on `pretrain.val_cases` held-out
  phantoms (the phantom sites' validation split), beside the same network's random init on them.
- **Output.** A plain state dict (tensors only) that `[model] init` loads; a run with `[pretrain]` keeps it
  in its run directory (`pretrain/pretrained.pt`, with `pretrain.json`) and reuses it when resumed
  (fedmed.tasks.start_weights).

The sites' loading (`open_sites`), the scoring, the kept random states and `save_weights` serve the public data
set's pretraining too (fedmed.tasks.public_pretrain). Imports fedmed.data, fedmed.models, fedmed.config and
fedmed.core only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmed.config import RunConfig, SiteDrift, SynthConfig, TaskConfig, pretraining_unsupported
from fedmed.core.errors import ConfigError
from fedmed.core.files import atomic_path
from fedmed.core.log import logger
from fedmed.data import load_site, synthesize_federation
from fedmed.data.normalization import (
    SITE_LEVEL_MODES,
    STREAMED_MODES,
    average_landmarks,
    fit_site_stats,
    normalize_scan_sites,
    normalize_site,
)
from fedmed.data.scan_site import open_scan_site, pooled_training_set
from fedmed.models import build_model

from .device import select_device
from .registry import get_task
from .training import train_local

REFERENCE_SCANNER = "reference"
# Generic contrasts for multi-channel phantoms when no [synth] names the modalities.
DEFAULT_MODALITIES = ("FLAIR", "T1", "T1Gd", "T2")
KIND = "synthetic pretraining"
PUBLIC_KIND = "public pretraining"


@dataclass
class PretrainResult:
    """The pretrained network's weights and how well it does on held-out phantoms (or the public data set's
    validation cases)."""

    state: dict[str, torch.Tensor]
    metric: str  # the task's primary metric
    value: float  # on the held-out phantoms, after pretraining
    random_value: float  # the same network at its random init, on the same phantoms
    higher_is_better: bool
    cases: int
    val_cases: int
    epochs: int
    seed: int
    scanners: list[str]  # "reference", then the [[synth.sites]] whose drift was used (none: public data)
    seconds: float
    # Public pretraining: the data set's "data_set" (name), "data_path", "data_sha256" and "validation" (its split).
    public: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return PUBLIC_KIND if self.public is not None else KIND

    def describe(self) -> dict[str, Any]:
        """What the run directory and summary record about the pretraining."""
        source = {**self.public} if self.public is not None else {"scanners": list(self.scanners)}
        return {
            "kind": self.kind,
            **source,
            "cases": self.cases,
            "val_cases": self.val_cases,
            "epochs": self.epochs,
            "seed": self.seed,
            "metric": self.metric,
            "value": self.value,
            "random_value": self.random_value,
            "seconds": round(self.seconds, 2),
        }


def pretrain(
    config: RunConfig,
    *,
    cases: int | None = None,
    val_cases: int | None = None,
    epochs: int | None = None,
    seed: int | None = None,
) -> PretrainResult:
    """Pre-train the run's network (model.name, channels, ... ; not model.init) on synthetic phantoms of its task.

    Unset arguments come from `[pretrain]` (its `enabled` does not matter here). The global random states
    (torch, numpy, Python) are left as they were: a run that pretrains draws the rest of its randomness as one
    that does not."""
    cases = config.pretrain.cases if cases is None else cases
    val_cases = config.pretrain.val_cases if val_cases is None else val_cases
    epochs = config.pretrain.epochs if epochs is None else epochs
    seed = config.pretrain_seed if seed is None else seed
    _check(config, cases=cases, val_cases=val_cases, epochs=epochs, seed=seed)
    with kept_random_states():
        return _pretrain(config, cases=cases, val_cases=val_cases, epochs=epochs, seed=seed)


def _check(config: RunConfig, *, cases: int, val_cases: int, epochs: int, seed: int) -> None:
    counts = (("cases", cases), ("val_cases", val_cases), ("epochs", epochs))
    problems = [f"{name} must be at least 1 (got {value})" for name, value in counts if value < 1]
    if seed < 0:
        problems.append(f"the seed must be 0 or more (got {seed})")
    if config.synth is not None and seed == config.synth.seed:
        problems.append(
            f"seed {seed} is synth.seed: the phantoms would repeat the simulated sites' own cases, validation "
            "included; choose another seed (default: synth.seed + 1)"
        )
    if problem := pretraining_unsupported(config.task):
        problems.append(problem)
    if problems:
        raise ConfigError("pretraining: " + "; ".join(problems))


def _pretrain(config: RunConfig, *, cases: int, val_cases: int, epochs: int, seed: int) -> PretrainResult:
    started = time.perf_counter()
    run = with_channels(config)
    synth = phantom_synth(run, cases=cases, val_cases=val_cases, seed=seed)
    scanners = [drift.name for drift in synth.sites]
    variations = [site.name for site in (run.synth.sites if run.synth else [])][: len(scanners) - 1]
    logger.info(
        "pretraining on %d synthetic %s phantoms (%d held out) from %d scanner(s), %d epoch(s), seed %d",
        cases,
        run.task.kind,
        val_cases,
        len(scanners),
        epochs,
        seed,
    )
    task, device = get_task(run.task), select_device(run.train.device)
    with tempfile.TemporaryDirectory(prefix="fedmed-pretrain-") as folder:
        entries = synthesize_federation(synth, Path(folder) / "phantoms")
        sites = open_sites(run, [entry.path for entry in entries], cache=Path(folder) / "preprocessed")
        torch.manual_seed(seed)
        model = build_model(run.task, run.model)
        random_value = score_sites(task, model, sites, device=device)
        train_local(
            model,
            pooled_training_set([site.train for site in sites]),
            task=task,
            train=run.train,
            epochs=epochs,
            seed=seed,
            device=device,
        )
        value = score_sites(task, model, sites, device=device)
    state = {key: tensor.detach().to("cpu").clone() for key, tensor in model.state_dict().items()}
    result = PretrainResult(
        state=state,
        metric=task.primary_metric,
        value=value,
        random_value=random_value,
        higher_is_better=task.higher_is_better,
        cases=cases,
        val_cases=val_cases,
        epochs=epochs,
        seed=seed,
        scanners=[REFERENCE_SCANNER, *variations],
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "pretraining done in %.1f s: %s %.3f on %d held-out phantoms (random init %.3f)",
        result.seconds,
        result.metric,
        result.value,
        val_cases,
        result.random_value,
    )
    return result


def with_channels(config: RunConfig) -> RunConfig:
    """The network's input channels as the run resolves them: task.in_channels, else [synth]'s modalities, else 1
    (real multi-modal [[sites]]: set task.in_channels, which a simulation otherwise takes from their data)."""
    if config.task.in_channels is not None or config.synth is None:
        return config
    resolved = config.model_copy(deep=True)
    resolved.task = config.task.model_copy(update={"in_channels": len(config.synth.modalities)})
    return resolved


def phantom_synth(config: RunConfig, *, cases: int, val_cases: int, seed: int) -> SynthConfig:
    """The [synth] config the phantoms are drawn from: the reference scanner and (pretrain.variations) the
    [[synth.sites]] drifts, `cases` training and `val_cases` validation cases dealt evenly over them."""
    task, synth = config.task, config.synth
    drifts = [SiteDrift(name=REFERENCE_SCANNER)]
    if synth is not None and config.pretrain.variations:
        # Each site's scanner and population (its drift, prevalence, spacing), under a name of the phantoms' own.
        drifts += [
            drift.model_copy(update={"name": f"scanner-{index}", "train_cases": None, "val_cases": None})
            for index, drift in enumerate(synth.sites, start=1)
        ]
    drifts = drifts[: min(len(drifts), cases, val_cases)]  # every scanner gets a training and a validation case
    train_counts, val_counts = _deal(cases, len(drifts)), _deal(val_cases, len(drifts))
    sites = [
        drift.model_copy(update={"train_cases": train, "val_cases": val}).model_dump()
        for drift, train, val in zip(drifts, train_counts, val_counts)
    ]
    raw = synth.model_dump() if synth is not None else _synth_from_task(task, config=config)
    raw.update({"sites": sites, "seed": seed, "train_cases": max(train_counts), "val_cases": max(val_counts)})
    return SynthConfig.model_validate(raw)


def _synth_from_task(task: TaskConfig, *, config: RunConfig) -> dict[str, Any]:
    channels = task.channels
    modalities = ["MRI"] if channels == 1 else _modalities(channels)
    raw: dict[str, Any] = {
        "task": task.kind,
        "spatial_dims": task.spatial_dims,
        "image_size": list(task.image_size),
        "modalities": modalities,
        "num_classes": task.num_classes if task.kind == "segmentation" and not task.binarize_labels else 2,
    }
    if task.scan_geometry:
        # No fixed grid: a field of view of twice the training patch, written at the run's voxel spacing.
        patch = config.train.patch_size or [32, 32, 32]
        raw.update({"image_size": [2 * size for size in patch], "spacing": list(task.spacing or [])})
    return raw


def _modalities(channels: int) -> list[str]:
    named = list(DEFAULT_MODALITIES[:channels])
    return named + [f"channel{index}" for index in range(len(named), channels)]


def _deal(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts differing by at most one, the larger first."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def open_sites(config: RunConfig, paths: list[Path], *, cache: Path) -> list[Any]:
    """The sites at `paths` (phantoms, or the public data set) as a site's preprocessing presents them
    (fedmed.site.cases does the same)."""
    task, settings = config.task, config.normalization
    if task.scan_geometry:
        scans = [open_scan_site(path, config=config, cache_dir=cache / path.name) for path in paths]
        if task.intensity in STREAMED_MODES:  # per scanner, as each site fits its own; Nyúl's landmarks averaged
            normalize_scan_sites(scans, method=task.intensity, settings=settings)
        return scans
    # Site-level modes load the raw intensities; each scanner is then normalized with its own statistics.
    sites = [load_site(path, task=task, cache=False) for path in paths]
    if task.intensity not in SITE_LEVEL_MODES:
        return sites
    stats = [
        fit_site_stats([sample["image"] for sample in site.train], method=task.intensity, settings=settings)
        for site in sites
    ]
    standard = None
    if task.intensity == "nyul":
        standard = average_landmarks([(fitted.values["landmarks"], fitted.num_images) for fitted in stats])
    return [
        normalize_site(site, method=task.intensity, stats=fitted, standard_landmarks=standard, settings=settings)
        for site, fitted in zip(sites, stats)
    ]


def score_sites(task: Any, model: torch.nn.Module, sites: list[Any], *, device: torch.device) -> float:
    """The primary metric on the held-out phantoms: over all of them at once (fixed grid), else the case-weighted
    mean of the scanners' scores (whole volumes, scored per phantom site)."""
    if isinstance(sites[0].val, list):
        samples = [sample for site in sites for sample in site.val]
        return float(task.evaluate(model, samples, device=device)[task.primary_metric])
    metric = task.primary_metric
    scores = [(float(task.evaluate(model, site.val, device=device)[metric]), len(site.val)) for site in sites]
    return sum(score * count for score, count in scores) / sum(count for _, count in scores)


@contextlib.contextmanager
def kept_random_states() -> Iterator[None]:
    """Restore torch's, numpy's and Python's global random states on exit."""
    states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def save_weights(state: dict[str, torch.Tensor], path: Path) -> str:
    """Write a plain state dict (tensors only, what model.init loads) atomically; its sha256. Serialized in
    memory first: torch.save names its archive after the file, so the same weights always give the same bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    with atomic_path(Path(path), private=False) as temporary:
        temporary.write_bytes(data)
    return hashlib.sha256(data).hexdigest()
