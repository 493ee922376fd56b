"""What DP-SGD trains (dp_sgd.trainable): per-sample gradients of adapters and of a partial network against
the standard path's, adapters merged exactly, and the accounting unchanged by the choice."""

from __future__ import annotations

import warnings

import pytest
import torch
from squares import squares
from torch import nn

from fedmed.config import ModelConfig, TaskConfig, TrainConfig, run_config_from_dict
from fedmed.core.errors import ConfigError
from fedmed.models import build_model, fixed_by_trainable, head_prefixes, low_rank_adapters, trained_values
from fedmed.tasks import DpSgdStep, get_task, train_local
from fedmed.tasks.dp_layers import register_convolution_samplers

CPU = torch.device("cpu")
TASK = TaskConfig(kind="segmentation", image_size=[16, 16])


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(TASK, ModelConfig(channels=[4, 8]))  # a MONAI UNet: transposed up-sampling included


def _per_sample_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Opacus' per-sample gradients of the trainable parameters (fedmed's samplers), by parameter name."""
    from opacus import GradSampleModule

    register_convolution_samplers()
    loss_of = get_task(TASK).loss
    wrapped = GradSampleModule(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The batch's mean loss: Opacus scales each sample's gradient back to that sample's own loss's.
        loss_of(wrapped, {"image": images, "label": labels}, generator=None).backward()
    samples = {name: p.grad_sample.clone() for name, p in model.named_parameters() if p.requires_grad}
    wrapped._close()
    return samples


def _reference_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The standard path: each sample's gradient from its own forward and backward pass."""
    loss_of = get_task(TASK).loss
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    per_sample = []
    for index in range(len(images)):
        loss = loss_of(model, {"image": images[index : index + 1], "label": labels[index : index + 1]}, generator=None)
        per_sample.append(torch.autograd.grad(loss, list(trained.values())))
    return {name: torch.stack([grads[i] for grads in per_sample]) for i, name in enumerate(trained)}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    samples = squares(4)
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


def test_per_sample_gradients_of_adapters_equal_the_standard_paths() -> None:
    model = _unet().train()
    images, labels = _batch()
    with low_rank_adapters(model, rank=2) as adapters:
        for parameter in adapters:  # the up factors start at zero, which would leave the down factors no gradient
            nn.init.normal_(parameter, std=0.2)
        ours = _per_sample_gradients(model, images, labels)
        reference = _reference_gradients(model, images, labels)
        assert set(ours) == set(reference) and all(".lora." in name for name in ours)
        assert len(ours) == len(adapters)
        for name, value in reference.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("trainable", ["head", "norm"])
def test_per_sample_gradients_of_a_partly_trained_network_equal_the_standard_paths(trainable: str) -> None:
    model = _unet().train()
    fixed = fixed_by_trainable(model, trainable)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in fixed)
    images, labels = _batch()
    ours = _per_sample_gradients(model, images, labels)
    reference = _reference_gradients(model, images, labels)
    assert set(ours) == set(reference) == {name for name, _ in model.named_parameters() if name not in fixed}
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_merged_adapters_give_the_adapted_networks_output_with_the_plain_networks_keys() -> None:
    model = _unet().eval()
    keys = list(model.state_dict())
    images, _ = _batch()
    with low_rank_adapters(model, rank=3) as adapters:
        for parameter in adapters:
            nn.init.normal_(parameter, std=0.1)
        with torch.no_grad():
            adapted = model(images)
        assert all(not p.requires_grad for name, p in model.named_parameters() if ".lora." not in name)
    with torch.no_grad():
        merged = model(images)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == keys and all(p.requires_grad for p in model.parameters())


def _train(dp: DpSgdStep, *, trainable: str = "all") -> tuple[dict[str, torch.Tensor], dict, object]:
    model = _unet()
    fixed = fixed_by_trainable(model, trainable)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in fixed)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    result = train_local(
        model,
        squares(12),
        task=get_task(TASK),
        train=TrainConfig(batch_size=4, learning_rate=0.05),
        epochs=1,
        seed=0,
        device=CPU,
        dp=dp,
    )
    return before, {key: value.clone() for key, value in model.state_dict().items()}, result


