"""What the coordinator's round loop asks of the robust layer: who is not asked to train, what a secure round can
show, the quarantine across a resume, and the coordinator's re-admissions."""

from __future__ import annotations

from typing import Any

from flwr.app import Message
from flwr.serverapp.strategy import Strategy

from fedmed.runs.run_dir import READMIT_FILE, RunDirectory

from .aggregation import RobustAggregation

ROBUST_STATE = "robust_state"  # the checkpoint's entry: the quarantine book


def robust_layer(strategy: Strategy) -> RobustAggregation | None:
    """The RobustAggregation in the strategy's chain of wrappers (none under secure aggregation)."""
    layer: object = strategy
    while isinstance(layer, Strategy):
        if isinstance(layer, RobustAggregation):
            return layer
        layer = getattr(layer, "strategy", None)
    return None


def without_quarantined(
    messages: list[Message], *, robust: RobustAggregation | None, site_of: Any
) -> tuple[list[Message], list[str]]:
    """The training messages minus those to quarantined sites (they spend no compute and no privacy budget on a
    round that would not use them), and the sites left out."""
    if robust is None or not robust.book.quarantined:
        return messages, []
    kept = [message for message in messages if not robust.book.holds(site_of(message.metadata.dst_node_id))]
    return kept, sorted(robust.book.quarantined)


def secure_contributions(trained: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Under SecAgg+ the coordinator holds only the masked sum: per site, only what each site reported itself."""
    return {
        "contribution_view": "secure-aggregation",
        "contributions": {site: {"train_loss": metrics.get("train_loss")} for site, metrics in sorted(trained.items())},
    }


def save_state(robust: RobustAggregation | None) -> dict[str, Any]:
    return {ROBUST_STATE: robust.book.state()} if robust is not None else {}


def resume_state(robust: RobustAggregation | None, checkpoint: dict[str, Any], *, run_dir: RunDirectory) -> None:
    """The checkpoint's quarantine book, then the re-admissions the coordinator asked for on this resume (kept as
    events of the first resumed round's row)."""
    if robust is None:
        return
    robust.book.restore(checkpoint.get(ROBUST_STATE, {}))
    sites = run_dir.read_json(READMIT_FILE) or []
    robust.pending_events = robust.book.readmit(list(sites), server_round=int(checkpoint["round"]) + 1)


def readmissions_recorded(run_dir: RunDirectory) -> None:
    """Once a round's row holds the re-admission events, the request is done."""
    (run_dir.path / READMIT_FILE).unlink(missing_ok=True)
