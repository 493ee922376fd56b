"""The run's starting weights from pretraining, on phantoms (fedmed.tasks.pretrain) or on a public data set
(fedmed.tasks.public_pretrain): made once per run and kept in its run directory's pretrain/ folder with a
record of what made them, reused while the settings (and the public data) are the same; and `fedmed pretrain`'s
weights file for model.init.

Imports fedmed.data, fedmed.models, fedmed.config and fedmed.core only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedmed.config import RunConfig
from fedmed.core.errors import ConfigError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.models import InitialWeights, load_initial_weights

from .pretrain import PretrainResult, pretrain, save_weights, with_channels
from .public_pretrain import HOLDOUT, public_data_sha256, public_pretrain

PRETRAINED_WEIGHTS = "pretrained.pt"  # in the run directory's pretrain/ folder
PRETRAIN_RECORD = "pretrain.json"  # what produced it: settings, metric, sha256 (and the public data set)


def pretrained_start(config: RunConfig, *, folder: Path) -> tuple[InitialWeights, dict[str, Any]]:
    """The run's starting weights from its pretraining, kept in `folder` (the run directory's pretrain/): reused
    when they were made with the same settings and public data (a resumed run), made otherwise. The weights as
    model.init would read them, and the record (kind, settings, metric, file, sha256; the public data set)."""
    folder = Path(folder)
    weights_file, record_file = folder / PRETRAINED_WEIGHTS, folder / PRETRAIN_RECORD
    settings = _settings(config)
    record = _read_record(record_file)
    if record is not None and record.get("settings") == settings and weights_file.is_file():
        weights = load_initial_weights(weights_file)
        if weights.sha256 == record.get("sha256"):
            logger.info("starting from the run's pretrained weights %s (%s)", weights_file, weights.sha256[:12])
            return weights, record
    result = public_pretrain(config) if config.pretrain.public is not None else pretrain(config)
    digest = save_weights(result.state, weights_file)
    record = {**result.describe(), "file": str(weights_file), "sha256": digest, "settings": settings}
    write_text_atomic(record_file, json.dumps(record, indent=1), private=False)
    return load_initial_weights(weights_file), record


def _settings(config: RunConfig) -> dict[str, Any]:
    """Everything the pretrained weights depend on, so a cached file is reused only for the same ones: with a
    public data set its contents' digest (fedmed.tasks.public_pretrain.DIGEST_COVERS), not its path."""
    pretrain = config.pretrain
    if pretrain.public is not None:
        return {
            "public_sha256": public_data_sha256(pretrain.public),
            "holdout": HOLDOUT,
            "epochs": pretrain.epochs,
            "seed": config.pretrain_seed,
            "config": _fingerprint(config, synth=False),
        }
    return {
        "cases": pretrain.cases,
        "val_cases": pretrain.val_cases,
        "epochs": pretrain.epochs,
        "seed": config.pretrain_seed,
        "variations": pretrain.variations,
        "config": _fingerprint(config, synth=True),
    }


def _fingerprint(config: RunConfig, *, synth: bool) -> str:
    """The sections the weights depend on (the phantoms' [synth] too), as a short digest."""
    # As the run resolves it (in_channels from the data); names of channels, classes and regions change no weight.
    task = with_channels(config).task.model_dump(mode="json", exclude={"channel_names", "class_names", "regions"})
    task["in_channels"] = with_channels(config).task.channels
    relevant = {
        "task": task,
        "model": config.model.model_dump(mode="json", exclude={"freeze"}),
        "train": config.train.model_dump(mode="json", exclude={"rounds", "local_epochs", "eval_every"}),
        "synth": config.synth.model_dump(mode="json") if synth and config.synth is not None else None,
        "normalization": config.normalization.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def pretrain_to_file(
    config: RunConfig,
    out: Path | None = None,
    *,
    cases: int | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    public: Path | None = None,
) -> tuple[Path, str, PretrainResult]:
    """`fedmed pretrain`: pre-train (on the public data set `public`, else pretrain.public, else phantoms) and
    write the weights for model.init. `out`: a file, or a folder to write <name>-pretrained.pt into; default the
    config's output_dir. The file written, its sha256 and the result."""
    public = public if public is not None else config.pretrain.public
    if public is not None and cases is not None:
        raise ConfigError(
            "--cases counts synthetic phantoms, but public pretraining trains on the data set's own training cases; "
            "remove --cases; to pre-train on phantoms instead, drop --public and pretrain.public"
        )
    if out is None:
        out = config.output_dir
    out = Path(out)
    if out.is_dir() or not out.suffix:
        out = out / f"{config.name}-pretrained.pt"
    if public is not None:
        result = public_pretrain(config, public=public, epochs=epochs, seed=seed)
    else:
        result = pretrain(config, cases=cases, epochs=epochs, seed=seed)
    try:
        digest = save_weights(result.state, out)
    except OSError as error:
        raise ConfigError(f"cannot write {out} ({error.strerror}); give another --out") from None
    return out, digest, result
