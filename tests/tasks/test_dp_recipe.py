"""DP-SGD recipe in the training loop: the same clipped, noised update however it is computed, and
accounting that the recipe's choices (physical pieces, augmentation multiplicity, weight average) leave alone."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from squares import squares
from torch import nn

from fedmed.config import ModelConfig, TaskConfig, TrainConfig
from fedmed.config.privacy import DpSgdConfig
from fedmed.models import build_model
from fedmed.privacy import epsilon_spent
from fedmed.tasks import DpSgdStep, get_task, train_local
from fedmed.tasks.dp_layers import CONVOLUTIONS, convolution_grad_sample

CPU = torch.device("cpu")
TASK = TaskConfig(kind="segmentation", image_size=[16, 16])


def _train(dp: DpSgdStep, *, samples: int = 12, augment: bool = False) -> tuple[dict[str, torch.Tensor], object]:
    torch.manual_seed(0)
    model = build_model(TASK, ModelConfig(channels=[4, 8]))  # a MONAI UNet: its up-sampling is transposed
    result = train_local(
        model,
        squares(samples),
        task=get_task(TASK),
        train=TrainConfig(batch_size=4, learning_rate=0.01, augment=augment),
        epochs=1,
        seed=0,
        device=CPU,
        dp=dp,
    )
    return {key: value.clone() for key, value in model.state_dict().items()}, result


def _assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1), (4, 3, 8, 8)),  # MONAI's up layer
        (nn.ConvTranspose2d(3, 5, 2, stride=2), (4, 3, 7, 7)),
        (nn.ConvTranspose3d(2, 4, 3, stride=2, padding=1, output_padding=1), (3, 2, 4, 4, 4)),
        (nn.Conv2d(3, 5, 3, stride=2, padding=1), (4, 3, 9, 9)),
        (nn.Conv3d(2, 4, 3, padding=2, dilation=2), (3, 2, 6, 6, 6)),
        (nn.Conv1d(2, 3, 5, stride=2, bias=False), (3, 2, 11)),
        (nn.Conv2d(4, 6, 3, groups=2), (2, 4, 6, 6)),  # grouped: Opacus' own sampler
    ],
)
def test_convolution_per_sample_gradients_equal_functorch(layer: nn.Module, shape: tuple) -> None:
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

    torch.manual_seed(0)
    inputs = torch.randn(*shape)
    backprops = torch.randn_like(layer(inputs))
    ours = convolution_grad_sample(layer, [inputs], backprops)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ft_compute_per_sample_gradient(layer, [inputs], backprops)
    assert set(ours) == set(reference)
    for parameter, value in reference.items():
        torch.testing.assert_close(ours[parameter], value, rtol=1e-4, atol=1e-5)


def test_fast_samplers_give_the_update_of_opacus_own_samplers(monkeypatch) -> None:
    # Opacus: unfolded patches for convolutions, functorch for the transposed ones.
    dp = DpSgdStep(noise_multiplier=1.0, max_grad_norm=1.0, logical_batch_size=4)
    fast, _ = _train(dp)
    from opacus.grad_sample import GradSampleModule

    samplers = {kind: sampler for kind, sampler in GradSampleModule.GRAD_SAMPLERS.items() if kind not in CONVOLUTIONS}
    from opacus.grad_sample.conv import compute_conv_grad_sample

    samplers |= dict.fromkeys((nn.Conv1d, nn.Conv2d, nn.Conv3d), compute_conv_grad_sample)
    monkeypatch.setattr(GradSampleModule, "GRAD_SAMPLERS", samplers)
    monkeypatch.setattr("fedmed.tasks.dp_sgd.register_convolution_samplers", lambda: None)
    standard, _ = _train(dp)
    _assert_same_weights(fast, standard)


def test_a_logical_batch_in_physical_pieces_gives_the_same_update() -> None:
    whole, whole_result = _train(DpSgdStep(noise_multiplier=1.0, max_grad_norm=1.0, logical_batch_size=6))
    pieces, pieces_result = _train(
        DpSgdStep(noise_multiplier=1.0, max_grad_norm=1.0, logical_batch_size=6, physical_batch_size=2)
    )
    _assert_same_weights(whole, pieces)
    assert pieces_result.steps == whole_result.steps == 2


def test_the_steps_opacus_counts_are_the_steps_the_ledger_charges() -> None:
    dp = DpSgdStep(noise_multiplier=1.3, max_grad_norm=1.0, logical_batch_size=6, physical_batch_size=4, steps=7)
    _, result = _train(dp)
    assert result.steps == 7, "a fixed number of logical steps, across passes over the data"
    rate = 1 / math.ceil(12 / 6)
    # q = 0.5 on 12 cases: an empty Poisson draw has probability 2^-12; none happens with this seed.
    assert result.noised == [(1.3, rate, 7)]
    ledger = epsilon_spent([(1.3, rate, result.steps)], delta=1e-5, accountant="rdp")
    assert ledger == pytest.approx(epsilon_spent(result.noised, delta=1e-5, accountant="rdp"))


def test_augmentation_multiplicity_and_weight_average_leave_the_accounting_unchanged() -> None:
    base = DpSgdStep(noise_multiplier=1.0, max_grad_norm=1.0, logical_batch_size=6, physical_batch_size=3, steps=4)
    plain, plain_result = _train(base)
    recipe = DpSgdStep(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        logical_batch_size=6,
        physical_batch_size=3,
        steps=4,
        augmentation_multiplicity=3,
        ema_decay=0.9,
    )
    tuned, tuned_result = _train(recipe, augment=True)
    assert tuned_result.steps == plain_result.steps == 4
    assert tuned_result.noised == plain_result.noised == [(1.0, 0.5, 4)]
    assert any(not torch.equal(plain[key], tuned[key]) for key in plain), "the recipe changes the model"


def test_augmentation_multiplicity_averages_views_before_clipping() -> None:
    # With no noise and a clip far below every gradient, each sample contributes exactly max_grad_norm in the
    # direction of its views' mean gradient; clipping each view separately would shrink that sum.
    from opacus.optimizers import DPOptimizer

    from fedmed.tasks.dp_sgd import average_views

    layer = nn.Linear(2, 1, bias=False)
    optimizer = DPOptimizer(
        torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.1, expected_batch_size=1
    )
    view_gradients = torch.tensor([[[4.0, 0.0]], [[0.0, 4.0]]])  # one sample, two views at right angles
    layer.weight.grad_sample = view_gradients
    average_views(optimizer, views=2)
    torch.testing.assert_close(layer.weight.grad_sample, torch.tensor([[[2.0, 2.0]]]))
    before = layer.weight.detach().clone()
    optimizer.step()
    step = before - layer.weight.detach()
    torch.testing.assert_close(step.norm(), torch.tensor(0.1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("cases", "batch"), [(4, 4), (20, 16), (64, 16), (100, 25), (810, 32), (100_000, 32)])
def test_the_default_logical_batch_is_a_quarter_of_the_cases_between_16_and_the_cap(cases: int, batch: int) -> None:
    assert DpSgdConfig().logical_batch_size(cases) == batch
    assert DpSgdConfig(batch_size=8).logical_batch_size(cases) == min(8, cases)
