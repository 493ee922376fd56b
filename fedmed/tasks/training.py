"""Local training: one loop for federated sites and the baselines, plain or DP-SGD."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedmed.config import TrainConfig

from .augmentation import AugmentedSamples
from .base import Sample, Task
from .dp_sgd import DpSgdStep, WeightAverage, average_views, privatized, proximal_step


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
    proximal_mu: float = 0.0,
    proximal_keys: Collection[str] = (),
    proximal_anchors: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    dp: DpSgdStep | None = None,
    workers: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `epochs` over `samples`, shuffled in an order fixed by `seed`.

    `samples` is a list of preprocessed samples (grid geometry) or a dataset drawing random patches
    (scan geometry), read by `workers` DataLoader processes.

    `steps` draws instead of `epochs` passes when set (a step budget).
    With proximal_mu > 0 (FedProx) the weights named in `proximal_keys` (the shared weights as
    received from the server) are pulled towards their starting values with strength mu, or
    towards `proximal_anchors` when given (Ditto: a personal model pulled towards the global one).
    `optimizer_state` (an earlier TrainResult's) resumes the optimizer where it stopped, at this
    call's learning rate. With `dp`
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
    # Tuples, not dicts: Opacus builds empty Poisson batches from the structure of a sample.
    rows = Columns(samples, keys)
    loader = DataLoader(
        rows,
        batch_size=min((dp and dp.logical_batch_size) or train.batch_size, len(rows)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        worker_init_fn=_seed_worker if workers else None,
    )
    flip_batches = train.augment and train.augmentation.flips and not task.config.scan_geometry
    optimizer = base_optimizer = make_optimizer(model, train)
    if optimizer_state is not None:
        resume_optimizer(optimizer, optimizer_state, learning_rate=train.learning_rate)
    anchors = {}
    if proximal_mu > 0:
        anchors = snapshot_anchors(model, proximal_keys) if proximal_anchors is None else proximal_anchors
        anchors = {name: value.to(device) for name, value in anchors.items()}
    use_amp = train.amp and device.type == "cuda" and dp is None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    started = time.perf_counter()
    budget = dp.steps if dp is not None else steps
    steps, epoch_loss, epoch_examples = 0, 0.0, 0
    private = privatized(model, optimizer, loader, dp=dp, seed=seed, device=device)
    with private as (network, optimizer, loader, accountant):
        average = WeightAverage(model, decay=dp.ema_decay) if dp is not None and dp.ema_decay > 0 else None
        pieces = (dp.physical_batch_size if dp is not None else None) or train.batch_size
        views = dp.augmentation_multiplicity if dp is not None else 1
        for epoch, batch_index, columns in draws(loader, epochs=epochs, steps=budget):
            if batch_index == 0:
                epoch_loss, epoch_examples = 0.0, 0
            steps += 1
            if on_step is not None:
                on_step(epoch, batch_index)
            if len(columns[0]) == 0:
                continue  # an empty Poisson draw: nothing to learn from, still a step
            batch = {key: value.to(device, non_blocking=True) for key, value in zip(keys, columns, strict=True)}
            chunks = split_batch(batch, size=pieces) if dp is not None else [batch]
            for index, chunk in enumerate(chunks):
                if views > 1:
                    chunk = {key: value.repeat_interleave(views, dim=0) for key, value in chunk.items()}
                    chunk = random_flips(chunk, generator=generator)
                elif flip_batches:
                    chunk = random_flips(chunk, generator=generator)
                optimizer.zero_grad(set_to_none=True)
                autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
                with autocast:
                    loss = task.loss(network, chunk, generator=generator)
                if anchors and dp is None:
                    loss = loss + proximal_term(model, anchors, mu=proximal_mu)
                scaler.scale(loss).backward()
                if dp is not None:
                    if views > 1:
                        average_views(optimizer, views=views)
                    # Opacus' BatchMemoryManager protocol: clip and sum each piece, step after the last.
                    optimizer.signal_skip_step(do_skip=index < len(chunks) - 1)
                scaler.step(optimizer)
                scaler.update()
                size = len(chunk[keys[0]]) // views
                epoch_loss += float(loss.detach()) * size
                epoch_examples += size
            if anchors and dp is not None:
                # DP-SGD replaces every gradient, so the proximal pull is a step of its own.
                proximal_step(model, anchors, step=train.learning_rate * proximal_mu)
            if average is not None:
                average.update()
        if average is not None:
            average.copy_to_model()
        noised = list(accountant.history) if accountant is not None else None
    return TrainResult(
        loss=epoch_loss / max(epoch_examples, 1),
        num_examples=len(samples),
        steps=steps,
        seconds=time.perf_counter() - started,
        noised=noised,
        optimizer_state=base_optimizer.state_dict(),
    )


def resume_optimizer(optimizer: torch.optim.Optimizer, state: dict, *, learning_rate: float) -> None:
    """Load a kept optimizer state; the learning rate is this round's (a schedule may have moved it)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def draws(loader: DataLoader, *, epochs: int, steps: int | None) -> Iterator[tuple[int, int, tuple]]:
    """(epoch, batch index, batch) for `epochs` passes, or for exactly `steps` draws across passes."""
    if steps is None:
        for epoch in range(epochs):
            for batch_index, columns in enumerate(loader):
                yield epoch, batch_index, columns
        return
    drawn, epoch = 0, 0
    while drawn < steps:
        for batch_index, columns in enumerate(loader):
            if drawn == steps:
                return
            drawn += 1
            yield epoch, batch_index, columns
        epoch += 1


