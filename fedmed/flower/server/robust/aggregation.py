"""RobustAggregation: wraps the run's strategy; measures every site's update, leaves bad ones out, and hands the
strategy what the robust rule keeps.

It sits outside the strategy (and outside normalized averaging), so it sees the updates as the sites sent
them, and a server optimizer inside (FedAvgM's momentum, FedAdam's moments) steps from the robust result. The
round loop reads `last_record` into rounds.jsonl and asks `book` who is quarantined.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from fedmed.config import RobustConfig
from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.records import sender
from fedmed.flower.wire import ARRAYS, METRICS
from fedmed.site.session import NUM_EXAMPLES

from ..normalized_averaging import TRAIN_STEPS, NormalizedAveraging
from .diagnostics import Contribution, measure
from .quarantine import QuarantineBook
from .rules import RULES, Aggregation, RoundUpdates
from .updates import HeldUpdates, Updates, floating_keys, weighted_sum

# Strategies whose aggregation starts from the weighted mean of the replies (unless a subclass aggregates its own way).
MEAN_FIRST = {strategy.aggregate_train for strategy in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)}


class RobustAggregationError(FedmedError):
    """No update is left to aggregate after the robust rule and the quarantine."""


class RobustAggregation(Strategy):
    """Wraps `strategy`. With `acts` false (client-level DP) it measures and flags but leaves nobody out: the
    noise is calibrated for the sites Flower sampled, and a site left out on what its update looks like would
    change that sensitivity."""

    def __init__(self, strategy: Strategy, *, settings: RobustConfig, acts: bool = True) -> None:
        super().__init__()
        self.strategy = strategy
        self.settings = settings
        self.acts = acts
        self.rule = RULES.get(settings.rule)
        self.weighted_by_key: str = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
        self.book = QuarantineBook(
            quarantine_after=settings.quarantine_after if acts else 0, window=settings.quarantine_window
        )
        self._sent: dict[str, np.ndarray] = {}
        self.last_record: dict[str, Any] = {}
        self.pending_events: list[dict[str, Any]] = []  # re-admissions on resume, recorded in the next round's row
        self.spilled: Updates | None = None  # the round's updates, when the round loop wrote them as they arrived

    def summary(self) -> None:
        logger.info("robust aggregation (%s) around:", self.settings.rule)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {key: array.numpy() for key, array in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    @property
    def sent(self) -> dict[str, np.ndarray]:
        """The round's global arrays as configure_train sent them: the updates are measured from them."""
        return self._sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the round's updates: those in `spilled` when the round loop wrote them there as they arrived
        (the replies then carry none), else those the replies carry."""
        replies = [reply for reply in replies if reply.has_content()]
        updates = self.spilled or self._held(replies)
        by_site = {sender(reply): reply for reply in replies if sender(reply) in updates.norms}
        if not by_site:
            return self.strategy.aggregate_train(server_round, replies)
        started = time.perf_counter()
        claimed = {site: self._claimed(reply) for site, reply in by_site.items()}
        contributions = measure(updates, settings=self.settings, vouched=self.book.vouched)
        weights = capped_weights(claimed, max_ratio=self.settings.max_case_ratio)
        if self.acts and self.settings.down_weight_unusual:
            weights = {site: weight * contributions[site].trust for site, weight in weights.items()}
        events = [*self.pending_events, *self.book.note_round(contributions, server_round=server_round)]
        self.pending_events = []
        left_out = self._left_out(contributions)
        kept = [site for site in sorted(by_site) if site not in left_out]
        if not kept:
            reasons = ", ".join(f"{site}: {reason}" for site, reason in left_out.items())
            raise RobustAggregationError(
                f"round {server_round}: every update was left out ({reasons}); "
                "re-admit a quarantined site (fedmed run --resume RUN --readmit SITE) or check the sites' data"
            )
        aggregation = self.rule(
            RoundUpdates(sites=kept, updates=updates, weights=[weights[site] for site in kept], settings=self.settings)
        )
        if aggregation.scales is not None:
            left_out |= {site: "not selected" for site in kept if site not in aggregation.scales}
        self.last_record = {
            "robust_rule": self.settings.rule,
            "contribution_view": "plaintext",
            "contributions": _contributions(
                contributions, replies=by_site, claimed=claimed, weights=weights, left_out=left_out, rule=aggregation
            ),
            "sites_quarantined": sorted(self.book.quarantined),
            "quarantine_events": events,
            **aggregation.record,
            "robust_s": round(time.perf_counter() - started, 4),  # the robust layer's own cost this round
        }
        for site, reason in sorted(left_out.items()):
            logger.warning("round %d: site %s left out of the aggregate (%s)", server_round, site, reason)
        try:
            return self._hand_on(server_round, aggregation, by_site=by_site, updates=updates, weights=weights)
        finally:
            self._sent = {}  # the round's copy of the global model: not needed until the next round's is taken

    def _hand_on(
        self,
        server_round: int,
        aggregation: Aggregation,
        *,
        by_site: dict[str, Message],
        updates: Updates,
        weights: dict[str, float],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the run's strategy what the rule kept.

        A rule's one aggregate (median, trimmed mean) goes as one reply of weight 1 and one step. Kept updates go to a
        strategy that starts from their weighted mean (Flower's FedAvg family) as that mean, taken here a slice at a
        time with normalized averaging's factors in it, as one reply: a server optimizer (FedAvgM's momentum, FedAdam)
        steps from it, and no more than one update is ever held. Any other strategy reads every reply: it gets the
        kept ones rescaled, with their capped weights, every update in memory at once."""
        one = {self.weighted_by_key: 1.0, TRAIN_STEPS: 1.0}
        if aggregation.scales is None:
            site = sorted(by_site)[0]
            return self.strategy.aggregate_train(
                server_round, [self._merged(by_site[site], update=aggregation.update, updates=updates, metrics=one)]
            )
        if type(self._averaging()).aggregate_train in MEAN_FIRST:
            mean = weighted_sum(updates, self._factors(aggregation.scales, by_site=by_site, weights=weights))
            site = sorted(aggregation.scales)[0]
            merged = self._merged(by_site[site], update=mean, updates=updates, metrics=one)
            # Two model-sized arrays the strategy's own copies need not sit beside.
            del mean
            self._sent = {}
            return self._averaging().aggregate_train(server_round, [merged])
        rescaled = [
            self._merged(
                by_site[site],
                update=scale * updates.row(site),
                updates=updates,
                metrics={self.weighted_by_key: weights[site]},
            )
            for site, scale in sorted(aggregation.scales.items())
        ]
        return self.strategy.aggregate_train(server_round, rescaled)

    def _merged(self, reply: Message, *, update: np.ndarray, updates: Updates, metrics: dict[str, float]) -> Message:
        """A copy of `reply` carrying global + `update` (flat, over the floating-point arrays in the sent order) and
        `metrics` over its own; counters (BatchNorm's num_batches_tracked) are not a direction: its site's."""
        counters = updates.counters[sender(reply)]
        arrays, offset = {}, 0
        for key, start in self._sent.items():
            if key in counters:
                arrays[key] = counters[key]
                continue
            values = update[offset : offset + start.size].reshape(start.shape)
            arrays[key] = Array(np.asarray(start.astype(np.float64) + values, dtype=start.dtype))
            offset += start.size
        content = RecordDict(
            {**reply.content, ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord({**reply.content[METRICS], **metrics})}
        )
        return Message(content, metadata=copy.copy(reply.metadata))

    def _factors(
        self, scales: dict[str, float], *, by_site: dict[str, Message], weights: dict[str, float]
    ) -> dict[str, float]:
        """Each kept update's factor in the round's average: its share of the kept weight times the rule's scale,
        and with normalized averaging its step factor."""
        kept = {site: weights[site] for site in scales}
        total = sum(kept.values())
        if total <= 0:
            raise RobustAggregationError(f"the kept sites' weights sum to {total}; the round has nothing to average")
        steps = dict.fromkeys(kept, 1.0)
        if isinstance(self.strategy, NormalizedAveraging):
            steps = self.strategy.step_factors(
                kept, steps={site: self.strategy.steps_of(by_site[site]) for site in kept}
            )
        return {site: weight / total * scales[site] * steps[site] for site, weight in kept.items()}

    def _averaging(self) -> Strategy:
        return self.strategy.strategy if isinstance(self.strategy, NormalizedAveraging) else self.strategy

    def _left_out(self, contributions: dict[str, Contribution]) -> dict[str, str]:
        if not self.acts:
            return {}
        out = {site: "quarantined" for site in contributions if self.book.holds(site)}
        if self.settings.leave_out_flagged:
            out |= {site: "flagged" for site, c in contributions.items() if c.flagged and site not in out}
        return out

    def _held(self, replies: list[Message]) -> HeldUpdates:
        """The updates (local - global) the replies carry, flattened over the floating-point arrays."""
        keys = floating_keys(self._sent)
        updates, counters = {}, {}
        for reply in replies:
            if ARRAYS not in reply.content:
                continue
            received = reply.content[ARRAYS]
            parts = [received[key].numpy().astype(np.float64).ravel() - self._sent[key].ravel() for key in keys]
            updates[sender(reply)] = np.concatenate(parts) if parts else np.zeros(0)
            counters[sender(reply)] = {key: received[key] for key in self._sent if key not in keys}
        return HeldUpdates(updates, counters=counters)

    def _claimed(self, reply: Message) -> float:
        return float(reply.content[METRICS][self.weighted_by_key])


