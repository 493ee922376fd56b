"""The run's model card (model_card.json): what the sites measured of the final global model at the end of the run.

- `temperature`: temperature scaling for classification (and segmentation) probabilities, softmax(logits / T),
  fitted on the sites' validation cases by summing their NLL on a fixed grid (no case left a site);
- `ood_mean`, `ood_var`: per-dimension mean and variance of the network's pooled deepest features over the sites'
  training cases, the reference of the out-of-distribution score (fedmed.tasks.ood.ood_score);
- `ood_threshold`: a case scoring above it is flagged (at most 5 % of the sites' validation cases are);
- `ood_groups`: the lengths of the feature vector's parts (first and deepest feature map), each scored on its own;
- `calibration`: per site (and "all sites" pooled) the expected calibration error before and after scaling (each
  half of the cases scaled with the temperature fitted on the other half) and the reliability bins they come from;
- `notes`: what was skipped or left out, and why.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic

MODEL_CARD_FILE = "model_card.json"
ALL_SITES = "all sites"  # the pooled row of `calibration` (a space: never a site name)


class ModelCardError(FedmedError):
    """model_card.json exists but cannot be read."""


@dataclass
class ModelCard:
    temperature: float | None
    ood_mean: list[float] | None
    ood_var: list[float] | None
    ood_threshold: float | None
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ood_groups: list[int] | None = None  # the lengths of the feature vector's parts, each scored on its own


def write_model_card(run_dir_path: Path, card: ModelCard, *, private: bool = True) -> Path:
    """Write the card as run_dir_path/model_card.json (atomically); non-finite numbers become null. A bundle's copy
    is not private: it is handed over with the model."""
    path = Path(run_dir_path) / MODEL_CARD_FILE
    write_text_atomic(path, json.dumps(_finite(asdict(card)), indent=1), private=private)
    return path


def read_model_card(run_dir_path: Path) -> ModelCard | None:
    """The run's model card, or None when the run has none (older runs, evaluation.model_card = false)."""
    path = Path(run_dir_path) / MODEL_CARD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return ModelCard(
            temperature=_optional_float(data.get("temperature")),
            ood_mean=_optional_floats(data.get("ood_mean")),
            ood_var=_optional_floats(data.get("ood_var")),
            ood_threshold=_optional_float(data.get("ood_threshold")),
            calibration=dict(data.get("calibration") or {}),
            notes=[str(note) for note in data.get("notes") or []],
            ood_groups=[int(size) for size in data["ood_groups"]] if data.get("ood_groups") else None,
        )
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise ModelCardError(
            f"{path}: not a readable model card ({error}); delete it to use the model without calibration and "
            "OOD flags, or copy it again from the run directory"
        ) from error


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_floats(values: Any) -> list[float] | None:
    # null inside a list stands for a number that was not finite
    return None if values is None else [math.nan if value is None else float(value) for value in values]


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
