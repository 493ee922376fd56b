import math

import pytest
import torch
from torch import nn

from fedmed.config import ModelConfig, TaskConfig, TrainConfig
from fedmed.models import build_model
from fedmed.tasks import get_task, train_local
from fedmed.tasks.classification import balanced_accuracy, roc_auc
from fedmed.tasks.loss_terms import ProximalPull, proximal_term

CPU = torch.device("cpu")


def squares(count: int, *, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Bright squares on noise; the label is the square."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        label = torch.zeros(1, size, size, dtype=torch.long)
        x, y = torch.randint(2, size - 12, (2,), generator=generator).tolist()
        label[0, x : x + 10, y : y + 10] = 1
        image = label.float() * 2.0 + 0.3 * torch.randn(1, size, size, generator=generator)
        samples.append({"image": image, "label": label})
    return samples


class Thresholder(nn.Module):
    """Segments by thresholding the image: a perfect model for `squares` without noise."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        foreground = (image > 1.0).float()
        return torch.cat([1 - foreground, foreground], dim=1) * 10


def test_segmentation_metrics_of_a_perfect_and_a_shifted_prediction() -> None:
    task = get_task(TaskConfig(kind="segmentation", image_size=[32, 32]))
    clean = [{"image": s["label"].float() * 2.0, "label": s["label"]} for s in squares(3)]
    perfect = task.evaluate(Thresholder(), clean, device=CPU)
    assert perfect["dice"] == pytest.approx(1.0)
    assert perfect["hd95"] == pytest.approx(0.0)
    shifted = [{"image": torch.roll(s["image"], 3, dims=2), "label": s["label"]} for s in clean]
    metrics = task.evaluate(Thresholder(), shifted, device=CPU)
    assert metrics["dice"] == pytest.approx(0.7, abs=1e-6)  # 10x10 squares overlapping 7 columns of 10
    assert metrics["hd95"] == pytest.approx(3.0)


def test_segmentation_training_learns_the_squares() -> None:
    config = TaskConfig(kind="segmentation", image_size=[32, 32])
    task = get_task(config)
    torch.manual_seed(0)
    model = build_model(config, ModelConfig(channels=[8, 16, 32]))
    before = task.evaluate(model, squares(4, seed=1), device=CPU)["dice"]
    train_local(
        model, squares(16), task=task, train=TrainConfig(learning_rate=1e-2, batch_size=4), epochs=8, seed=0, device=CPU
    )
    after = task.evaluate(model, squares(4, seed=1), device=CPU)["dice"]
    assert after > 0.8 > before


def test_training_is_deterministic_for_a_seed() -> None:
    config = TaskConfig(kind="segmentation", image_size=[32, 32])
    task, states = get_task(config), []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(config, ModelConfig(channels=[8, 16]))
        train_local(model, squares(6), task=task, train=TrainConfig(), epochs=1, seed=5, device=CPU)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_proximal_term_value_and_effect() -> None:
    layer = nn.Linear(2, 1, bias=False)
    anchors = {"weight": layer.weight.detach().clone()}
    with torch.no_grad():
        layer.weight += torch.tensor([[3.0, 4.0]])
    assert float(proximal_term(layer, anchors, mu=0.1).detach()) == pytest.approx(0.5 * 0.1 * 25.0)

    config = TaskConfig(kind="segmentation", image_size=[32, 32])
    task, drift = get_task(config), {}
    for mu in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model(config, ModelConfig(channels=[8, 16]))
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        train_local(
            model,
            squares(8),
            task=task,
            train=TrainConfig(learning_rate=1e-2),
            epochs=2,
            seed=0,
            device=CPU,
            loss_terms=[ProximalPull.toward_start(model, keys=list(start), mu=mu)],
        )
        drift[mu] = sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters())
    assert drift[1.0] < drift[0.0]


def test_classification_metrics() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    assert balanced_accuracy(torch.tensor([0, 0, 0, 0, 1, 0]), labels) == pytest.approx((1.0 + 0.5) / 2)
    probabilities = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.35, 0.65], [0.45, 0.55]])
    assert roc_auc(probabilities, labels, num_classes=2) == pytest.approx(1.0)
    assert math.isnan(roc_auc(probabilities[:4], labels[:4], num_classes=2))


def test_classification_training_separates_bright_from_dark() -> None:
    config = TaskConfig(kind="classification", image_size=[16, 16])
    task = get_task(config)
    generator = torch.Generator().manual_seed(0)
    samples = [
        {"image": torch.randn(1, 16, 16, generator=generator) + 1.5 * (i % 2), "label": torch.tensor(i % 2)}
        for i in range(32)
    ]
    torch.manual_seed(0)
    model = build_model(config, ModelConfig())
    train_local(
        model, samples, task=task, train=TrainConfig(learning_rate=3e-3, batch_size=8), epochs=6, seed=0, device=CPU
    )
    metrics = task.evaluate(model, samples, device=CPU)
    assert metrics["auc"] > 0.95 and metrics["accuracy"] > 0.85


def test_denoising_degradation_and_identity_scores() -> None:
    config = TaskConfig(kind="enhancement", image_size=[32, 32], noise_std=0.1)
    task = get_task(config)
    clean = torch.full((1, 1, 32, 32), 0.5)
    noisy = task.degrade(clean, generator=torch.Generator().manual_seed(0))
    assert float((noisy - clean).std()) == pytest.approx(0.1, rel=0.1)
    samples = [{"image": torch.rand(1, 32, 32)} for _ in range(3)]
    metrics = task.evaluate(nn.Identity(), samples, device=CPU)
    # An identity "model" restores nothing: its PSNR is the noisy input's (up to clamping to [0, 1]).
    assert metrics["psnr"] == pytest.approx(metrics["psnr_input"], abs=1e-4)


def test_superresolution_input_is_a_smooth_full_size_image() -> None:
    task = get_task(TaskConfig(kind="enhancement", enhancement="superres", spatial_dims=3, image_size=[16, 16, 16]))
    clean = torch.rand(2, 1, 16, 16, 16)
    low = task.degrade(clean, generator=torch.Generator())
    assert low.shape == clean.shape
    assert float(low.std()) < float(clean.std())


def test_enhancement_training_beats_the_noisy_input() -> None:
    config = TaskConfig(kind="enhancement", image_size=[32, 32], noise_std=0.2)
    task = get_task(config)
    smooth = nn.functional.avg_pool2d(torch.rand(24, 1, 32, 32), 5, stride=1, padding=2)
    samples = [{"image": image} for image in smooth]
    torch.manual_seed(0)
    model = build_model(config, ModelConfig(channels=[8, 16]))
    train_local(
        model, samples, task=task, train=TrainConfig(learning_rate=3e-3, batch_size=8), epochs=10, seed=0, device=CPU
    )
    metrics = task.evaluate(model, samples, device=CPU)
    assert metrics["psnr"] > metrics["psnr_input"] + 2.0


def test_augmentations_beyond_flips_change_images_not_classes() -> None:
    from fedmed.config import AugmentationConfig
    from fedmed.tasks.augmentation import AugmentedSamples

    config = TaskConfig(kind="classification", image_size=[224, 224])
    samples = [{"image": torch.randn(1, 224, 224), "label": torch.tensor(index % 2)} for index in range(4)]
    augmentation = AugmentationConfig(rotate_degrees=20, scale=0.1, gamma=0.2, probability=1.0)
    augmented = AugmentedSamples(samples, config=config, augmentation=augmentation, seed=0)
    first = augmented[1]
    assert first["image"].shape == (1, 224, 224) and first["image"].dtype == torch.float32
    assert not torch.equal(first["image"], samples[1]["image"])
    assert first["label"].item() == 1 and first["label"].dtype == samples[1]["label"].dtype
    again = AugmentedSamples(samples, config=config, augmentation=augmentation, seed=0)[1]
    assert torch.equal(first["image"], again["image"]), "the same seed draws the same augmentation"


def test_segmentation_labels_follow_rotations_as_classes() -> None:
    from fedmed.config import AugmentationConfig
    from fedmed.tasks.augmentation import AugmentedSamples

    config = TaskConfig(kind="segmentation", image_size=[32, 32])
    augmentation = AugmentationConfig(rotate_degrees=30, scale=0.2, probability=1.0)
    augmented = AugmentedSamples(squares(2), config=config, augmentation=augmentation, seed=3)[0]
    assert augmented["label"].dtype == torch.long
    assert set(augmented["label"].unique().tolist()) <= {0, 1}, "nearest-neighbour: no invented classes"


def test_classification_trains_at_224_with_augmentations() -> None:
    task_config = TaskConfig(kind="classification", image_size=[224, 224])
    train = TrainConfig(batch_size=2, augmentation={"rotate_degrees": 10, "scale": 0.1, "intensity_shift": 0.1})
    samples = [{"image": torch.randn(1, 224, 224), "label": torch.tensor(index % 2)} for index in range(4)]
    model = build_model(task_config, ModelConfig())
    result = train_local(model, samples, task=get_task(task_config), train=train, epochs=1, seed=0, device=CPU)
    assert result.steps == 2 and math.isfinite(result.loss)
