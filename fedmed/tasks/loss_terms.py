"""Terms a training run adds to the task's loss: FedProx's pull towards the weights as received and Ditto's
pull of a site's personal model towards the global one (Li et al. 2020, 2021).

A term adds itself to each step's loss. DP-SGD replaces every gradient by the clipped, noised per-sample
sum, which would drop a term's gradient: under DP-SGD a term takes a step of its own instead (`step`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import torch
from torch import nn


class LossTerm(Protocol):
    def add(self, loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """`loss` with this term added."""

    def step(self, model: nn.Module, *, learning_rate: float) -> None:
        """Under DP-SGD: this term's own step after each logical step, on public values only."""

    def to(self, device: torch.device) -> LossTerm:
        """The term with its tensors on the training device."""


class ProximalPull:
    """mu/2 * sum ||w - anchor||^2 over the anchored weights; nothing at mu = 0 or without anchors."""

    def __init__(self, anchors: dict[str, torch.Tensor], *, mu: float) -> None:
        self.anchors = anchors
        self.mu = mu

    @classmethod
    def toward_start(cls, model: nn.Module, *, keys: Collection[str], mu: float) -> ProximalPull:
        """FedProx: towards the values the weights named in `keys` (the shared ones, as received) start from."""
        return cls(snapshot_anchors(model, keys) if mu > 0 else {}, mu=mu)

    @property
    def active(self) -> bool:
        return self.mu > 0 and bool(self.anchors)

    def to(self, device: torch.device) -> ProximalPull:
        return ProximalPull({name: value.to(device) for name, value in self.anchors.items()}, mu=self.mu)

    def add(self, loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
        if not self.active:
            return loss
        return loss + proximal_term(model, self.anchors, mu=self.mu)

    def step(self, model: nn.Module, *, learning_rate: float) -> None:
        if self.active:
            proximal_step(model, self.anchors, step=learning_rate * self.mu)


def proximal_term(model: nn.Module, anchors: dict[str, torch.Tensor], *, mu: float) -> torch.Tensor:
    """mu/2 * sum ||w - w_anchor||^2 (FedProx, Li et al. 2020)."""
    parameters = dict(model.named_parameters())
    squared = sum((parameters[name] - anchor).pow(2).sum() for name, anchor in anchors.items())
    return 0.5 * mu * squared


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


def snapshot_anchors(model: nn.Module, keys: Collection[str]) -> dict[str, torch.Tensor]:
    wanted = set(keys)
    return {name: p.detach().clone() for name, p in model.named_parameters() if name in wanted and p.requires_grad}
