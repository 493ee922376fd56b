"""DP-SGD with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

`training.train_local` runs the steps; `DpSgdStep.wrap` turns its model, optimizer and loader into
Opacus' private ones and does DP-SGD's part of each step (`PrivateSteps`); `check_private_model`
checks that a model can train privately. The caller fixes the noise
multiplier for the whole run and charges the site's ledger (fedmed.site.privacy): every Poisson
draw counts as a step, the rare empty one included, so the ledger never under-charges.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmed.config import TrainConfig
from fedmed.core.errors import FedmedError
from fedmed.core.opacus import import_opacus

from .batches import split_batch
from .dp_layers import register_convolution_samplers
from .loss_terms import LossTerm


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
    adapter_rank: int = 0  # dp_sgd.trainable = "adapters": train low-rank adapters of this rank, merged after

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        *,
        seed: int,
        device: torch.device,
        loss_terms: Sequence[LossTerm],
        train: TrainConfig,
    ) -> AbstractContextManager[PrivateSteps]:
        """Opacus' private model, optimizer and Poisson loader for the block, with DP-SGD's part of each step."""
        return private_steps(
            model, optimizer, loader, dp=self, seed=seed, device=device, loss_terms=loss_terms, train=train
        )


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
    from opacus.validators import ModuleValidator  # Opacus loads only when DP-SGD is asked for (import_opacus)

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
    dp: DpSgdStep,
    seed: int,
    device: torch.device,
) -> Iterator[tuple[nn.Module, torch.optim.Optimizer, DataLoader, object]]:
    """Opacus' model, optimizer, Poisson loader and accountant for the block. The accountant only counts the
    noised steps, as a check on the ledger.

    On exit the model is unwrapped: the session reuses it next round without Opacus' hooks.
    """
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


class PrivateSteps:
    """DP-SGD's part of each step of train_local's loop: a logical batch in physical pieces, each sample's views
    averaged before clipping, one optimizer step after the last piece, loss terms as steps of their own, and
    the weight average."""

    def __init__(
        self,
        dp: DpSgdStep,
        *,
        model: nn.Module,
        private: tuple[nn.Module, torch.optim.Optimizer, DataLoader, object],
        loss_terms: Sequence[LossTerm],
        train: TrainConfig,
    ) -> None:
        self.model = model
        self.network, self.optimizer, self.loader, self.accountant = private
        self.loss_terms = loss_terms
        self.learning_rate = train.learning_rate
        self.piece_size = dp.physical_batch_size or train.batch_size
        self.views = dp.augmentation_multiplicity
        self.average = WeightAverage(model, decay=dp.ema_decay) if dp.ema_decay > 0 else None

    def pieces(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return split_batch(batch, size=self.piece_size)

    def add_terms(self, loss: torch.Tensor) -> torch.Tensor:
        return loss  # DP-SGD replaces every gradient, so each loss term is a step of its own (end_step)

    def before_step(self, *, last: bool) -> None:
        if self.views > 1:
            average_views(self.optimizer, views=self.views)
        # Opacus' BatchMemoryManager protocol: clip and sum each piece, step after the last.
        self.optimizer.signal_skip_step(do_skip=not last)

    def end_step(self) -> None:
        for term in self.loss_terms:
            term.step(self.model, learning_rate=self.learning_rate)
        if self.average is not None:
            self.average.update()

    def finish(self) -> list[tuple[float, float, int]]:
        """The weight average into the model; Opacus' own (σ, q, steps) of the noised steps."""
        if self.average is not None:
            self.average.copy_to_model()
        return list(self.accountant.history)


@contextmanager
def private_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    dp: DpSgdStep,
    seed: int,
    device: torch.device,
    loss_terms: Sequence[LossTerm],
    train: TrainConfig,
) -> Iterator[PrivateSteps]:
    with privatized(model, optimizer, loader, dp=dp, seed=seed, device=device) as private:
        yield PrivateSteps(dp, model=model, private=private, loss_terms=loss_terms, train=train)
