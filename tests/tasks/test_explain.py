"""Saliency maps (fedmed.tasks.explain): they point at the evidence, and the model is left as it came."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedmed.config import ModelConfig, TaskConfig
from fedmed.models.registry import build_model
from fedmed.tasks.explain import ExplainError, gradcam_layer, saliency_map

SIZE = 32
SQUARE = 6
QUADRANTS = {"top-left": (0, 0), "top-right": (0, 1), "bottom-left": (1, 0), "bottom-right": (1, 1)}


def _image(generator: torch.Generator, *, quadrant: tuple[int, int] | None) -> torch.Tensor:
    """Noise; class 1 adds a bright square somewhere inside one quadrant."""
    image = 0.3 * torch.randn(1, SIZE, SIZE, generator=generator)
    if quadrant is not None:
        half = SIZE // 2
        row, column = (int(torch.randint(2, half - SQUARE - 2, (1,), generator=generator)) for _ in range(2))
        top, left = quadrant[0] * half + row, quadrant[1] * half + column
        image[0, top : top + SQUARE, left : left + SQUARE] += 2.0
    return image


def _batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 2, (size,), generator=generator)
    quadrants = list(QUADRANTS.values())
    images = [
        _image(generator, quadrant=quadrants[int(torch.randint(0, 4, (1,), generator=generator))] if label else None)
        for label in labels
    ]
    return torch.stack(images), labels


def _train(model: nn.Module, *, steps: int, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        images, labels = _batch(generator, 16)
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    return model.eval()


def _plain_cnn() -> nn.Module:
    # No normalization layer: instance statistics would spread a local cue over the whole image.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


@pytest.fixture(scope="module")
def square_finder() -> nn.Module:
    torch.manual_seed(0)
    return _train(_plain_cnn(), steps=60)


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    torch.manual_seed(0)
    task = TaskConfig(kind="classification", spatial_dims=2, num_classes=2, image_size=[SIZE, SIZE], in_channels=1)
    return _train(build_model(task, ModelConfig()), steps=20)


def _quadrant_share(saliency: np.ndarray, quadrant: tuple[int, int]) -> float:
    half = SIZE // 2
    rows, columns = (slice(q * half, (q + 1) * half) for q in quadrant)
    return float(saliency[rows, columns].sum() / saliency.sum())


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
@pytest.mark.parametrize("where", list(QUADRANTS))
def test_saliency_follows_the_square(square_finder: nn.Module, method: str, where: str) -> None:
    image = _image(torch.Generator().manual_seed(7), quadrant=QUADRANTS[where])[None]
    assert int(square_finder(image).argmax()) == 1
    saliency = saliency_map(square_finder, image, target_class=1, method=method)
    assert saliency.shape == (SIZE, SIZE) and saliency.dtype == np.float32
    assert saliency.min() >= 0.0 and saliency.max() == pytest.approx(1.0)
    # More of the map in the square's quadrant than in the other three together.
    assert _quadrant_share(saliency, QUADRANTS[where]) > 0.5, method


def test_occlusion_finds_the_square_for_fedmeds_densenet(densenet: nn.Module) -> None:
    image = _image(torch.Generator().manual_seed(7), quadrant=QUADRANTS["bottom-left"])[None]
    assert int(densenet(image).argmax()) == 1
    saliency = saliency_map(densenet, image, target_class=1, method="occlusion")
    assert _quadrant_share(saliency, QUADRANTS["bottom-left"]) > 0.5


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "training": model.training,
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "requires_grad": [parameter.requires_grad for parameter in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
            for m in model.modules()
        ],
        "full_backward": [m._is_full_backward_hook for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
    }


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    for key in ("training", "requires_grad", "hooks", "full_backward", "inplace"):
        assert before[key] == after[key], key
    for name, value in before["state"].items():  # type: ignore[attr-defined]
        assert torch.equal(value, after["state"][name]), name  # type: ignore[index]
    for old, new in zip(before["grads"], after["grads"], strict=True):  # type: ignore[call-overload]
        assert (old is None and new is None) or torch.equal(old, new)


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_model_is_left_as_it_came(method: str) -> None:
    torch.manual_seed(0)
    model = _plain_cnn()
    model[1].inplace = True  # MONAI's Grad-CAM switches an in-place target off; it must come back
    image = _image(torch.Generator().manual_seed(3), quadrant=(0, 0))[None]
    model(image).sum().backward()  # gradients a caller holds survive
    for training in (True, False):
        model.train(training)
        model[0].weight.requires_grad_(False)
        before = _snapshot(model)
        saliency_map(model, image, target_class=0, method=method)
        _assert_same(before, _snapshot(model))
        assert torch.is_grad_enabled()


def test_gradcam_layer_is_the_last_spatial_map_of_densenet121() -> None:
    torch.manual_seed(0)
    task = TaskConfig(kind="classification", spatial_dims=2, num_classes=3, image_size=[64, 64], in_channels=2)
    model = build_model(task, ModelConfig(name="densenet121")).eval()
    image = torch.randn(1, 2, 64, 64)
    assert gradcam_layer(model, image) == "class_layers.relu"
    saliency = saliency_map(model, image, target_class=2)
    assert saliency.shape == (64, 64) and 0.0 <= saliency.min() <= saliency.max() <= 1.0


def test_gradcam_on_a_3d_volume() -> None:
    torch.manual_seed(0)
    task = TaskConfig(kind="classification", spatial_dims=3, num_classes=2, image_size=[32, 24, 16], in_channels=1)
    model = build_model(task, ModelConfig()).eval()
    image = torch.randn(1, 1, 32, 24, 16)
    assert gradcam_layer(model, image) == "class_layers.relu"
    saliency = saliency_map(model, image, target_class=1)
    assert saliency.shape == (32, 24, 16) and saliency.max() == pytest.approx(1.0)


def test_monai_metatensor_input(square_finder: nn.Module) -> None:
    from monai.data import MetaTensor

    image = _image(torch.Generator().manual_seed(7), quadrant=QUADRANTS["top-left"])[None]
    expected = saliency_map(square_finder, image, target_class=1)
    assert np.array_equal(saliency_map(square_finder, MetaTensor(image), target_class=1), expected)


def test_small_inputs_fall_back_to_an_earlier_map() -> None:
    # 28 x 28 (MedMNIST) pools down to one pixel before DenseNet's head: a one-pixel map cannot localize.
    task = TaskConfig(kind="classification", spatial_dims=2, num_classes=2, image_size=[28, 28], in_channels=1)
    model = build_model(task, ModelConfig()).eval()
    layer = gradcam_layer(model, torch.zeros(1, 1, 28, 28))
    assert layer.startswith("features.") and layer != "features.norm5"


def test_clear_errors() -> None:
    model = _plain_cnn().eval()
    image = torch.zeros(1, 1, SIZE, SIZE)
    with pytest.raises(ExplainError, match="gradcam, occlusion"):
        saliency_map(model, image, target_class=0, method="lime")
    with pytest.raises(ExplainError, match="out of range: the model has 2 classes"):
        saliency_map(model, image, target_class=2)
    with pytest.raises(ExplainError, match="add the batch axis"):
        saliency_map(model, image[0, 0], target_class=0)
    with pytest.raises(ExplainError, match=r"does not take an input shaped \(1, 32, 32\)"):
        saliency_map(model, image[0], target_class=0)
    segmenter = nn.Conv2d(1, 2, 3, padding=1)
    with pytest.raises(ExplainError, match="uncertainty map is the explanation"):
        saliency_map(segmenter, image, target_class=0)
