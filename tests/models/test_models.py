import pytest
import torch
from torch import nn

from fedmed.config import ModelConfig, TaskConfig
from fedmed.core.errors import ConfigError
from fedmed.models import build_model, site_local_keys

CASES = [
    (
        TaskConfig(kind="segmentation", spatial_dims=2, image_size=[32, 32], num_classes=3),
        ModelConfig(),
        (2, 3, 32, 32),
    ),
    (
        TaskConfig(kind="segmentation", spatial_dims=3, image_size=[16, 16, 16]),
        ModelConfig(channels=[8, 16]),
        (2, 2, 16, 16, 16),
    ),
    (
        TaskConfig(kind="segmentation", spatial_dims=2, image_size=[32, 32]),
        ModelConfig(name="segresnet"),
        (2, 2, 32, 32),
    ),
    (TaskConfig(kind="classification", spatial_dims=2, image_size=[28, 28]), ModelConfig(), (2, 2)),
    (TaskConfig(kind="classification", spatial_dims=3, image_size=[16, 16, 16], num_classes=4), ModelConfig(), (2, 4)),
    (TaskConfig(kind="enhancement", spatial_dims=2, image_size=[32, 32]), ModelConfig(), (2, 1, 32, 32)),
    (
        TaskConfig(kind="enhancement", spatial_dims=3, image_size=[16, 16, 16]),
        ModelConfig(channels=[8, 16]),
        (2, 1, 16, 16, 16),
    ),
]


@pytest.mark.parametrize(("task", "model_config", "shape"), CASES)
def test_registry_models_build_and_run(task: TaskConfig, model_config: ModelConfig, shape: tuple) -> None:
    model = build_model(task, model_config)
    assert model(torch.randn(2, 1, *task.image_size)).shape == shape


@pytest.mark.parametrize(("task", "model_config", "shape"), CASES)
def test_defaults_are_dp_compatible(task: TaskConfig, model_config: ModelConfig, shape: tuple) -> None:
    model = build_model(task, model_config)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    local = site_local_keys(model)
    assert local, "normalization layers must carry affine parameters for FedBN"
    norm_params = {
        n for n, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm))
    }
    assert {key.rsplit(".", 1)[0] for key in local} == norm_params


def test_enhancer_starts_as_identity() -> None:
    task = TaskConfig(kind="enhancement", spatial_dims=2, image_size=[32, 32])
    model = build_model(task, ModelConfig())
    image = torch.rand(1, 1, 32, 32)
    assert torch.equal(model(image), image)


def test_unknown_model_and_wrong_task_are_explained() -> None:
    task = TaskConfig(kind="segmentation", image_size=[32, 32])
    with pytest.raises(ConfigError, match=r"model\.name: unknown network 'vit-huge'; choose one of: densenet-small"):
        build_model(task, ModelConfig(name="vit-huge"))
    with pytest.raises(ConfigError, match="is for classification, not segmentation"):
        build_model(task, ModelConfig(name="densenet-small"))


def test_unet_stride_must_divide_image_size() -> None:
    task = TaskConfig(kind="segmentation", image_size=[30, 30])
    with pytest.raises(ConfigError, match="divisible by the UNet's total stride 4"):
        build_model(task, ModelConfig())


def test_batchnorm_can_be_chosen_and_is_site_local() -> None:
    model = build_model(TaskConfig(kind="segmentation", image_size=[32, 32]), ModelConfig(norm="batch"))
    assert any(key.endswith("running_mean") for key in site_local_keys(model))