def test_a_dp_round_with_adapters_changes_each_convolution_by_a_low_rank_update_and_nothing_else() -> None:
    dp = DpSgdStep(noise_multiplier=1.0, max_grad_norm=1.0, logical_batch_size=6, steps=3, adapter_rank=2)
    before, after, result = _train(dp, trainable="adapters")
    model = _unet()
    fixed = set(fixed_by_trainable(model, "adapters"))
    assert fixed and all(torch.equal(before[key], after[key]) for key in fixed), "biases and norms stay fixed"
    changed = [key for key in before if key not in fixed and not torch.equal(before[key], after[key])]
    assert changed, "the convolutions moved"
    modules = dict(model.named_modules())
    for key in changed:
        delta = after[key] - before[key]
        if isinstance(modules[key.removesuffix(".weight")], nn.modules.conv._ConvTransposeNd):
            delta = delta.transpose(0, 1)  # in x out x k: the adapter mixes outputs after its rank-r convolution
        assert torch.linalg.matrix_rank(delta.flatten(1).double(), atol=1e-6) <= 2, key
    assert result.noised == [(1.0, 0.5, 3)]


def test_what_trains_changes_neither_the_steps_nor_the_accounting() -> None:
    results = {
        trainable: _train(
            DpSgdStep(
                noise_multiplier=1.3,
                max_grad_norm=1.0,
                logical_batch_size=6,
                steps=4,
                adapter_rank=2 if trainable == "adapters" else 0,
            ),
            trainable=trainable,
        )[2]
        for trainable in ("all", "norm", "head", "adapters")
    }
    assert {str(result.noised) for result in results.values()} == {str([(1.3, 0.5, 4)])}
    assert {result.steps for result in results.values()} == {4}


def test_trained_values_count_what_dp_sgd_noises() -> None:
    model = build_model(TASK, ModelConfig())  # the default UNet, 16-32-64
    everything = sum(p.numel() for p in model.parameters())
    assert trained_values(model, trainable="all", rank=2) == everything
    adapters = trained_values(model, trainable="adapters", rank=2)
    with low_rank_adapters(model, rank=2) as parameters:
        assert adapters == sum(p.numel() for p in parameters)
    assert adapters < everything / 10


def test_the_head_of_each_network_family() -> None:
    assert head_prefixes(build_model(TASK, ModelConfig())) == ["model.2", "model.1.submodule.2"]
    classifier = build_model(TaskConfig(kind="classification", image_size=[32, 32], num_classes=2), ModelConfig())
    assert head_prefixes(classifier) == ["class_layers"]
    segresnet = build_model(TASK, ModelConfig(name="segresnet"))
    assert head_prefixes(segresnet) == ["up_layers", "up_samples", "conv_final"]


def _config(**dp_sgd: object) -> dict:
    return {
        "name": "t",
        "task": {"kind": "segmentation", "image_size": [16, 16]},
        "synth": {"task": "segmentation", "image_size": [16, 16], "sites": [{"name": "a"}, {"name": "b"}]},
        "dp_sgd": {"enabled": True, **dp_sgd},
    }


def test_auto_trains_the_norm_layers_from_a_pretrained_start_and_everything_from_scratch(tmp_path) -> None:
    assert run_config_from_dict(_config(), base=tmp_path).trainable == "all"
    assert run_config_from_dict({**_config(), "pretrain": {"enabled": True}}, base=tmp_path).trainable == "norm"
    fedbn = {**_config(), "pretrain": {"enabled": True}, "strategy": {"fedbn": True}}
    assert run_config_from_dict(fedbn, base=tmp_path).trainable == "adapters", "FedBN keeps the norm layers local"
    plain = _config()
    plain["dp_sgd"]["enabled"] = False
    assert run_config_from_dict({**plain, "pretrain": {"enabled": True}}, base=tmp_path).trainable == "all"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dp_sgd": {"enabled": False, "trainable": "head"}}, r"dp_sgd.enabled is false.*model.freeze"),
        ({"dp_sgd": {"enabled": True, "trainable": "norm"}, "strategy": {"fedbn": True}}, r"share nothing"),
        (
            {"dp_sgd": {"enabled": True, "trainable": "adapters"}, "train": {"keep_optimizer_state": True}},
            r"keep_optimizer_state = false",
        ),
        (
            {"dp_sgd": {"enabled": True, "trainable": "adapters"}, "strategy": {"proximal_mu": 0.01}},
            r"proximal_mu = 0",
        ),
    ],
)
def test_a_trainable_choice_that_cannot_work_is_refused_with_the_fix(tmp_path, changes: dict, message: str) -> None:
    with pytest.raises((ValueError, ConfigError), match=message):
        run_config_from_dict({**_config(), **changes}, base=tmp_path)
