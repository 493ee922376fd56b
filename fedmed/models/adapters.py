"""Low-rank adapters on convolutions (LoRA, Hu et al. 2022), trained for one round and merged into the weights.

While a site trains, each adaptable convolution W (frozen) gains a rank-r path: y = W * x + up(down(x)),
where `down` is a convolution like W with r output channels and `up` a 1x1 convolution from r to W's
outputs, initialised to zero so the network starts exactly as received. Only `down` and `up` train, and
Opacus computes per-sample gradients for them alone (fedmed.tasks.dp_layers), so DP-SGD's noise covers
r·(in·k + out) values per convolution instead of in·out·k. After the round the adapter is merged,
W += up ∘ down, and removed: the update that leaves the site, the global model and every export are the
network's own weights, and the sites' changes average exactly (the mean of the products, not the product
of mean factors).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def adaptable_convolutions(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """The convolutions (transposed too) an adapter can merge into: ungrouped, zero padding, numeric padding."""
    return [
        (name, module)
        for name, module in network.named_modules()
        if isinstance(module, CONVOLUTIONS + TRANSPOSED)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ]


class LowRankAdapter(nn.Module):
    """The rank-r path added to one convolution's output: up(down(x))."""

    def __init__(self, convolution: nn.Module, *, rank: int) -> None:
        super().__init__()
        rank = min(rank, convolution.in_channels, convolution.out_channels)
        dims = convolution.weight.dim() - 2
        kind = type(convolution)
        extra = {"output_padding": convolution.output_padding} if isinstance(convolution, TRANSPOSED) else {}
        self.down = kind(
            convolution.in_channels,
            rank,
            convolution.kernel_size,
            stride=convolution.stride,
            padding=convolution.padding,
            dilation=convolution.dilation,
            bias=False,
            **extra,
        )
        self.up = CONVOLUTIONS[dims - 1](rank, convolution.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.to(device=convolution.weight.device, dtype=convolution.weight.dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(inputs))

    @torch.no_grad()
    def delta(self, convolution: nn.Module) -> torch.Tensor:
        """The change of `convolution`'s weight that equals this path: up's 1x1 mixing composed with down."""
        up = self.up.weight.flatten(1)  # out x r
        down = self.down.weight
        if isinstance(convolution, TRANSPOSED):  # weights are in x out x k: down is in x r x k
            return torch.einsum("irk,or->iok", down.flatten(2), up).view_as(convolution.weight)
        return (up @ down.flatten(1)).view_as(convolution.weight)  # out x (in·k)


def trained_values(network: nn.Module, *, trainable: str, rank: int) -> int:
    """How many values DP-SGD trains in `network` (its parameters' requires_grad as dp_sgd.trainable left them;
    with adapters, theirs instead of the convolutions' weights)."""
    if trainable != "adapters":
        return sum(parameter.numel() for parameter in network.parameters() if parameter.requires_grad)
    total = 0
    for _, convolution in adaptable_convolutions(network):
        if convolution.weight.requires_grad:
            kernel = convolution.weight[0, 0].numel()
            rank_used = min(rank, convolution.in_channels, convolution.out_channels)
            total += rank_used * (convolution.in_channels * kernel + convolution.out_channels)
    return total


def _add_adapter_output(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(inputs[0])


@contextmanager
def low_rank_adapters(network: nn.Module, *, rank: int) -> Iterator[list[nn.Parameter]]:
    """Adapters on every adaptable convolution whose weight is trainable, for the block: the convolutions'
    own parameters are fixed meanwhile, and the adapters' parameters are what trains (yielded). On exit each
    adapter is merged into its convolution's weight and removed, and every parameter trains as before. The
    adapters draw their initial values from torch's global generator (the caller seeds it)."""
    adapted = [(name, conv) for name, conv in adaptable_convolutions(network) if conv.weight.requires_grad]
    trained = {parameter: parameter.requires_grad for parameter in network.parameters()}
    for parameter in trained:
        parameter.requires_grad_(False)
    hooks = []
    for _, convolution in adapted:
        convolution.lora = LowRankAdapter(convolution, rank=rank)
        hooks.append(convolution.register_forward_hook(_add_adapter_output))
    try:
        yield [parameter for _, convolution in adapted for parameter in convolution.lora.parameters()]
        for _, convolution in adapted:
            convolution.weight.data += convolution.lora.delta(convolution)
    finally:
        for hook in hooks:
            hook.remove()
        for _, convolution in adapted:
            del convolution.lora
        for parameter, requires_grad in trained.items():
            parameter.requires_grad_(requires_grad)
