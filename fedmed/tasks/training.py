"""Local training: one loop for federated sites and the baselines, plain or DP-SGD.

The loop is plain; what varies is plugged in, the way Opacus wraps a model and optimizer: loss terms
(FedProx's and Ditto's pulls, fedmed.tasks.loss_terms), the steps' recipe (`PlainSteps`, or DP-SGD's
`PrivateSteps` from `DpSgdStep.wrap`), a step budget instead of epochs, and a kept optimizer state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedmed.config import TrainConfig
from fedmed.models import low_rank_adapters

from .augmentation import AugmentedSamples
from .base import Sample, Task
from .batches import Columns, draws, random_flips, shuffled_loader
from .dp_sgd import DpSgdStep
from .loss_terms import LossTerm


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the last epoch
    num_examples: int
    steps: int  # batches drawn, an empty Poisson draw included (DP-SGD charges it)
    seconds: float
    noised: list[tuple[float, float, int]] | None = None  # DP-SGD: Opacus' own (σ, q, steps) of the noised steps
    optimizer_state: dict | None = None  # the optimizer's state after the last step (a site may keep it)


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=train.learning_rate, momentum=0.9, weight_decay=train.weight_decay)
    return torch.optim.Adam(parameters, lr=train.learning_rate, weight_decay=train.weight_decay)


class StepRecipe(Protocol):
    """The recipe of each step: what the loop trains (`network`), with what and on what draws."""

    network: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    views: int  # copies of each sample in a piece (DP-SGD's augmentation multiplicity)

    def pieces(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]: ...

    def add_terms(self, loss: torch.Tensor) -> torch.Tensor: ...

    def before_step(self, *, last: bool) -> None: ...

    def end_step(self) -> None: ...

    def finish(self) -> list[tuple[float, float, int]] | None: ...


class PlainSteps:
    """Plain steps: each batch in one piece, the loss terms inside the loss."""

    views = 1

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, *, loss_terms: Sequence[LossTerm]
    ) -> None:
        self.network = self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.loss_terms = loss_terms

    def pieces(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [batch]

    def add_terms(self, loss: torch.Tensor) -> torch.Tensor:
        for term in self.loss_terms:
            loss = term.add(loss, self.model)
        return loss

    def before_step(self, *, last: bool) -> None:
        pass

    def end_step(self) -> None:
        pass

    def finish(self) -> None:
        return None


@dataclass
class _Piece:
    """What every piece's forward and backward pass needs, fixed for the call."""

    task: Task
    keys: list[str]
    generator: torch.Generator  # flips and the task's synthesis (e.g. enhancement's noise)
    flips: bool
    amp: bool
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def learn(self, chunk: dict[str, torch.Tensor], *, recipe: StepRecipe, last: bool) -> tuple[float, int]:
        """One forward and backward pass (and the optimizer step, unless DP-SGD waits for the last piece);
        the piece's summed loss and its number of samples."""
        views = recipe.views
        if views > 1:
            chunk = {key: value.repeat_interleave(views, dim=0) for key, value in chunk.items()}
            chunk = random_flips(chunk, generator=self.generator)
        elif self.flips:
            chunk = random_flips(chunk, generator=self.generator)
        recipe.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with autocast:
            loss = self.task.loss(recipe.network, chunk, generator=self.generator)
        loss = recipe.add_terms(loss)
        self.scaler.scale(loss).backward()
        recipe.before_step(last=last)
        self.scaler.step(recipe.optimizer)
        self.scaler.update()
        size = len(chunk[self.keys[0]]) // views
        return float(loss.detach()) * size, size


