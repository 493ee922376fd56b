"""Normalized averaging (FedNova, Wang et al. 2020) as a wrapper around any averaging strategy.

Plain weighted averaging lets a site that takes more local steps pull the model further: its update
is its number of steps times its average direction. FedNova averages the directions instead,

    new = global + tau_eff * sum_i p_i (x_i - global) / tau_i,   p_i = n_i / sum n,  tau_eff = sum_i p_i tau_i,

which is the weighted average of the rewritten models global + (tau_eff / tau_i)(x_i - global). The
wrapper rewrites each reply that way and hands the replies to the inner strategy, so a server
optimizer inside (FedAvgM's momentum, FedAdam's moments) steps from the normalized average.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Iterable
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.wire import ARRAYS, METRICS, SITE, SITE_NAME
from fedmed.site.session import NUM_EXAMPLES

# The site's metric: its optimizer steps this round (fedmed.site.session).
TRAIN_STEPS = "train_steps"
K = TypeVar("K", bound=Hashable)


class NormalizedAveragingError(FedmedError):
    """A reply cannot be normalized: its step count or weight is missing or invalid."""


class NormalizedAveraging(Strategy):
    """Wraps `strategy`: its training replies are normalized by their step counts before it aggregates."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy
        self.weighted_by_key: str = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
        # The global arrays each round was sent, by round: the sites' updates are measured from them.
        self._sent: dict[int, ArrayRecord] = {}
        self.effective_steps: float | None = None  # the last round's tau_eff, for the log

    def summary(self) -> None:
        logger.info("normalized averaging (FedNova) around:")
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Only the current round's starting point is ever needed; kept as the record, unpacked only when used.
        self._sent = {server_round: arrays}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.pop(server_round, None)
        if sent is None:
            raise NormalizedAveragingError(
                f"round {server_round}: normalized averaging has no global arrays for this round; configure_train "
                "must run before aggregate_train"
            )
        trained = [reply for reply in replies if reply.has_content() and ARRAYS in reply.content]
        if not trained:
            return self.strategy.aggregate_train(server_round, replies)
        sent = {key: array.numpy() for key, array in sent.items()}
        weights = {index: self._number(reply, self.weighted_by_key) for index, reply in enumerate(trained)}
        steps = {index: self.steps_of(reply) for index, reply in enumerate(trained)}
        factors = self.step_factors(weights, steps=steps, server_round=server_round)
        rewritten = {
            id(reply): _rescaled(reply, sent=sent, scale=factors[index]) for index, reply in enumerate(trained)
        }
        return self.strategy.aggregate_train(server_round, [rewritten.get(id(reply), reply) for reply in replies])

    def steps_of(self, reply: Message) -> float:
        """The optimizer steps the site took this round."""
        return self._number(reply, TRAIN_STEPS)

    def step_factors(
        self, weights: dict[K, float], *, steps: dict[K, float], server_round: int | None = None
    ) -> dict[K, float]:
        """Each update's factor tau_eff / tau_i, from the sites' weights and step counts; 0 for a site that took no
        step (it leaves the global arrays)."""
        total = sum(weights.values())
        if total <= 0:
            raise NormalizedAveragingError(
                f"the sites' {self.weighted_by_key} sum to {total}; normalized averaging needs a positive total weight"
            )
        tau_eff = sum(weight * steps[key] for key, weight in weights.items()) / total
        self.effective_steps = tau_eff
        logger.info("round %s: normalized averaging, effective local steps %.4g", server_round or "-", tau_eff)
        return {key: tau_eff / step if step > 0 else 0.0 for key, step in steps.items()}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    @staticmethod
    def _number(reply: Message, key: str) -> float:
        metrics = reply.content.get(METRICS)
        value = metrics.get(key) if isinstance(metrics, MetricRecord) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise NormalizedAveragingError(
                f"{_site(reply)}: its train reply has {key} = {value!r}; normalized averaging needs a finite "
                "count >= 0 from every site: update the site's fedmed, or set strategy.normalized_averaging = false"
            )
        return float(value)


def _rescaled(reply: Message, *, sent: dict[str, np.ndarray], scale: float) -> Message:
    """A copy of `reply` whose arrays are global + scale * (x - global); the reply itself stays as received
    (the round loop still reads it). Scale 0 (a site that took no step) leaves the global arrays."""
    received = reply.content[ARRAYS]
    if set(received.keys()) != set(sent):
        raise NormalizedAveragingError(
            f"{_site(reply)}: its update holds other arrays than the round sent "
            f"({sorted(set(received.keys()) ^ set(sent))}); the site runs a different model layout"
        )
    arrays = {}
    for key, array in received.items():
        local = array.numpy()
        if not np.issubdtype(local.dtype, np.floating):
            # Counters (BatchNorm's num_batches_tracked) are not a direction; averaged as received.
            arrays[key] = array
            continue
        start = sent[key].astype(np.float64)
        arrays[key] = Array(np.asarray(start + scale * (local.astype(np.float64) - start), dtype=local.dtype))
    content = RecordDict({**reply.content, ARRAYS: ArrayRecord(arrays)})
    return Message(content, metadata=copy.copy(reply.metadata))


def _site(reply: Message) -> str:
    """Who sent `reply`, for an error message: the site by name, else the node by id."""
    site = reply.content.get(SITE)
    if isinstance(site, ConfigRecord) and SITE_NAME in site:
        return f"site {site[SITE_NAME]}"
    return f"node {reply.metadata.src_node_id}"