def capped_weights(claimed: dict[str, float], *, max_ratio: float) -> dict[str, float]:
    """Each site's weight: its claimed training cases, capped at max_ratio × the median claim."""
    cap = max_ratio * float(np.median(list(claimed.values())))
    return {site: min(value, cap) for site, value in claimed.items()}


def _contributions(
    measured: dict[str, Contribution],
    *,
    replies: dict[str, Message],
    claimed: dict[str, float],
    weights: dict[str, float],
    left_out: dict[str, str],
    rule: Aggregation,
) -> dict[str, dict[str, Any]]:
    rows = {}
    for site, contribution in sorted(measured.items()):
        loss = replies[site].content[METRICS].get("train_loss")
        scale = (rule.scales or {}).get(site)
        rows[site] = {
            "update_norm": _finite(contribution.update_norm),
            "norm_ratio": _finite(contribution.norm_ratio),
            "cosine": round(contribution.cosine, 4),
            "cosine_gap": round(contribution.cosine_gap, 4),
            "score": _finite(contribution.score),
            "flagged": contribution.flagged,
            "unusual": contribution.unusual,
            "trust": round(contribution.trust, 4),
            "train_loss": float(loss) if isinstance(loss, int | float) else None,
            "claimed_cases": int(claimed[site]),
            # The weight of a kept update (None: the rule aggregates unweighted) and the factor its update was
            # scaled by (norm_bound).
            "weight": 0.0 if site in left_out else (round(weights[site], 4) if rule.scales is not None else None),
            "scale": round(scale, 6) if scale is not None and site not in left_out else None,
            "left_out": left_out.get(site),
        }
    return rows


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None
