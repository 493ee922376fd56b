"""Starting from weights a team already has (model.init): find, read and check them; nothing is downloaded.

model.init names a run directory (its checkpoints/final.pt), a fedmed checkpoint, a plain torch state
dict or a MONAI bundle folder (models/model.pt, MONAI's convention: the network's state dict). Every
file is read with torch.load(weights_only=True): tensors, plain containers and numpy arrays only, never
arbitrary pickled objects, so a weights file from elsewhere cannot run code. fedmed's final.pt holds
tensors, strings, ints and lists; its latest.pt adds numpy arrays (the strategy's state).

The rule: the file's keys and shapes match the network's state dict exactly, except the modules
listed in model.init_exclude, which keep their random init (a new head when the task changes).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.config import ModelConfig, TaskConfig
from fedmed.core.errors import ConfigError

from .freeze import freeze_parameters
from .prefixes import check_prefixes, module_paths, under_any
from .registry import build_model
from .trainable import fixed_by_trainable

RUN_WEIGHTS = Path("checkpoints") / "final.pt"
RUN_LATEST = Path("checkpoints") / "latest.pt"
BUNDLE_WEIGHTS = Path("models") / "model.pt"
# Where a checkpoint dict keeps the network's weights: fedmed's final.pt (and Lightning's), fedmed's
# latest.pt (the shared weights only), MONAI's CheckpointSaver with save_dict={"model": net}.
WRAPPER_KEYS = ("state_dict", "shared_state", "model")
WRAPPED_MODEL_PREFIXES = ("module.", "_module.")  # DataParallel/DDP, Opacus' GradSampleModule
LISTED = 4  # keys named per kind of mismatch; the counts give the rest


class InitMismatchError(ConfigError):
    """model.init's weights do not fit the configured network."""


@dataclass(frozen=True)
class InitialWeights:
    """The weights model.init names, as read: the file, its format and digest, its tensors."""

    path: Path  # the file read (for a folder, the file inside it)
    source: str  # "run", "bundle" or "file"
    sha256: str
    state: dict[str, torch.Tensor]

    def describe(self) -> dict[str, Any]:
        """What the run directory records about its starting point."""
        return {"path": str(self.path), "format": self.source, "sha256": self.sha256, "tensors": len(self.state)}


@dataclass
class StartingModel:
    """The network a run starts from: built, loaded with model.init (if asked) and with model.freeze applied."""

    network: nn.Module
    frozen: list[str]  # parameters that are not trained and not sent (model.freeze)
    init: InitialWeights | None


def starting_model(
    task: TaskConfig,
    config: ModelConfig,
    *,
    load_init: bool = True,
    init: InitialWeights | None = None,
    trainable: str = "all",
    fedbn: bool = False,
) -> StartingModel:
    """Build the configured network (random init from the current torch seed), load model.init into it and
    freeze model.freeze and what DP-SGD does not train (`trainable`, RunConfig.trainable). Sites pass
    load_init=False: model.init is a path on the coordinator's disk, and the values a site does not train
    arrive with every round's message instead. `init`: weights already read (the run's pretraining,
    [pretrain]), loaded instead of model.init."""
    network = build_model(task, config)
    if init is None and load_init and config.init is not None:
        init = load_initial_weights(config.init)
    if init is not None:
        apply_initial_weights(network, init, exclude=config.init_exclude)
    frozen = freeze_parameters(network, config.freeze)
    fixed = [name for name in fixed_by_trainable(network, trainable, fedbn=fedbn) if name not in frozen]
    for name, parameter in network.named_parameters():
        if name in fixed:
            parameter.requires_grad_(False)
    fixed_or_frozen = {*frozen, *fixed}
    frozen = [name for name, _ in network.named_parameters() if name in fixed_or_frozen]
    return StartingModel(network=network, frozen=frozen, init=init)


def check_starting_model(task: TaskConfig, config: ModelConfig, *, trainable: str = "all", fedbn: bool = False) -> None:
    """model.init readable and fitting the network, model.freeze naming its parameters, dp_sgd.trainable
    leaving something to train: checked before a run directory exists (the ServerApp loads them again when
    the run starts)."""
    if config.sends_held_values or trainable != "all":
        starting_model(task, config, trainable=trainable, fedbn=fedbn)


def weights_file(path: Path) -> tuple[Path, str]:
    """The file model.init stands for, and what it is: a run's final model, a bundle's weights or a file."""
    path = Path(path)
    if path.is_dir():
        if (path / RUN_WEIGHTS).is_file():
            return path / RUN_WEIGHTS, "run"
        if (path / BUNDLE_WEIGHTS).is_file():
            return path / BUNDLE_WEIGHTS, "bundle"
        if (path / RUN_LATEST).is_file():
            raise ConfigError(
                f"model.init {path}: this run has not finished (no {RUN_WEIGHTS}); let it finish, or start from its "
                f"last completed round with model.init = '{path / RUN_LATEST}'"
            )
        raise ConfigError(
            f"model.init {path}: a folder that is neither a fedmed run directory ({RUN_WEIGHTS}) nor a MONAI bundle "
            f"({BUNDLE_WEIGHTS}); point model.init at the weights file itself"
        )
    if not path.is_file():
        raise ConfigError(
            f"model.init {path}: not found; give a run directory, a checkpoint or state dict file, or a MONAI bundle "
            "folder (relative paths start at the run config's folder). fedmed never downloads weights"
        )
    return path, "file"


