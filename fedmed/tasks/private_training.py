"""DP-SGD local training with Opacus: per-sample clipping, Gaussian noise, Poisson sampling.

The caller fixes the noise multiplier for the whole run and charges the site's ledger; this module
only trains. Accounting counts every Poisson draw as a step (`planned_steps`), including the rare
empty batch that is skipped, so the ledger never under-charges.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmed.config import TrainConfig
from fedmed.errors import FedmedError

from .base import Sample, Task
from .training import TrainResult, make_optimizer, proximal_anchors, random_flips


class PrivateModelError(FedmedError):
    """The model has layers DP-SGD cannot train (e.g. BatchNorm mixes samples in a batch)."""


@dataclass(frozen=True)
class DpSgdStep:
    noise_multiplier: float
    max_grad_norm: float


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Poisson batches per epoch: Opacus samples each example with rate 1 / this."""
    return math.ceil(num_examples / min(batch_size, num_examples))


def sample_rate(num_examples: int, batch_size: int) -> float:
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def check_private_model(model: nn.Module, *, model_name: str) -> None:
    """Fail before training, naming the layers Opacus cannot handle and the fix."""
    validator = _opacus_validator()
    model.train()  # Opacus validates training behaviour (and refuses a model left in eval mode)
    problems = validator.validate(model, strict=False)
    if problems:
        listed = "; ".join(str(problem) for problem in problems[:5])
        raise PrivateModelError(
            f"model '{model_name}' cannot train with DP-SGD: {listed}. Use a network with instance or group "
            f"normalization (model.norm = \"instance\" or \"group\") and no in-place activations"
        )


def train_private(
    model: nn.Module,
    samples: Sequence[Sample],
    *,
    task: Task,
    train: TrainConfig,
    epochs: int,
    seed: int,
    device: torch.device,
    dp: DpSgdStep,
    proximal_mu: float = 0.0,
    proximal_keys: Collection[str] = (),
) -> TrainResult:
    """DP-SGD version of `training.train_local`; the model is trained in place and left unwrapped."""
    from fedmed.privacy import import_opacus

    PrivacyEngine = import_opacus().PrivacyEngine  # noqa: N806 - the Opacus class
    if not samples:
        raise ValueError("no training samples: the site's training split is empty")
    torch.manual_seed(seed)
    model.to(device).train()
    keys = list(samples[0])
    # Tuples, not dicts: Opacus builds empty Poisson batches from the structure of a sample.
    rows = [tuple(sample[key] for key in keys) for sample in samples]
    loader = DataLoader(rows, batch_size=min(train.batch_size, len(rows)), shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(model, train)
    anchors = proximal_anchors(model, proximal_keys) if proximal_mu > 0 else {}
    with warnings.catch_warnings():
        # Opacus' reminder about its (slower) cryptographically secure RNG; fedmed seeds for reproducibility.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="rdp")  # the site's ledger does the accounting that counts
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
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    started = time.perf_counter()
    drawn, loss_total, examples = 0, 0.0, 0
    try:
        with warnings.catch_warnings():
            # The first layer's input needs no gradient, which torch reports for Opacus' backward hooks.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            for _ in range(epochs):
                for rows_batch in private_loader:
                    drawn += 1
                    if len(rows_batch[0]) == 0:
                        continue  # an empty Poisson draw: nothing to learn from, still charged
                    batch = {key: value.to(device, non_blocking=True)
                             for key, value in zip(keys, rows_batch, strict=True)}
                    if train.augment:
                        batch = random_flips(batch, generator=generator)
                    private_optimizer.zero_grad(set_to_none=True)
                    loss = task.loss(private_model, batch, generator=generator)
                    loss.backward()
                    private_optimizer.step()
                    if anchors:
                        _proximal_step(model, anchors, step=train.learning_rate * proximal_mu)
                    loss_total += float(loss.detach()) * len(batch[keys[0]])
                    examples += len(batch[keys[0]])
    finally:
        # The session reuses its model next round: drop Opacus' hooks and per-sample gradients.
        private_model._close()
        for parameter in model.parameters():
            parameter.grad = None
    return TrainResult(loss=loss_total / max(examples, 1), num_examples=len(samples), steps=drawn,
                       seconds=time.perf_counter() - started)


@torch.no_grad()
def _proximal_step(model: nn.Module, anchors: dict[str, torch.Tensor], *, step: float) -> None:
    """FedProx as a decoupled step w -= lr*mu*(w - w_global).

    Inside the loss the proximal gradient would be dropped: Opacus replaces every gradient by the
    clipped, noised per-sample sum. The step uses only public values (the global weights), so it
    costs no privacy.
    """
    for name, parameter in model.named_parameters():
        anchor = anchors.get(name)
        if anchor is not None:
            parameter.sub_(step * (parameter - anchor))


def _opacus_validator():  # noqa: ANN202 - opacus.validators.ModuleValidator, imported lazily
    from fedmed.privacy import import_opacus

    import_opacus()
    from opacus.validators import ModuleValidator

    return ModuleValidator
