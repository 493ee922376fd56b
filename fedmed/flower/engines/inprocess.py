"""In-process engine: the ServerApp's Grid hands each message straight to the ClientApp.

Sites run one after another in this process, so start-up is instant and there is no polling
latency; each site keeps its own Flower Context for the whole run, as a SuperNode would.
Each site gets its own copy of a message's records, and the server its own copy of each reply, so
neither side can add, drop or change the records the other holds, as over a network. The Array
objects inside are shared: their payload is immutable bytes, and nothing in fedmed reassigns them.
"""

from __future__ import annotations

import copy
import time
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmed.core.log import logger
from fedmed.flower.wire import NUM_PARTITIONS, PARTITION_ID

FIRST_NODE_ID = 1001


class InProcessGrid(Grid):
    def __init__(
        self, *, client_app: ClientApp, node_configs: list[UserConfig], run_config: UserConfig, run: Run
    ) -> None:
        self._client_app = client_app
        self._run = run
        self._contexts = {
            FIRST_NODE_ID + index: Context(
                run_id=run.run_id,
                node_id=FIRST_NODE_ID + index,
                node_config=dict(node_config),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for index, node_config in enumerate(node_configs)
        }
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no node {message.metadata.dst_node_id} in this federation")
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            message.metadata.__dict__["_run_id"] = self._run.run_id
            self._pending[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        # A generator: each site runs when its reply is read, so the server can take one reply at a time.
        return (
            self._deliver(self._pending.pop(message_id)) for message_id in message_ids if message_id in self._pending
        )

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message:
        incoming = _detached(message)
        context = self._contexts[message.metadata.dst_node_id]
        try:
            reply = self._client_app(incoming, context)
        except Exception as error:  # a crashing site must not take down the server
            logger.error("node %d raised:\n%s", context.node_id, traceback.format_exc())
            reason = f"{type(error).__name__}: {error}"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=incoming)
        reply = _detached(reply)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply


def _detached(message: Message) -> Message:
    """A copy whose records the receiver may change freely; array bytes are shared (immutable)."""
    metadata = copy.copy(message.metadata)
    if message.has_error():
        return Message(copy.deepcopy(message.error), metadata=metadata)
    content = RecordDict()
    for key, record in message.content.items():
        if isinstance(record, ArrayRecord):
            content[key] = ArrayRecord(dict(record.items()))
        else:
            content[key] = copy.deepcopy(record)
    return Message(content, metadata=metadata)


def run_inprocess(
    *, server_app: ServerApp, client_app: ClientApp, num_sites: int, run_config: UserConfig, run_id: int
) -> None:
    """Run the ServerApp to completion with `num_sites` in-process sites (partition-id 0..n-1)."""
    run = Run.create_empty(run_id=run_id)
    # Messages take their run and sender from the process's task identity, as in a real ServerApp process.
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    node_configs = [{PARTITION_ID: index, NUM_PARTITIONS: num_sites} for index in range(num_sites)]
    grid = InProcessGrid(client_app=client_app, node_configs=node_configs, run_config=run_config, run=run)
    context = Context(
        run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    started = time.perf_counter()
    server_app(grid, context)
    logger.debug("in-process federation finished in %.1f s", time.perf_counter() - started)