def load_initial_weights(path: Path) -> InitialWeights:
    """Read model.init with torch.load(weights_only=True); its digest is of the very bytes loaded."""
    file, source = weights_file(path)
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ConfigError(f"model.init {file}: cannot read it ({error.strerror}); check its permissions") from None
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        text = str(error).strip()
        if "Weights only load failed" in text:
            reason = "it holds pickled Python objects besides tensors"
        else:
            reason = text.splitlines()[0] if text else type(error).__name__
        raise ConfigError(
            f"model.init {file}: not a file of weights torch.load(weights_only=True) can read ({reason}). Save the "
            "network's state dict, torch.save(model.state_dict(), path); fedmed does not unpickle other objects "
            "from a weights file, and TorchScript files are not supported"
        ) from None
    return InitialWeights(
        path=file, source=source, sha256=hashlib.sha256(data).hexdigest(), state=_state_dict(loaded, file=file)
    )


def _numpy_array_globals() -> list[Any]:
    """What pickled numpy arrays need (fedmed's latest.pt keeps the strategy's moments and numpy's random state
    as arrays); they rebuild arrays and run no other code."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def _state_dict(loaded: object, *, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        for key in WRAPPER_KEYS:
            inner = loaded.get(key)
            if _is_state_dict(inner):
                return dict(inner)
        if _is_state_dict(loaded):
            return dict(loaded)
    found = f"a dict with keys {sorted(map(str, loaded))[:6]}" if isinstance(loaded, dict) else type(loaded).__name__
    raise ConfigError(
        f"model.init {file}: holds {found}, not a state dict (names to tensors) nor a checkpoint with one under "
        f"{' or '.join(repr(key) for key in WRAPPER_KEYS)}; save torch.save(model.state_dict(), path)"
    )


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())
    )


def apply_initial_weights(network: nn.Module, weights: InitialWeights, *, exclude: list[str]) -> list[str]:
    """Copy the weights into `network`; the keys loaded. Keys under an `exclude` prefix keep their random init;
    any other missing, unexpected or misshapen key is an InitMismatchError listing them."""
    expected = network.state_dict()
    check_prefixes(exclude, list(expected), field="init_exclude", what="parameter or buffer")
    given = weights.state
    missing = [key for key in expected if key not in given and not under_any(key, exclude)]
    unexpected = [key for key in given if key not in expected and not under_any(key, exclude)]
    reshaped = [
        key
        for key in expected
        if key in given and not under_any(key, exclude) and given[key].shape != expected[key].shape
    ]
    if missing or unexpected or reshaped:
        raise InitMismatchError(
            _mismatch_message(weights, expected=expected, missing=missing, unexpected=unexpected, reshaped=reshaped)
        )
    loaded = [key for key in expected if not under_any(key, exclude)]
    network.load_state_dict({key: given[key] for key in loaded}, strict=False)
    return loaded


def _mismatch_message(
    weights: InitialWeights,
    *,
    expected: dict[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    reshaped: list[str],
) -> str:
    given = weights.state
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing from the file ({_listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} in the file but not in the network ({_listing(unexpected)})")
    if reshaped:
        shapes = [f"{key}: file {list(given[key].shape)} vs network {list(expected[key].shape)}" for key in reshaped]
        parts.append(f"{len(reshaped)} of another shape ({_listing(shapes)})")
    wrapper = next((prefix for prefix in WRAPPED_MODEL_PREFIXES if all(key.startswith(prefix) for key in given)), None)
    if wrapper is not None:
        fix = (
            f"the file's keys all start with '{wrapper}': it was saved from a wrapped model; save the inner "
            f"network's state dict (e.g. model.{wrapper.rstrip('.')}.state_dict())"
        )
    elif len(missing) + len(reshaped) > len(expected) // 2:
        fix = (
            "most keys differ, so these weights are for another network: set model.name, model.channels, "
            "task.in_channels and task.num_classes as when they were trained"
        )
    else:
        modules = module_paths(missing + reshaped + unexpected, depth=1)
        fix = (
            "use weights of the same network (model.name, model.channels, task.in_channels, task.num_classes as when "
            f"they were trained), or let the differing modules keep their random init: model.init_exclude = "
            f"{modules[:LISTED]}"
        )
    return (
        f"model.init {weights.path}: its weights do not fit the configured network: {'; '.join(parts)}. "
        f"Keys must match exactly, except under model.init_exclude. Fix: {fix}"
    )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED])
    return shown + (f", and {len(items) - LISTED} more" if len(items) > LISTED else "")