def train_local(
    model: nn.Module,
    samples: Sequence[Sample],
    *,
    task: Task,
    train: TrainConfig,
    epochs: int,
    seed: int,
    device: torch.device,
    steps: int | None = None,
    loss_terms: Sequence[LossTerm] = (),
    optimizer_state: dict | None = None,
    dp: DpSgdStep | None = None,
    workers: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `epochs` over `samples`, shuffled in an order fixed by `seed`.

    `samples` is a list of preprocessed samples (grid geometry) or a dataset drawing random patches
    (scan geometry), read by `workers` DataLoader processes.

    `steps` draws instead of `epochs` passes when set (a step budget). `loss_terms` add to each step's
    loss (fedmed.tasks.loss_terms: FedProx's or Ditto's pull). `optimizer_state` (an earlier
    TrainResult's) resumes the optimizer where it stopped, at this call's learning rate. With `dp`
    the steps are DP-SGD (Opacus: Poisson sampling, per-sample clipping, Gaussian noise) with the
    recipe `dp` names: logical batches processed in physical pieces, `dp.steps` draws instead of
    `epochs` when set, augmentation multiplicity and a weight average; the caller fixes the noise
    and charges the ledger. The model is left unwrapped either way. `on_step(epoch, batch)`
    is called (0-based) before each step, an empty Poisson draw included: progress displays use it.
    """
    if not samples:
        raise ValueError("no training samples: the site's training split is empty")
    torch.manual_seed(seed)
    model.to(device).train()
    if hasattr(samples, "set_random_state"):
        samples.set_random_state(seed)  # patches and augmentations drawn the same way in every engine
    elif train.augment and train.augmentation.beyond_flips:
        samples = AugmentedSamples(samples, config=task.config, augmentation=train.augmentation, seed=seed)
    keys = list(samples[0])
    batch_size = (dp and dp.logical_batch_size) or train.batch_size
    # Tuples, not dicts: Opacus builds empty Poisson batches from the structure of a sample.
    loader = shuffled_loader(Columns(samples, keys), batch_size=batch_size, seed=seed, workers=workers)
    flips = train.augment and train.augmentation.flips and not task.config.scan_geometry
    with _adapters(model, dp):  # merged into the convolutions' weights when the block ends
        optimizer = make_optimizer(model, train)
        if optimizer_state is not None:
            resume_optimizer(optimizer, optimizer_state, learning_rate=train.learning_rate)
        terms = [term.to(device) for term in loss_terms]
        piece = _Piece(
            task=task,
            keys=keys,
            generator=torch.Generator(device=device).manual_seed(seed + 1),
            flips=flips,
            amp=train.amp and device.type == "cuda" and dp is None,
        )
        started = time.perf_counter()
        if dp is None:
            wrapped = contextlib.nullcontext(PlainSteps(model, optimizer, loader, loss_terms=terms))
        else:
            wrapped = dp.wrap(model, optimizer, loader, seed=seed, device=device, loss_terms=terms, train=train)
        with wrapped as recipe:
            budget = dp.steps if dp is not None else steps  # DP-SGD's plan fixes its own step budget
            taken, loss = _loop(recipe, piece, device=device, epochs=epochs, budget=budget, on_step=on_step)
            noised = recipe.finish()
        return TrainResult(
            loss=loss,
            num_examples=len(samples),
            steps=taken,
            seconds=time.perf_counter() - started,
            noised=noised,
            optimizer_state=optimizer.state_dict(),
        )


def _adapters(model: nn.Module, dp: DpSgdStep | None) -> contextlib.AbstractContextManager:
    """DP-SGD with dp_sgd.trainable = "adapters" trains low-rank adapters (fedmed.models.adapters) this call."""
    if dp is None or not dp.adapter_rank:
        return contextlib.nullcontext()
    return low_rank_adapters(model, rank=dp.adapter_rank)


def _loop(
    recipe: StepRecipe,
    piece: _Piece,
    *,
    device: torch.device,
    epochs: int,
    budget: int | None,
    on_step: Callable[[int, int], None] | None,
) -> tuple[int, float]:
    """The steps of one call; how many were taken (an empty Poisson draw included) and the last epoch's mean loss."""
    taken, epoch_loss, epoch_examples = 0, 0.0, 0
    for epoch, batch_index, columns in draws(recipe.loader, epochs=epochs, steps=budget):
        if batch_index == 0:
            epoch_loss, epoch_examples = 0.0, 0
        taken += 1
        if on_step is not None:
            on_step(epoch, batch_index)
        if len(columns[0]) == 0:
            continue  # an empty Poisson draw: nothing to learn from, still a step
        batch = {key: value.to(device, non_blocking=True) for key, value in zip(piece.keys, columns, strict=True)}
        pieces = recipe.pieces(batch)
        for index, chunk in enumerate(pieces):
            loss, size = piece.learn(chunk, recipe=recipe, last=index == len(pieces) - 1)
            epoch_loss += loss
            epoch_examples += size
        recipe.end_step()
    return taken, epoch_loss / max(epoch_examples, 1)


def resume_optimizer(optimizer: torch.optim.Optimizer, state: dict, *, learning_rate: float) -> None:
    """Load a kept optimizer state; the learning rate is this round's (a schedule may have moved it)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
