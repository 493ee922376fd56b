"""One SecAgg+ stage's messages and replies, and the bytes each site sent and was sent over the round's stages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedmed.core.log import logger
from fedmed.flower.records import sender, wire_bytes
from fedmed.flower.wire import SECAGG, SECAGG_MASK, SECAGG_SETUP, SECAGG_SHARE_KEYS, SECAGG_UNMASK, SITE
from fedmed.secagg.messages import MASKED_INPUT, SETUP, SHARE_KEYS, UNMASK

from .context import RunContext
from .exchange import arriving
from .replies import TTL_SLACK_S

STAGE_MESSAGE_TYPES = {
    SETUP: SECAGG_SETUP,
    SHARE_KEYS: SECAGG_SHARE_KEYS,
    MASKED_INPUT: SECAGG_MASK,
    UNMASK: SECAGG_UNMASK,
}


class StageExchange:
    """One protocol stage: a message to each node, the replies of those that answered in time."""

    def __init__(self, run: RunContext, *, server_round: int, site_errors: dict[str, str]) -> None:
        self.run = run
        self.site_errors = site_errors  # site -> the reason it gave for failing a stage
        self.server_round = server_round
        self.uploaded: dict[int, int] = {}  # by node, over the round's stages
        self.downloaded: dict[int, int] = {}

    def send(
        self,
        stage: str,
        outgoing: Mapping[int, Any],
        *,
        timeout: float | None = None,
        wrap: bool = True,
        each: Callable[[int, Message], None] | None = None,
    ) -> dict[int, Message]:
        """The replies of the nodes that answered, by node; `each`, when given, is called on each as it arrives."""
        timeout = timeout or self.run.config.secagg.stage_timeout_s
        messages = []
        for node, body in outgoing.items():
            content = RecordDict({SECAGG: ConfigRecord(body)}) if wrap else body
            message = Message(content, dst_node_id=node, message_type=str(STAGE_MESSAGE_TYPES[stage]))
            message.metadata.ttl = timeout + TTL_SLACK_S
            messages.append(message)
        answered: dict[int, Message] = {}
        replied = set()
        site_of = self.run.site_of
        for reply in arriving(self.run, messages, timeout=timeout):
            node = reply.metadata.src_node_id
            replied.add(node)
            if reply.has_error():
                logger.warning(
                    "round %d: %s lost at SecAgg %s: %s",
                    self.server_round,
                    site_of(node),
                    stage,
                    reply.error.reason,
                )
                self.site_errors[site_of(node)] = reply.error.reason
                continue
            answered[node] = reply
            if SITE in reply.content:
                self.run.site_names[node] = sender(reply)
            self.uploaded[node] = self.uploaded.get(node, 0) + wire_bytes(reply.content)
            if each is not None:
                each(node, reply)
        for message in messages:  # as sent: arriving adds the held values to a message with weights
            node = message.metadata.dst_node_id
            self.downloaded[node] = self.downloaded.get(node, 0) + wire_bytes(message.content)
        for node in sorted(set(outgoing) - replied):
            logger.warning(
                "round %d: %s did not answer SecAgg %s within %.0f s",
                self.server_round,
                site_of(node),
                stage,
                timeout,
            )
        return answered

    def traffic(self) -> dict[str, Any]:
        """rounds.jsonl's byte counts (as fedmed.flower.server.exchange.round_traffic), summed over the stages."""
        site_of = self.run.site_of
        return {
            "upload_bytes": dict(sorted((site_of(node), count) for node, count in self.uploaded.items())),
            "download_bytes": dict(sorted((site_of(node), count) for node, count in self.downloaded.items())),
            "upload_bytes_per_site": max(self.uploaded.values(), default=0),
        }
