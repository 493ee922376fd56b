"""A small site's fine-tune, chosen by cross-validation over its training cases.

With a tuning split of one or two cases, whether the fine-tuned model beats the global one is a coin toss
(docs/benchmarks/every-site.md). Here every training case is held out once: each fold fine-tunes the global model on
the other folds' cases, all folds epoch by epoch in step, and the held-out score per epoch, pooled over the folds,
says how long to fine-tune; epoch 0 is the global model itself, so a fine-tune that helps no fold is never delivered.
The delivered model is then fine-tuned on every training case for as many optimizer steps as the folds took to that
epoch (an epoch over all the cases has more batches than one over a fold's share: at 3 cases and batches of 2,
twice as many).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from fedmed.site.parts import SiteParts
from fedmed.site.spec import StateDict, site_seed
from fedmed.tasks import train_local


@dataclass
class _Fold:
    train: Sequence
    held: Sequence
    state: StateDict
    optimizer_state: dict | None = None
    steps: list[int] = field(default_factory=lambda: [0])  # optimizer steps taken by the end of each epoch


@dataclass(frozen=True)
class FoldChoice:
    """The pooled held-out score per fine-tune epoch (index 0: the global model) and the epoch chosen."""

    curve: list[float]
    best_epoch: int
    folds: int
    cases: int  # every training case, each held out once
    seconds: float

    @property
    def global_score(self) -> float:
        return self.curve[0]

    @property
    def best_score(self) -> float:
        return self.curve[self.best_epoch]


def cross_validated_finetune(
    site: SiteParts, model: nn.Module, *, server_round: int, patience: int, better: Callable[[float, float], bool]
) -> FoldChoice:
    """`model` holds the global weights (with the site's own layers); it is left fine-tuned on every training case
    for the chosen number of epochs, or untouched when none helps. `better(score, than)` orders scores."""
    start = _on_cpu(model.state_dict())
    folds = [_Fold(train, held, start) for train, held in site.cases.choice_folds()]
    curve = [_pooled_score(site, model, folds)]
    best_epoch, seconds = 0, 0.0
    for epoch in range(1, site.config.evaluation.finetune_epochs + 1):
        scores = []
        for number, fold in enumerate(folds):
            model.load_state_dict(fold.state)
            with site.watch_steps(f"fine-tuning fold {number + 1}/{len(folds)}, epoch {epoch}", epochs=1) as watch:
                result = train_local(
                    model,
                    fold.train,
                    task=site.task,
                    train=site.config.train,
                    epochs=1,
                    seed=site_seed(site.config.seed, f"{site.spec.name}/fold{number}", -server_round * 1000 - epoch),
                    device=site.device,
                    optimizer_state=fold.optimizer_state,
                    on_step=watch.step,
                )
            fold.state, fold.optimizer_state = _on_cpu(model.state_dict()), result.optimizer_state
            fold.steps.append(fold.steps[-1] + result.steps)
            seconds += result.seconds
            scores.append(_score(site, model, fold.held))
        curve.append(_weighted(scores, [len(fold.held) for fold in folds]))
        if better(curve[-1], curve[best_epoch]):
            best_epoch = epoch
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(start)
    if best_epoch:
        steps = round(sum(fold.steps[best_epoch] for fold in folds) / len(folds))
        with site.watch_steps(f"fine-tuning on every training case, {steps} steps", epochs=best_epoch) as watch:
            result = train_local(
                model,
                site.cases.personal_training_cases,
                task=site.task,
                train=site.config.train,
                epochs=best_epoch,
                steps=steps,
                seed=site_seed(site.config.seed, site.spec.name, -server_round * 1000),
                device=site.device,
                on_step=watch.step,
            )
        seconds += result.seconds
    return FoldChoice(
        curve=curve,
        best_epoch=best_epoch,
        folds=len(folds),
        cases=sum(len(fold.held) for fold in folds),
        seconds=seconds,
    )


def _on_cpu(state: StateDict) -> StateDict:
    """A copy off the accelerator: one per fold is kept between epochs."""
    return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}


def _pooled_score(site: SiteParts, model: nn.Module, folds: list[_Fold]) -> float:
    return _weighted([_score(site, model, fold.held) for fold in folds], [len(fold.held) for fold in folds])


def _score(site: SiteParts, model: nn.Module, cases: Sequence) -> float:
    return float(site.task.evaluate(model, cases, device=site.device)[site.task.primary_metric])


def _weighted(scores: list[float], counts: list[int]) -> float:
    """The folds' scores pooled by their case counts; a fold whose score is undefined (NaN) counts for nothing."""
    kept = [(score, count) for score, count in zip(scores, counts, strict=True) if not math.isnan(score)]
    if not kept:
        return math.nan
    return sum(score * count for score, count in kept) / sum(count for _, count in kept)
