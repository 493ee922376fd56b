"""Talking to the sites: send messages and collect replies, ask every site the same question, and give
strategies one consistent list of the connected sites.

Replies are collected without Flower's fixed 3 s wait between checks: Flower's deployed Grid
(HttpGrid) looks for replies every 3 s, so every exchange with the sites costs up to 3 s on top of
the work; a round under SecAgg+ makes four exchanges. Looking every 0.1 s costs one small local
request to the SuperLink per waiting site each time. Each reply is inflated by itself and handed on before the
next: inflating every reply a pull returns held every site's update at once (twenty 217 MB updates of a
54 M-parameter model). Ray's grid (Flower's in-memory one) is pulled one reply id at a time; the in-process grid
delivers each reply as it is read from its `send_and_receive`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import httpx
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid, InMemoryGrid

from fedmed.core.log import logger
from fedmed.flower.records import sender, wire_bytes
from fedmed.flower.wire import ARRAYS, HELD, MessageType

from .context import RunContext
from .deployed_replies import REPLY_POLL_INTERVAL_S, UploadWatch, arrived
from .replies import TTL_SLACK_S


class NodesAsOfNow(Grid):
    """The grid with its connected nodes read once, for a strategy to sample from.

    Flower's strategies read the node list twice while sampling, once to size the sample and once to
    draw it; a site connecting in between made the sample one short, so at fraction_train = 1 a
    connected site could be left out of a round. Messages go through the real grid, not this one.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._nodes = list(grid.get_node_ids())

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def send_and_receive(run: RunContext, messages: Iterable[Message], *, timeout: float) -> list[Message]:
    """Push `messages`, then collect their replies until all arrived or `timeout` seconds passed."""
    return list(arriving(run, messages, timeout=timeout))


def arriving(
    run: RunContext, messages: Iterable[Message], *, timeout: float, dropped: dict[str, str] | None = None
) -> Iterator[Message]:
    """Push `messages`, then yield their replies one at a time as they arrive, until all arrived or `timeout`
    seconds passed. In deployment an upload under way at the deadline is waited for while it makes progress
    (fedmed.flower.server.deployed_replies); `dropped`, when given, receives why each site that did not reply
    was left out, with the bytes of its reply that had reached the proxy.

    A message carrying the global weights also carries the values the coordinator holds for the keys
    those weights leave out (frozen parameters, site-local starting values), when the run has any: a
    site builds its network itself and cannot read model.init, a path on the coordinator's disk.
    """
    grid = run.grid
    messages = list(messages)
    if run.held is not None:
        for message in messages:
            if message.has_content() and ARRAYS in message.content:
                message.content[HELD] = run.held
    base = getattr(grid, "base", grid)  # EnrolledNodes wraps the deployed grid
    if not isinstance(base, HttpGrid | InMemoryGrid):
        yield from grid.send_and_receive(messages, timeout=timeout)
        return
    deadline = time.monotonic() + timeout
    watch = UploadWatch(run.proxy, deadline=deadline, timeout=timeout, stall_s=run.config.strategy.upload_stall_s)
    waiting = dict(zip(grid.push_messages(messages), [m.metadata.dst_node_id for m in messages], strict=True))
    del messages  # the global weights are the grid's to send now
    dropped = {} if dropped is None else dropped
    if isinstance(base, HttpGrid):
        yield from arrived(
            base, waiting, deadline=deadline, watch=watch, site_of=run.site_of, dropped=dropped, pull=_retrying
        )
    else:
        while waiting:
            for message_id in list(waiting):
                for reply in _retrying(lambda: list(grid.pull_messages([message_id]))):  # noqa: B023 (called here)
                    del waiting[message_id]
                    yield reply
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(REPLY_POLL_INTERVAL_S)
    for node in waiting.values():
        dropped[run.site_of(node)] = watch.missing(run.site_of(node))


def _retrying(pull: Callable[[], list]) -> list:
    """What `pull` returns. A SuperLink under load answers 500 now and then ("database is locked": its SQLite
    state, while sites upload 200 MB updates); nothing was delivered then, so the next poll asks again. Until the
    round's deadline: replies still missing then are the sites' that dropped, as ever."""
    try:
        return pull()
    except httpx.HTTPStatusError as error:
        if error.response.status_code < 500:
            raise
        logger.warning("the SuperLink failed to hand over replies (%s); asking again", error.response.status_code)
        time.sleep(1.0)
        return []


def round_traffic(messages: list[Message], *, upload: dict[str, int], site_of: Callable[[int], str]) -> dict:
    """What rounds.jsonl keeps of an exchange's bytes: per site, its message's content as sent and its reply's as
    received (before any decoding, `upload`), and the largest upload."""
    download = {site_of(m.metadata.dst_node_id): wire_bytes(m.content) for m in messages if m.has_content()}
    return {
        "upload_bytes": dict(sorted(upload.items())),
        "download_bytes": dict(sorted(download.items())),
        "upload_bytes_per_site": max(upload.values(), default=0),
    }


def ask_every_site(
    run: RunContext,
    content: RecordDict,
    *,
    message_type: MessageType,
    purpose: str,
    refused: dict[str, str] | None = None,
) -> dict[str, RecordDict]:
    """Send the same content to every connected site; its replies by site name. A site that fails is logged
    with `purpose` and left out: these exchanges inform the run, they do not decide a round. `refused`, when
    given, receives each failing site's reason."""
    messages = []
    for node in run.grid.get_node_ids():
        message = Message(content, dst_node_id=node, message_type=str(message_type))
        message.metadata.ttl = run.timeout + TTL_SLACK_S
        messages.append(message)
    by_site: dict[str, RecordDict] = {}
    for reply in send_and_receive(run, messages, timeout=run.timeout):
        if reply.has_error():
            logger.warning("%s: %s: %s", purpose, run.site_of(reply.metadata.src_node_id), reply.error.reason)
            if refused is not None:
                refused[run.site_of(reply.metadata.src_node_id)] = reply.error.reason
            continue
        site = sender(reply)
        run.site_names[reply.metadata.src_node_id] = site
        by_site[site] = reply.content
    return by_site
