"""The SecAgg+ server's dropout bookkeeping: collecting a stage's replies, recording lost nodes, failing the round.

A base class of SecAggServer rather than a separate object, so that every stage reads and writes the
one round state; the attributes annotated below are set by SecAggServer.__init__.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

import numpy as np

from fedmed.core.log import logger
from fedmed.secagg import messages as m
from fedmed.secagg.errors import SecAggProtocolError, SecAggRoundError

T = TypeVar("T")

_FAILED = "failed"


class DropoutBookkeeping:
    """Which nodes are still expected, which were lost at which stage and why; ends a round that cannot finish."""

    round_id: str
    threshold: int
    _next: str
    _expected: set[int]
    _dropped: dict[int, str]
    _reasons: dict[int, str]
    _silent_at_unmask: list[int]
    _nbrs: dict[int, frozenset[int]]
    _sum: np.ndarray | None

    def _refuse_unexpected(self, nodes: Iterable[int], *, stage: str) -> None:
        """Fail the round on a reply from a node that was not sent this stage's message."""
        unexpected = set(nodes) - self._expected
        if unexpected:
            self._next = _FAILED
            raise SecAggProtocolError(
                f"SecAgg round {self.round_id}: {stage} replies from nodes {sorted(unexpected)}, which were not "
                "sent a message at this stage; the transport must pass only this stage's replies"
            )

    def _collect(self, replies: Mapping[int, T], *, stage: str, parse: Callable[[int, T], Any]) -> dict[int, Any]:
        self._refuse_unexpected(replies, stage=stage)
        good: dict[int, Any] = {}
        for nid in sorted(self._expected):
            if nid not in replies:
                self._lose(nid, stage, "no reply")
                continue
            try:
                good[nid] = parse(nid, replies[nid])
            except SecAggProtocolError as exc:
                self._lose(nid, stage, f"malformed reply: {exc}")
        return good

    def _lose(self, nid: int, stage: str, reason: str) -> None:
        if stage == m.UNMASK:
            self._silent_at_unmask.append(nid)  # its vector is already in the sum: still aggregated
        else:
            self._dropped[nid] = stage
        self._reasons[nid] = f"{stage}: {reason}"
        logger.warning("SecAgg round %s: node %d lost at stage %s (%s)", self.round_id, nid, stage, reason)

    def _require_coverage(self, owners_pool: set[int], *, owners: set[int], stage: str, what: str) -> None:
        """Every node in `owners_pool` needs >= threshold members of `owners` in its neighbourhood."""
        if len(owners) < self.threshold:
            self._fail(
                stage,
                f"only {len(owners)} sites remain, fewer than the threshold {self.threshold}",
                fix=self._survivor_fix(),
            )
        short = {
            nid: len(self._nbrs[nid] & owners) for nid in owners_pool if len(self._nbrs[nid] & owners) < self.threshold
        }
        if short:
            detail = ", ".join(f"node {nid}: {count}" for nid, count in sorted(short.items()))
            self._fail(
                stage, f"some sites have fewer than {self.threshold} {what} ({detail})", fix=self._survivor_fix()
            )

    def _survivor_fix(self) -> str:
        return (
            f"bring the lost sites back online (check their logs and network) and rerun the round; each "
            f"site needs {self.threshold} live sites in its neighbourhood. Lowering "
            "reconstruction_threshold tolerates more dropouts but weakens protection against a server "
            "that lies about dropouts"
        )

    def _fail(self, stage: str, reason: str, *, fix: str) -> NoReturn:
        self._next = _FAILED
        self._sum = None
        lost = ", ".join(f"node {nid} ({self._reasons[nid]})" for nid in sorted(self._reasons)) or "none"
        message = (
            f"SecAgg round {self.round_id} failed at stage '{stage}': {reason}. Nodes lost: {lost}. "
            f"No aggregate is returned. Fix: {fix}"
        )
        logger.error("%s", message)
        lost_map = dict(self._dropped)
        lost_map.update(dict.fromkeys(self._silent_at_unmask, m.UNMASK))
        raise SecAggRoundError(message, stage=stage, lost=lost_map)