def split_batch(batch: dict[str, torch.Tensor], *, size: int) -> list[dict[str, torch.Tensor]]:
    """A logical batch in physical pieces of at most `size` samples, as even as possible (Opacus' split)."""
    total = len(next(iter(batch.values())))
    count = max(1, -(-total // size))
    pieces = [dict(zip(batch, values, strict=True)) for values in zip(*(v.tensor_split(count) for v in batch.values()))]
    return [piece for piece in pieces if len(next(iter(piece.values())))]


class Columns(Dataset):
    """Samples as tuples in a fixed key order, read lazily (a patch dataset draws on every read)."""

    def __init__(self, samples: Sequence[Sample], keys: list[str]) -> None:
        self.samples = samples
        self.keys = keys

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        sample = self.samples[index]
        return tuple(sample[key] for key in self.keys)


def _seed_worker(worker_id: int) -> None:
    # Each worker reseeds the dataset's MONAI transforms from its own torch seed, else every worker
    # would draw the same patches.
    from monai.data.utils import worker_init_fn

    worker_init_fn(worker_id)


def random_flips(batch: dict[str, torch.Tensor], *, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Flip each sample along each spatial axis with probability 1/2; labels shaped like the image follow."""
    image = batch["image"]
    flipped = dict(batch)
    for axis in range(2, image.dim()):
        chosen = torch.rand(image.shape[0], generator=generator, device=generator.device) < 0.5
        chosen = chosen.to(image.device).view(-1, *([1] * (image.dim() - 1)))
        for key, value in batch.items():
            if value.dim() == image.dim():
                flipped[key] = torch.where(chosen, flipped[key].flip(axis), flipped[key])
    return flipped


def proximal_term(model: nn.Module, anchors: dict[str, torch.Tensor], *, mu: float) -> torch.Tensor:
    """mu/2 * sum ||w - w_anchor||^2 (FedProx, Li et al. 2020)."""
    parameters = dict(model.named_parameters())
    squared = sum((parameters[name] - anchor).pow(2).sum() for name, anchor in anchors.items())
    return 0.5 * mu * squared


def snapshot_anchors(model: nn.Module, keys: Collection[str]) -> dict[str, torch.Tensor]:
    wanted = set(keys)
    return {name: p.detach().clone() for name, p in model.named_parameters() if name in wanted and p.requires_grad}
