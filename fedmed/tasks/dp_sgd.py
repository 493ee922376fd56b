"""DP-SGD with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

`training.train_local` runs the steps; this module turns its model, optimizer and loader into
Opacus' private ones and checks that a model can train privately. The caller fixes the noise
multiplier for the whole run and charges the site's ledger (fedmed.site.privacy): every Poisson
draw counts as a step, the rare empty one included, so the ledger never under-charges.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmed.core.errors import FedmedError
from fedmed.core.opacus import import_opacus

from .dp_layers import register_convolution_samplers


class PrivateModelError(FedmedError):
    """The model has layers DP-SGD cannot train (e.g. BatchNorm mixes samples in a batch)."""


@dataclass(frozen=True)
class DpSgdStep:
    """One round of DP-SGD at a site: the run's fixed noise and the recipe's choices ([dp_sgd])."""

    noise_multiplier: float
    max_grad_norm: float
    logical_batch_size: int | None = None  # expected Poisson batch per step; None: train.batch_size
    physical_batch_size: int | None = None  # pieces a logical batch is processed in; None: train.batch_size
    steps: int | None = None  # logical steps this round; None: train_local's epochs
    augmentation_multiplicity: int = 1
    ema_decay: float = 0.0


class WeightAverage:
    """Exponential moving average of the trainable weights with De et al.'s (2022) warm-up.

    The decay at update t is min(decay, (1 + t) / (10 + t)), so a round of a few steps still moves
    away from its starting point. Only DP outputs enter it: post-processing, no privacy cost.
    """

    def __init__(self, model: nn.Module, *, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.parameters], 1 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for parameter, average in zip(self.parameters, self.average, strict=True):
            parameter.copy_(average)


def average_views(optimizer: torch.optim.Optimizer, *, views: int) -> None:
    """Augmentation multiplicity (De et al. 2022): average each sample's per-view gradients before clipping.

    The physical batch holds `views` consecutive copies of every sample; Opacus' per-sample gradients
    of the mean loss are each view's own gradient, so their mean is the gradient of the sample's mean
    loss over its views, and clipping then bounds each sample's contribution exactly as without views.
    """
    for parameter in optimizer.params:
        grad_sample = parameter.grad_sample
        if grad_sample is not None:
            parameter.grad_sample = grad_sample.view(-1, views, *grad_sample.shape[1:]).mean(dim=1)


def check_private_model(model: nn.Module, *, model_name: str) -> None:
    """Fail before training, naming the layers Opacus cannot handle and the fix."""
    import_opacus()
    from opacus.validators import ModuleValidator

    model.train()  # Opacus validates training behaviour (and refuses a model left in eval mode)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        listed = "; ".join(str(problem) for problem in problems[:5])
        raise PrivateModelError(
            f"model '{model_name}' cannot train with DP-SGD: {listed}. Use a network with instance or group "
            f'normalization (model.norm = "instance" or "group") and no in-place activations'
        )


@contextmanager
def privatized(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    dp: DpSgdStep | None,
    seed: int,
    device: torch.device,
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, DataLoader, object | None]]:
    """Opacus' model, optimizer, Poisson loader and accountant for the block (the inputs unchanged and no
    accountant without `dp`). The accountant only counts the noised steps, as a check on the ledger.

    On exit the model is unwrapped: the session reuses it next round without Opacus' hooks.
    """
    if dp is None:
        yield model, optimizer, loader, None
        return
    privacy_engine = import_opacus().PrivacyEngine
    register_convolution_samplers()
    with warnings.catch_warnings():
        # Opacus' reminder about its (slower) cryptographically secure RNG; fedmed seeds for reproducibility.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = privacy_engine(accountant="rdp")  # the site's ledger does the accounting that counts
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator(device=device).manual_seed(seed + 2),
        )
    private_loader.batch_sampler.generator = torch.Generator().manual_seed(seed + 3)
    try:
        with warnings.catch_warnings():
            # The first layer's input needs no gradient, which torch reports for Opacus' backward hooks.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            yield private_model, private_optimizer, private_loader, engine.accountant
    finally:
        private_model._close()
        for parameter in model.parameters():
            parameter.grad = None


@torch.no_grad()
def proximal_step(model: nn.Module, anchors: dict[str, torch.Tensor], *, step: float) -> None:
    """FedProx under DP-SGD, as a decoupled step w -= lr*mu*(w - w_global).

    Inside the loss the proximal gradient would be dropped: Opacus replaces every gradient by the
    clipped, noised per-sample sum. The step uses only public values (the global weights), so it
    costs no privacy.
    """
    for name, parameter in model.named_parameters():
        anchor = anchors.get(name)
        if anchor is not None:
            parameter.sub_(step * (parameter - anchor))
