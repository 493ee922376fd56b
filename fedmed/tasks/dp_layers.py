"""Per-sample gradients of convolutions at the cost of one ordinary weight gradient.

Opacus 1.6 computes a convolution's per-sample gradients by unfolding its input into patches
(k^d times the activation's size, then an einsum), and has no sampler at all for transposed
convolutions, which every MONAI UNet uses to upsample: those it vmaps per sample (functorch).
Both dominate a DP-SGD step on a CPU. Here the batch becomes the groups of one grouped
convolution: the weight gradient of `groups = batch` over the batch folded into channels is, group
by group, each sample's own weight gradient (the trick of torch's ExpandedWeights), computed by the
same kernel as the non-private backward pass. Checked against functorch in the tests.
"""

from __future__ import annotations

import torch
from torch import nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_registered = False


def register_convolution_samplers() -> None:
    """Replace Opacus' convolution samplers once per process (Opacus is imported by the first private run)."""
    global _registered
    if not _registered:
        # Opacus is imported only when DP-SGD runs (fedmed.core.opacus)
        from opacus.grad_sample import register_grad_sampler

        register_grad_sampler(list(CONVOLUTIONS))(convolution_grad_sample)
        _registered = True


def convolution_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    inputs = activations[0].to(backprops.dtype)
    if layer.groups != 1 or isinstance(layer.padding, str) or layer.padding_mode != "zeros" or not len(inputs):
        return _opacus_sampler(layer, activations, backprops)  # rare layouts: Opacus' own way
    batch = inputs.shape[0]
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    weight = layer.weight
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        backprops.reshape(1, -1, *backprops.shape[2:]),
        inputs.reshape(1, -1, *inputs.shape[2:]),
        weight.detach().repeat(batch, *([1] * (weight.dim() - 1))),
        None,
        layer.stride,
        layer.padding,
        layer.dilation,
        transposed,
        layer.output_padding,
        batch,
        [False, True, False],
    )
    samples = {weight: weight_grad.view(batch, *weight.shape)}
    if layer.bias is not None:
        samples[layer.bias] = backprops.reshape(batch, backprops.shape[1], -1).sum(dim=2)
    return {parameter: value for parameter, value in samples.items() if parameter.requires_grad}


def _opacus_sampler(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    # Opacus is imported only when DP-SGD runs (fedmed.core.opacus)
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return ft_compute_per_sample_gradient(layer, activations, backprops)
    return compute_conv_grad_sample(layer, activations, backprops)
