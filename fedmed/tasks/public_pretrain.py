"""Public pre-training: the run's network trained centrally, without DP, on a public data set the coordinator holds.

`[pretrain] public = PATH` or `fedmed pretrain --public PATH`. The features a network can learn from public
images cost no privacy, so a DP federation starts from them and spends its budget only on adapting to the
hospitals. The choices:

- **Data.** Whatever a site reads: a site folder (its dataset.json), an MSD `dataset.json` or a MedMNIST-style
  `.npz`. fedmed never downloads it: the coordinator puts it on its own disk under its licence. It is read
  through the sites' own loading, resampling and intensity normalization (`open_sites`, as one site), so the
  network sees it as a site's preprocessing presents images. An MSD `dataset.json` as distributed lists no
  validation split: every HOLDOUT-th training case is then held out (a copy of the manifest in a temporary
  folder names the original files; the data set is never written to).
- **Training.** As for the phantoms (fedmed.tasks.pretrain): fedmed's own loop, `pretrain.epochs` epochs, no
  DP; the task's primary metric on the validation cases at the random init and after.
- **Provenance.** The data set's name (dataset.json's "name", else the folder's or the file's), its path, its
  training and validation case counts and a digest of its contents (`public_data_sha256`), which also keys
  the run directory's cache: a changed data set is trained on again, never taken from the cache.

Imports fedmed.data, fedmed.models, fedmed.config and fedmed.core only.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedmed.config import RunConfig
from fedmed.core.errors import ConfigError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.data.manifest import MANIFEST_NAME
from fedmed.data.npz import is_npz_site
from fedmed.data.scan_site import pooled_training_set
from fedmed.models import build_model

from .device import select_device
from .pretrain import PretrainResult, kept_random_states, open_sites, score_sites, with_channels
from .registry import get_task
from .training import train_local

HOLDOUT = 5  # without a validation split, every 5th training case (positions 5, 10, ...) is held out
WHOLE_FILE = 1 << 20  # files up to 1 MiB enter the digest whole; larger ones by their size, head and tail
EDGE = 64 << 10  # bytes of a larger file's head and tail in the digest
DIGEST_COVERS = (
    "dataset.json (whole) and each file its training and validation cases list, or the .npz: relative path, size "
    f"and bytes (whole up to {WHOLE_FILE >> 20} MiB, else the first and last {EDGE >> 10} KiB: a .nii.gz ends "
    "with its data's CRC-32, an .npz with its members')"
)


def public_pretrain(
    config: RunConfig, *, public: Path | None = None, epochs: int | None = None, seed: int | None = None
) -> PretrainResult:
    """Pre-train the run's network (model.name, channels, ...; not model.init) on the public data set `public`
    (default pretrain.public). Unset arguments come from `[pretrain]`; the global random states are left as
    they were."""
    path = existing_public(public if public is not None else config.pretrain.public)
    epochs = config.pretrain.epochs if epochs is None else epochs
    seed = config.pretrain_seed if seed is None else seed
    problems = [f"epochs must be at least 1 (got {epochs})"] if epochs < 1 else []
    problems += [f"the seed must be 0 or more (got {seed})"] if seed < 0 else []
    problems += [
        f"{path} is site '{site.name}''s data: the public data set must be one no site holds, or the pretraining "
        "would see (and score on) that site's cases; point pretrain.public at other data"
        for site in config.sites
        if _folder(site.path) == _folder(path)
    ]
    if problems:
        raise ConfigError("public pretraining: " + "; ".join(problems))
    with kept_random_states():
        return _pretrain(config, path=path, epochs=epochs, seed=seed)


def existing_public(path: Path | None) -> Path:
    """The public data set's path, refused with the fix when it is not there (fedmed never downloads it)."""
    if path is None:
        raise ConfigError("public pretraining needs a data set: set pretrain.public (or --public) to its path")
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"pretrain.public: {path} not found; fedmed never downloads public data: put the data set on this "
            "machine (under its licence) and point pretrain.public (or --public) at its site folder, its "
            "dataset.json or its .npz (relative paths in a config start at the config file's folder)"
        )
    return path


def _pretrain(config: RunConfig, *, path: Path, epochs: int, seed: int) -> PretrainResult:
    started = time.perf_counter()
    digest = public_data_sha256(path)
    task, device = get_task(config.task), select_device(config.train.device)
    with tempfile.TemporaryDirectory(prefix="fedmed-public-") as folder:
        site_path, validation = _site_path(path, scratch=Path(folder) / "public")
        run = with_channels(config)  # the loading checks the data's channels against these, when known
        (site,) = open_sites(run, [site_path], cache=Path(folder) / "preprocessed")
        if not site.num_train or not site.num_val:
            raise ConfigError(
                f"pretrain.public: {path} has {site.num_train} training and {site.num_val} validation case(s); "
                "public pretraining needs both: list more cases"
            )
        run = _with_data_channels(run, site)
        logger.info(
            "pretraining on public data set '%s' (%d training, %d validation cases), %d epoch(s), seed %d",
            site.name,
            site.num_train,
            site.num_val,
            epochs,
            seed,
        )
        torch.manual_seed(seed)
        model = build_model(run.task, run.model)
        random_value = score_sites(task, model, [site], device=device)
        training = pooled_training_set([site.train])
        train_local(model, training, task=task, train=run.train, epochs=epochs, seed=seed, device=device)
        value = score_sites(task, model, [site], device=device)
    result = PretrainResult(
        state={key: tensor.detach().to("cpu").clone() for key, tensor in model.state_dict().items()},
        metric=task.primary_metric,
        value=value,
        random_value=random_value,
        higher_is_better=task.higher_is_better,
        cases=site.num_train,
        val_cases=site.num_val,
        epochs=epochs,
        seed=seed,
        scanners=[],
        seconds=time.perf_counter() - started,
        public={
            "data_set": site.name,
            "data_path": str(path.absolute()),
            "data_sha256": digest,
            "validation": validation,
        },
    )
    logger.info(
        "public pretraining done in %.1f s: %s %.3f on %d validation cases of '%s' (random init %.3f)",
        result.seconds,
        result.metric,
        result.value,
        result.val_cases,
        site.name,
        result.random_value,
    )
    return result


