"""What a round keeps of the sites' replies: the usable ones in a fixed order, who failed and why, and the
metric rows the run directory records."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message

from fedmed.flower.records import sender
from fedmed.flower.wire import ARRAYS, COMPRESSED, MASKED, METRICS
from fedmed.runs import RunDirectory

from .context import RunContext


def by_site(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Rows of metrics.jsonl as {site: its metrics}."""
    return {row["site"]: {k: v for k, v in row.items() if k not in ("round", "site", "phase", "time")} for row in rows}


# A reply expires with the message it answers. A few seconds past the coordinator's deadline, so that a reply
# registered just before the deadline is still there when the coordinator takes it.
TTL_SLACK_S = 10.0


def with_deadline(messages: Iterable[Message], timeout: float) -> list[Message]:
    """Messages expire with the round: a site that comes back late must not train on a stale round."""
    messages = list(messages)
    for message in messages:
        message.metadata.ttl = timeout + TTL_SLACK_S
    return messages


def usable_replies(replies: Iterable[Message], *, phase: str, site_names: dict[int, str]) -> list[Message]:
    usable = []
    for reply in replies:
        if reply.has_error():
            continue
        site_names[reply.metadata.src_node_id] = sender(reply)
        if phase == "train" and not {ARRAYS, COMPRESSED, MASKED} & set(reply.content.keys()):
            continue
        usable.append(reply)
    # Replies arrive in completion order; aggregating in a fixed order makes the float sums, and so
    # the run, identical across engines and repeat runs.
    return sorted(usable, key=sender)


@dataclass
class Outcome:
    """Which sites failed an exchange: refused (replied with an error: the reason they gave) or dropped
    (no reply before the timeout)."""

    refused: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    why_dropped: dict[str, str] = field(default_factory=dict)  # deployment: with the bytes that reached the proxy

    def describe(self) -> list[str]:
        return [
            reason if reason.startswith(f"site {site}:") else f"{site}: {reason}"
            for site, reason in self.refused.items()
        ] + [f"{site}: {self.why_dropped.get(site, 'no reply before the round timeout')}" for site in self.dropped]


def outcome_of(
    messages: list[Message], replies: list[Message], *, run: RunContext, why_dropped: dict[str, str] | None = None
) -> Outcome:
    answered = {reply.metadata.src_node_id for reply in replies}
    destinations = {message.metadata.dst_node_id for message in messages}
    outcome = Outcome()
    for reply in replies:
        # The SuperLink answers for a node that stopped sending heartbeats ("Node Unavailable"); such a
        # site did not refuse anything: it is among the dropped, as it never replied itself.
        if reply.has_error() and reply.metadata.src_node_id in destinations:
            outcome.refused[run.site_of(reply.metadata.src_node_id)] = reply.error.reason
    outcome.refused = dict(sorted(outcome.refused.items()))
    outcome.dropped = sorted(
        run.site_of(message.metadata.dst_node_id)
        for message in messages
        if message.metadata.dst_node_id not in answered
    )
    outcome.why_dropped = {site: why for site, why in sorted((why_dropped or {}).items()) if site in outcome.dropped}
    return outcome


def record_metrics(run_dir: RunDirectory, replies: list[Message], *, phase: str, server_round: int) -> list[dict]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    for reply in replies:
        metrics = dict(reply.content[METRICS])
        rows.append({"round": server_round, "site": sender(reply), "phase": phase, "time": now, **metrics})
    rows.sort(key=lambda row: row["site"])
    run_dir.append_metrics(rows)
    return rows
