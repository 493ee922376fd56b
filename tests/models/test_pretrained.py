"""Starting weights (model.init) and frozen parameters (model.freeze): real files, tiny networks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fedmed.config import ModelConfig, TaskConfig, TrainConfig, load_run_config
from fedmed.core.errors import ConfigError
from fedmed.models import InitMismatchError, build_model, partition_keys, site_local_keys, starting_model
from fedmed.tasks import get_task, select_device, train_local
from fedmed.tasks.dp_sgd import DpSgdStep

TASK = TaskConfig(kind="classification", image_size=[16, 16])
HEAD = "class_layers"
TRAIN = TrainConfig(batch_size=4, learning_rate=0.01, augment=False, device="cpu")


def _source(seed: int = 7, task: TaskConfig = TASK) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(task, ModelConfig()).eval()


def _predict(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("layout", ["state-dict", "checkpoint", "run-directory", "bundle"])
def test_init_reproduces_the_source_model(tmp_path: Path, layout: str) -> None:
    source = _source()
    state = source.state_dict()
    if layout == "state-dict":
        path = tmp_path / "weights.pt"
        torch.save(state, path)
        read = path
    elif layout == "checkpoint":  # fedmed's final.pt
        path = tmp_path / "final.pt"
        torch.save(
            {"format": 1, "round": 3, "state_dict": state, "site_local_keys": [], "task": "classification"}, path
        )
        read = path
    elif layout == "run-directory":
        read = tmp_path / "run-1"
        path = read / "checkpoints" / "final.pt"
        path.parent.mkdir(parents=True)
        torch.save({"format": 1, "state_dict": state, "site_local_keys": []}, path)
    else:  # a MONAI bundle folder: models/model.pt is the network's state dict
        read = tmp_path / "bundle"
        path = read / "models" / "model.pt"
        path.parent.mkdir(parents=True)
        torch.save(state, path)
        (read / "configs").mkdir()
        (read / "configs" / "metadata.json").write_text("{}")

    torch.manual_seed(99)  # another random init, overwritten by the file
    start = starting_model(TASK, ModelConfig(init=read))
    assert start.init is not None and start.init.path == path
    assert start.init.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(start.network.state_dict()[key], value) for key, value in state.items())
    assert torch.equal(_predict(start.network), _predict(source))


def test_mismatched_shapes_are_listed_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "three-classes.pt"
    torch.save(_source(task=TASK.model_copy(update={"num_classes": 3})).state_dict(), path)
    with pytest.raises(InitMismatchError) as caught:
        starting_model(TASK, ModelConfig(init=path))
    message = str(caught.value)
    assert str(path) in message
    assert "2 of another shape" in message
    assert "class_layers.out.weight: file [3, 56] vs network [2, 56]" in message
    assert "model.init_exclude = ['class_layers']" in message

    # The documented way out: the differing head keeps its random init, everything else is loaded.
    torch.manual_seed(5)
    start = starting_model(TASK, ModelConfig(init=path, init_exclude=[HEAD]))
    loaded = torch.load(path, weights_only=True)
    state = start.network.state_dict()
    assert all(torch.equal(state[key], loaded[key]) for key in state if not key.startswith(HEAD))
    assert state["class_layers.out.weight"].shape == (2, 56)


def test_missing_and_unexpected_keys_are_counted_and_named(tmp_path: Path) -> None:
    state = _source().state_dict()
    removed = [key for key in state if key.startswith("features.denseblock3")]
    for key in removed:
        del state[key]
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(InitMismatchError) as caught:
        starting_model(TASK, ModelConfig(init=path))
    message = str(caught.value)
    assert f"{len(removed)} missing from the file (features.denseblock3." in message
    assert f"and {len(removed) - 4} more" in message
    assert "1 in the file but not in the network (extra.weight)" in message


def test_a_wrapped_models_keys_get_their_own_hint(tmp_path: Path) -> None:
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{key}": value for key, value in _source().state_dict().items()}, path)
    with pytest.raises(InitMismatchError, match=r"all start with 'module\.'.*model\.module\.state_dict\(\)"):
        starting_model(TASK, ModelConfig(init=path))


def test_files_that_are_not_plain_weights_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "whole-model.pt"
    torch.save(_source(), pickled)  # a pickled nn.Module: weights_only refuses to rebuild it
    with pytest.raises(ConfigError, match=r"weights_only=True.*torch\.save\(model\.state_dict\(\), path\)"):
        starting_model(TASK, ModelConfig(init=pickled))
    with pytest.raises(ConfigError, match=r"not found.*never downloads"):
        starting_model(TASK, ModelConfig(init=tmp_path / "absent.pt"))
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ConfigError, match=r"neither a fedmed run directory.*nor a MONAI bundle"):
        starting_model(TASK, ModelConfig(init=tmp_path / "empty-folder"))
    unfinished = tmp_path / "unfinished" / "checkpoints"
    unfinished.mkdir(parents=True)
    torch.save({"shared_state": _source().state_dict()}, unfinished / "latest.pt")
    with pytest.raises(ConfigError, match="has not finished"):
        starting_model(TASK, ModelConfig(init=unfinished.parent))
    # latest.pt itself is accepted (its numpy arrays are read without unpickling code).
    assert starting_model(TASK, ModelConfig(init=unfinished / "latest.pt")).init is not None


def test_relative_init_resolves_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.toml").write_text(
        '[task]\nkind = "classification"\nimage_size = [16, 16]\n'
        '[model]\ninit = "weights/pretrained.pt"\ninit_exclude = ["class_layers"]\nfreeze = ["features.conv0"]\n'
    )
    config = load_run_config(folder / "run.toml")
    assert config.model.init == folder / "weights" / "pretrained.pt"
    with pytest.raises(ValueError, match=r"init_exclude needs model\.init"):
        ModelConfig(init_exclude=[HEAD])


def test_freeze_prefixes_are_module_paths_and_typos_fail(tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = starting_model(TASK, ModelConfig(freeze=["features.conv0", "features.denseblock1"]))
    frozen = [name for name, parameter in start.network.named_parameters() if not parameter.requires_grad]
    assert frozen == start.frozen
    assert frozen[0] == "features.conv0.weight" and all(
        name.startswith(("features.conv0.", "features.denseblock1.")) for name in frozen
    )
    keys = partition_keys(start.network, fedbn=True, frozen=start.frozen)
    assert not set(keys.shared) & set(frozen) and not set(keys.local) & set(frozen)
    assert set(keys.local) == set(site_local_keys(start.network)) - set(frozen)
    assert keys.held == keys.local + keys.frozen

    with pytest.raises(ConfigError, match=r"'features\.denseblok1' \(did you mean 'features\.denseblock1'\?\)"):
        starting_model(TASK, ModelConfig(freeze=["features.denseblok1"]))
    with pytest.raises(
        ConfigError, match=r"'features\.conv' \(did you mean 'features\.conv0'\?\) matches no parameter"
    ):
        starting_model(TASK, ModelConfig(freeze=["features.conv"]))  # a module path, not a string prefix
    with pytest.raises(ConfigError, match="nothing would train"):
        starting_model(TASK, ModelConfig(freeze=["features", HEAD]))


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp-sgd"])
def test_frozen_parameters_stay_bit_identical_in_training(private: bool) -> None:
    torch.manual_seed(0)
    start = starting_model(TASK, ModelConfig(freeze=["features.conv0", "features.denseblock1"]))
    before = {key: value.clone() for key, value in start.network.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    samples = [
        {"image": torch.randn(1, 16, 16, generator=generator), "label": torch.tensor(index % 2)} for index in range(8)
    ]
    task = get_task(TASK)
    train_local(
        start.network,
        samples,
        task=task,
        train=TRAIN,
        epochs=2,
        seed=3,
        device=select_device("cpu"),
        dp=DpSgdStep(noise_multiplier=1.0, max_grad_norm=1.0) if private else None,
    )
    after = start.network.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in start.frozen)
    assert not all(torch.equal(after[key], before[key]) for key in after if key not in start.frozen)
    assert all(parameter.grad is None for name, parameter in start.network.named_parameters() if name in start.frozen)
