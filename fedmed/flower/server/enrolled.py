"""Only enrolled sites take part: the deployed grid, restricted to the nodes the coordinator enrolled.

The SuperLink's Control API on loopback has no authentication in open-source Flower 1.41, so a local
user of the coordinator host can register a key of their own and connect a node with it. Flower's
grid lists every connected node, that one too. In deployment the ServerApp therefore samples only the
node ids of the coordinator's enrolment list (`site-nodes.json` in the server's state folder, written by
`fedmed server start` and `add-site`, trimmed by `remove-site`), read again at every look so a site
added or removed during a run counts from then on. The run config's own node list is not trusted for
this: whoever submits a run writes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedmed.core.log import logger


def read_enrolled(path: Path) -> dict[int, str]:
    """node id -> site of the enrolment list; empty when there is none (no site is then sampled)."""
    try:
        return {int(node): site for site, node in json.loads(Path(path).read_text()).items()}
    except FileNotFoundError:
        return {}


class EnrolledNodes(Grid):
    """A grid whose node list holds only enrolled nodes; messages go through the grid it wraps (`base`)."""

    def __init__(self, grid: Grid, *, enrolment: Path) -> None:
        self.base = grid
        self._enrolment = Path(enrolment)
        self._warned: set[int] = set()

    def enrolled(self) -> dict[int, str]:
        return read_enrolled(self._enrolment)

    def get_node_ids(self) -> list[int]:
        enrolled = self.enrolled()
        connected = list(self.base.get_node_ids())
        for node in set(connected) - set(enrolled) - self._warned:
            logger.warning(
                "node %d is connected to the SuperLink but not enrolled (not in %s): it is never sampled; "
                "'fedmed status' lists it",
                node,
                self._enrolment,
            )
            self._warned.add(node)
        return [node for node in connected if node in enrolled]

    def set_run(self, run: Run) -> None:
        self.base.set_run(run)

    @property
    def run(self) -> Run:
        return self.base.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.base.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.base.push_messages(self._to_enrolled(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.base.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.base.send_and_receive(self._to_enrolled(messages), timeout=timeout)

    def _to_enrolled(self, messages: Iterable[Message]) -> list[Message]:
        enrolled = self.enrolled()
        messages = list(messages)
        for message in messages:
            if message.metadata.dst_node_id not in enrolled:
                raise ValueError(f"refusing to send a message to node {message.metadata.dst_node_id}: not enrolled")
        return messages
