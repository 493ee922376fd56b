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
from flwr.serverapp.strategy import Strategy

from fedmed.config import RobustConfig
from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.records import sender
from fedmed.flower.wire import ARRAYS, METRICS
from fedmed.site.session import NUM_EXAMPLES

from ..normalized_averaging import TRAIN_STEPS
from .diagnostics import Contribution, measure
from .quarantine import QuarantineBook
from .rules import RULES, Aggregation, RoundUpdates


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

    def summary(self) -> None:
        logger.info("robust aggregation (%s) around:", self.settings.rule)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {key: array.numpy() for key, array in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if reply.has_content() and ARRAYS in reply.content]
        if not replies:
            return self.strategy.aggregate_train(server_round, replies)
        started = time.perf_counter()
        by_site = {sender(reply): reply for reply in replies}
        updates = {site: self._update(reply) for site, reply in by_site.items()}
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
            RoundUpdates(
                sites=kept,
                updates=[updates[site] for site in kept],
                weights=[weights[site] for site in kept],
                settings=self.settings,
            )
        )
        if aggregation.scales is not None:
            left_out |= {site: "not selected" for site in kept if site not in aggregation.scales}
        handed = self._handed(aggregation, by_site=by_site, weights=weights)
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
        return self.strategy.aggregate_train(server_round, handed)

    def _left_out(self, contributions: dict[str, Contribution]) -> dict[str, str]:
        if not self.acts:
            return {}
        out = {site: "quarantined" for site in contributions if self.book.holds(site)}
        if self.settings.leave_out_flagged:
            out |= {site: "flagged" for site, c in contributions.items() if c.flagged and site not in out}
        return out

    def _update(self, reply: Message) -> np.ndarray:
        """The reply's update (local - global) over the floating-point arrays, flattened in the sent order."""
        received = reply.content[ARRAYS]
        parts = [
            received[key].numpy().astype(np.float64).ravel() - start.astype(np.float64).ravel()
            for key, start in self._sent.items()
            if np.issubdtype(start.dtype, np.floating)
        ]
        return np.concatenate(parts) if parts else np.zeros(0)

    def _claimed(self, reply: Message) -> float:
        return float(reply.content[METRICS][self.weighted_by_key])

    def _handed(
        self, aggregation: Aggregation, *, by_site: dict[str, Message], weights: dict[str, float]
    ) -> list[Message]:
        """The replies the inner strategy aggregates: the kept ones rescaled with their capped weights, or one
        reply carrying the rule's aggregate (weight 1, one step: normalized averaging leaves it as it is)."""
        if aggregation.scales is not None:
            return [
                _rewritten(by_site[site], sent=self._sent, scale=scale, metrics={self.weighted_by_key: weights[site]})
                for site, scale in sorted(aggregation.scales.items())
            ]
        first = by_site[sorted(by_site)[0]]
        return [
            _rewritten(
                first,
                sent=self._sent,
                update=aggregation.update,
                metrics={self.weighted_by_key: 1.0, TRAIN_STEPS: 1.0},
            )
        ]


def capped_weights(claimed: dict[str, float], *, max_ratio: float) -> dict[str, float]:
    """Each site's weight: its claimed training cases, capped at max_ratio × the median claim."""
    cap = max_ratio * float(np.median(list(claimed.values())))
    return {site: min(value, cap) for site, value in claimed.items()}


def _rewritten(
    reply: Message,
    *,
    sent: dict[str, np.ndarray],
    metrics: dict[str, float],
    scale: float = 1.0,
    update: np.ndarray | None = None,
) -> Message:
    """A copy of `reply` whose arrays are global + scale × its update, or global + `update` (flat, float arrays
    in the sent order); the reply itself stays as received."""
    received = reply.content[ARRAYS]
    arrays, offset = {}, 0
    for key, start in sent.items():
        local = received[key].numpy()
        if not np.issubdtype(start.dtype, np.floating):
            arrays[key] = received[key]  # counters are not a direction
            continue
        if update is None and scale == 1.0:
            arrays[key] = received[key]  # as sent: bit for bit what the strategy alone would average
            offset += start.size
            continue
        base = start.astype(np.float64)
        if update is None:
            value = base + scale * (local.astype(np.float64) - base)
        else:
            value = base + update[offset : offset + start.size].reshape(start.shape)
        offset += start.size
        arrays[key] = Array(np.asarray(value, dtype=local.dtype))
    content = RecordDict(
        {**reply.content, ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord({**reply.content[METRICS], **metrics})}
    )
    return Message(content, metadata=copy.copy(reply.metadata))


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
