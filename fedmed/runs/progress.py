"""Progress lines while a federation runs: round i/N, per-site metrics, ETA."""

from __future__ import annotations

import math
import time

from fedmed.core.log import logger


class RoundProgress:
    def __init__(self, *, total_rounds: int, first_round: int = 1, metric: str) -> None:
        self.total_rounds = total_rounds
        self.first_round = first_round
        self.metric = metric
        self.started = time.perf_counter()

    def report(
        self, server_round: int, *, train: dict[str, dict[str, float]], evaluation: dict[str, dict[str, float]]
    ) -> None:
        """Log one line: the global model's metric per site, or the local training loss if not evaluated."""
        done = server_round - self.first_round + 1
        per_round = (time.perf_counter() - self.started) / done
        eta = per_round * (self.total_rounds - server_round)
        if evaluation:
            sites = "  ".join(
                f"{site} {self.metric} {_fmt(m.get(self.metric))}" for site, m in sorted(evaluation.items())
            )
        else:
            sites = "  ".join(f"{site} loss {_fmt(m.get('train_loss'))}" for site, m in sorted(train.items()))
        logger.info(
            "round %d/%d  %s  (%.1f s/round, ETA %s)", server_round, self.total_rounds, sites, per_round, _duration(eta)
        )


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
