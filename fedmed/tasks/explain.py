"""Saliency for classification models: which part of the input the predicted class came from.

Two of MONAI's methods: Grad-CAM (monai.visualize.GradCAM; one forward and one backward pass, a map at the
resolution of the network's last spatial feature map, upsampled) and occlusion sensitivity
(monai.visualize.OcclusionSensitivity; the drop in the class probability when a patch of the input is
blanked out, one forward pass per patch position). Either map is returned on the input's grid, scaled to
[0, 1] with 1 where the evidence for the class is strongest.

The model is left as it came: MONAI's hook wrapper registers hooks it never removes, switches in-place
activations off and clears gradients; all of that is undone here.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmed.core.errors import FedmedError

METHODS = ("gradcam", "occlusion")
OCCLUSION_MASK = 16  # voxels per side of the blanked patch (MONAI's default), at most a quarter of the image
OCCLUSION_OVERLAP = 0.5
OCCLUSION_BATCH = 16
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


class ExplainError(FedmedError):
    """A saliency map cannot be computed for this model, input or method."""


def saliency_map(model: nn.Module, image: torch.Tensor, *, target_class: int, method: str = "gradcam") -> np.ndarray:
    """Saliency of `target_class` for `image` (the model's input, (1, C, *spatial), already preprocessed):
    a float32 array of the input's spatial shape in [0, 1]; all zeros when nothing in the input moved the
    class score."""
    if method not in METHODS:
        raise ExplainError(f"saliency method '{method}' is not known; use one of {', '.join(METHODS)}")
    if image.dim() < 3 or image.shape[0] != 1:
        raise ExplainError(
            f"saliency needs one image shaped (1, channels, *spatial), got {tuple(image.shape)}; add the batch axis"
        )
    image = image.as_tensor() if hasattr(image, "as_tensor") else image  # a MONAI MetaTensor: plain values
    with _model_untouched(model):
        classes = _class_count(model, image)
        if not 0 <= target_class < classes:
            raise ExplainError(f"target_class {target_class} is out of range: the model has {classes} classes")
        if method == "gradcam":
            raw = _gradcam(model, image, target_class=target_class)
        else:
            raw = _occlusion(model, image, target_class=target_class)
    return _unit_range(raw)


def gradcam_layer(model: nn.Module, image: torch.Tensor) -> str:
    """Name of the module Grad-CAM looks at: the last one (in the order a forward pass calls them) whose
    output is still a spatial feature map larger than one voxel, i.e. the last before global pooling
    (`class_layers.relu` in MONAI's DenseNet). Where the network pools the input down to a single voxel
    before that, an earlier map is taken, since a one-voxel map cannot say where anything is."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(_recorder(name, calls)))
    try:
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    spatial = [(name, shape) for name, shape in calls if len(shape) == image.dim()]
    larger = [name for name, shape in spatial if int(np.prod(shape[2:])) > 1]
    if larger:
        return larger[-1]
    if spatial:
        return spatial[-1][0]
    raise ExplainError(
        f"{type(model).__name__} has no module whose output is a spatial feature map, so Grad-CAM has nothing to "
        "look at; use method='occlusion'"
    )


def _recorder(name: str, calls: list[tuple[str, tuple[int, ...]]]) -> Any:
    def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            calls.append((name, tuple(output.shape)))

    return record


def _class_count(model: nn.Module, image: torch.Tensor) -> int:
    try:
        with torch.no_grad():
            logits = model(image)
    except RuntimeError as error:
        raise ExplainError(
            f"the model does not take an input shaped {tuple(image.shape)} ({error}); give the preprocessed image "
            "shaped (1, channels, *spatial) as the model saw it in training"
        ) from None
    if logits.dim() != 2:
        raise ExplainError(
            f"saliency is for classification models (logits shaped (1, classes)); this model returns "
            f"{tuple(logits.shape)}; for segmentation the uncertainty map is the explanation"
        )
    return int(logits.shape[1])


def _gradcam(model: nn.Module, image: torch.Tensor, *, target_class: int) -> torch.Tensor:
    from monai.visualize import GradCAM  # MONAI is heavy: imported when first used

    layer = gradcam_layer(model, image)
    # MONAI's default post-processing maps the maximum to 0; the raw map is scaled here instead.
    cam = GradCAM(nn_module=model, target_layers=layer, postprocessing=lambda values: values)
    # Parameters record no gradient here (_model_untouched); the input carries it, so the layer's hook fires.
    inputs = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        result = cam(x=inputs, class_idx=target_class)
    return result[0, 0].detach()


def _occlusion(model: nn.Module, image: torch.Tensor, *, target_class: int) -> torch.Tensor:
    from monai.visualize import OcclusionSensitivity  # MONAI is heavy: imported when first used

    mask = [max(1, min(OCCLUSION_MASK, size // 4)) for size in image.shape[2:]]
    occlusion = OcclusionSensitivity(
        nn_module=model,
        mask_size=mask,
        n_batch=OCCLUSION_BATCH,
        verbose=False,
        overlap=OCCLUSION_OVERLAP,
        # MONAI picks sigmoid or softmax from the input's channel count; the classes are in the output's.
        activate=lambda logits: logits.softmax(dim=1),
    )
    inputs = image.detach()
    with torch.no_grad(), warnings.catch_warnings():
        # MONAI 1.6 indexes with lists, which torch deprecates; nothing for a user to act on.
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        before = model(inputs).softmax(dim=1)[0, target_class]
        occluded, _ = occlusion(x=inputs)
    # MONAI's map holds the class probabilities with each voxel's neighbourhood blanked, classes on axis 1;
    # the drop in the target's probability is the evidence for it.
    after = torch.as_tensor(occluded)[0, target_class]
    return (before - after).clamp(min=0.0)


def _unit_range(raw: torch.Tensor) -> np.ndarray:
    values = raw.float().cpu().numpy()
    values = np.where(np.isfinite(values), np.maximum(values, 0.0), 0.0)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0.0:
        return np.zeros(values.shape, dtype=np.float32)
    return (values / peak).astype(np.float32)


@contextlib.contextmanager
def _model_untouched(model: nn.Module) -> Iterator[None]:
    """Run in eval mode with parameters not recording gradients; afterwards restore the training flag,
    requires_grad, existing gradients, in-place flags, and remove every hook added meanwhile."""
    training = model.training
    parameters = list(model.parameters())
    requires = [parameter.requires_grad for parameter in parameters]
    gradients = [parameter.grad for parameter in parameters]
    modules = list(model.modules())
    hooks = [{name: set(getattr(module, name, {})) for name in HOOK_DICTS} for module in modules]
    full_backward = [module.__dict__.get("_is_full_backward_hook") for module in modules]
    inplace = [module.__dict__.get("inplace") for module in modules]
    model.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        model.train(training)
        for parameter, flag, gradient in zip(parameters, requires, gradients, strict=True):
            parameter.requires_grad_(flag)
            parameter.grad = gradient
        for module, before, full, flag in zip(modules, hooks, full_backward, inplace, strict=True):
            for name, keys in before.items():
                added = set(getattr(module, name, {})) - keys
                for key in added:
                    del getattr(module, name)[key]
            module.__dict__["_is_full_backward_hook"] = full
            if flag is not None:
                module.__dict__["inplace"] = flag