def _with_data_channels(config: RunConfig, site: Any) -> RunConfig:
    """The network's input channels as the run resolves them (task.in_channels, else [synth]'s modalities: the
    loading checked the data against them), else the public data's own."""
    if config.task.in_channels is not None:
        return config
    resolved = config.model_copy(deep=True)
    channels = int(getattr(site, "channels", 0) or site.train[0]["image"].shape[0])
    resolved.task = config.task.model_copy(update={"in_channels": channels})
    return resolved


def _folder(path: Path) -> Path:
    path = Path(path).resolve()
    return path.parent if path.name == MANIFEST_NAME else path


def _site_path(path: Path, *, scratch: Path) -> tuple[Path, str]:
    """What the sites' loading opens, and where the validation cases come from: the data set itself, or (a
    dataset.json without a validation split) a copy of its manifest in `scratch` holding every HOLDOUT-th
    training case out, naming the original files by absolute path."""
    raw = _manifest_json(path)
    training = raw.get("training") if raw is not None else None
    if raw is None or raw.get("validation") or not isinstance(training, list) or len(training) < 2:
        return path, "its own validation split"  # the sites' loading reports whatever is wrong with it
    folder = _folder(path)
    held = set(range(HOLDOUT - 1, len(training), HOLDOUT)) or {len(training) - 1}
    entries = [_absolute(entry, folder=folder) for entry in training]
    derived = {key: value for key, value in raw.items() if key not in ("numTraining", "numValidation", "test")}
    derived.update(
        name=raw.get("name") or folder.name,
        training=[entry for index, entry in enumerate(entries) if index not in held],
        validation=[entry for index, entry in enumerate(entries) if index in held],
    )
    scratch.mkdir(parents=True, exist_ok=True)
    write_text_atomic(scratch / MANIFEST_NAME, json.dumps(derived, indent=1), private=False)
    return scratch, f"every {HOLDOUT}th training case held out ({len(held)})"


def _manifest_json(path: Path) -> dict[str, Any] | None:
    if is_npz_site(path):
        return None
    try:
        raw = json.loads((_folder(path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _absolute(entry: Any, *, folder: Path) -> Any:
    """A manifest entry with its file paths made absolute (relative ones start at the data set's folder)."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        return entry

    def absolute(value: Any) -> Any:
        if isinstance(value, list):
            return [absolute(item) for item in value]
        return str((folder / value).resolve()) if isinstance(value, str) else value

    return {**entry, **{key: absolute(entry[key]) for key in ("image", "label") if key in entry}}


def public_data_sha256(path: Path) -> str:
    """A digest of the public data set's contents, the cache's key (DIGEST_COVERS says what enters it)."""
    path = existing_public(path)
    if is_npz_site(path):
        root, files = path.parent, [path]
    else:
        root = _folder(path)
        raw = _manifest_json(path) or {}
        listed = [
            _absolute(entry, folder=root)
            for split in ("training", "validation")
            for entry in (raw.get(split) if isinstance(raw.get(split), list) else [])
        ]
        names = {name for entry in listed if isinstance(entry, dict) for name in _paths(entry)}
        files = [root / MANIFEST_NAME, *sorted(Path(name) for name in names)]
    digest = hashlib.sha256()
    for file in files:
        digest.update(_file_part(file, root=root))
    return digest.hexdigest()


def _paths(entry: dict[str, Any]) -> list[str]:
    values = [entry.get("image"), entry.get("label")]
    flat = [item for value in values for item in (value if isinstance(value, list) else [value])]
    return [item for item in flat if isinstance(item, str)]


def _file_part(file: Path, *, root: Path) -> bytes:
    """The file's relative path, its size and its bytes (whole when small, else head and tail); -1 when absent."""
    name = str(file.relative_to(root)) if file.is_relative_to(root) else str(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            if size <= WHOLE_FILE:
                content = handle.read()
            else:
                content = handle.read(EDGE)
                handle.seek(size - EDGE)
                content += handle.read(EDGE)
    except OSError:
        size, content = -1, b""
    return f"{name}\0{size}\0".encode() + hashlib.sha256(content).digest()
