"""Replies from the deployed grid in two steps: first every reply the SuperLink has registered, then each one's
arrays. A site pushes its reply's message first and then its objects, one request each, so on a slow link a
reply is registered long before its update has arrived.

Flower's HttpGrid.pull_messages does both steps per call and waits, for each reply it returns, until the last
object is there. Two things followed, and this module changes both:

- A reply registered before the round deadline but asked for after it (the coordinator was still waiting on
  another site's upload) came back from the SuperLink expired, and its site was dropped with its update already
  sent. Here every registered reply is taken at each look, so an upload that began before the deadline is kept.
- An upload that stopped (the site's link or process died) held the round for up to Flower's two hours of
  retries. Here, once the deadline has passed, it is given up when the proxy has seen no byte of it for
  `strategy.upload_stall_s`; the reason names the site and the bytes that were left.

It uses the HttpGrid's runtime client, as HttpGrid.pull_messages itself does (flwr 1.42).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from flwr.app import Message
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid import HttpGrid

from fedmed.core.log import logger
from fedmed.runs.proxy_traffic import ProxyLog, SiteTraffic
from fedmed.runs.traffic import format_bytes

REPLY_POLL_INTERVAL_S = 0.1
CONFIRM_TRIES = 10


@dataclass
class Registered:
    """A reply the SuperLink holds: its message, and the tree of objects its content is made of."""

    proto: Any  # flwr.proto.message_pb2.Message
    tree: Any  # flwr.proto.message_pb2.ObjectTree

    @property
    def answers(self) -> str:
        return self.proto.metadata.reply_to_message_id

    @property
    def node(self) -> int:
        return self.proto.metadata.src_node_id


def registered(grid: HttpGrid, message_ids: list[str]) -> list[Registered]:
    """The replies to `message_ids` the SuperLink has registered, whether or not their objects have all arrived.
    The SuperLink hands each reply over once."""
    response = grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
    return [
        Registered(proto, tree)
        for proto, tree in zip(response.messages_list, response.message_object_trees, strict=True)
    ]


def arrived(
    grid: HttpGrid,
    waiting: dict[str, int],
    *,
    deadline: float,
    watch: UploadWatch,
    site_of: Callable[[int], str],
    dropped: dict[str, str],
    pull: Callable[[Callable[[], list]], list],
) -> Iterator[Message]:
    """The replies to `waiting` (message id -> node), whole, one at a time. A thread looks for registered replies
    every REPLY_POLL_INTERVAL_S until the deadline, so that one registered while the coordinator waits on another
    site's upload is taken before it expires. `pull` retries a look the SuperLink failed; `waiting` keeps the
    message ids no reply registered for; `dropped` receives the reason of each upload given up."""
    found: queue.Queue[Registered | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def look() -> None:
        try:
            while waiting and not stop.is_set():
                for reply in pull(lambda: registered(grid, list(waiting))):
                    if waiting.pop(reply.answers, None) is not None:  # else not a reply to this exchange
                        found.put(reply)
                if time.monotonic() >= deadline:
                    break
                stop.wait(REPLY_POLL_INTERVAL_S)
        except BaseException as error:  # handed to the coordinator's thread, which raises it
            found.put(error)
        found.put(None)

    looking = threading.Thread(target=look, name="fedmed-replies", daemon=True)
    looking.start()
    try:
        while (reply := found.get()) is not None:
            if isinstance(reply, BaseException):
                raise reply
            site = site_of(reply.node)
            try:
                message = inflate(grid, reply, stalled=lambda site=site: watch.stalled(site))
            except ObjectPullError as error:
                logger.warning("%s: %s", site, error)
                dropped[site] = watch.unfinished(site)
                continue
            watch.arrived(site)
            yield message
    finally:
        stop.set()
        looking.join()


def inflate(grid: HttpGrid, reply: Registered, *, stalled: Callable[[], bool]) -> Message:
    """The whole reply, once its last object has arrived; ObjectPullError when `stalled()` says to give up (asked
    each time an object is not there yet) or Flower's own limits run out."""
    run_id = grid.run.run_id
    pull = make_pull_object_fn_protobuf(
        pull_object_protobuf=grid._runtime_client.PullObject, node=grid.node, run_id=run_id
    )

    def pull_or_give_up(object_id: str) -> bytes:
        try:
            return pull(object_id)
        except (ObjectUnavailableError, httpx.HTTPStatusError) as error:
            # A 500 is the SuperLink's SQLite state locked under the load of big uploads: ask again, like for an
            # object not there yet (Flower retries neither, and a 500 would end the run).
            if isinstance(error, httpx.HTTPStatusError) and error.response.status_code < 500:
                raise
            if stalled():
                raise ObjectPullError(object_id, "the upload stalled") from None
            raise ObjectUnavailableError(object_id) from None

    message_id = reply.proto.metadata.message_id
    contents = pull_objects(
        object_ids=[node.object_id for node in iterate_object_tree(reply.tree)], pull_object_fn=pull_or_give_up
    )
    confirm = ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=message_id)
    for attempt in range(CONFIRM_TRIES):
        try:
            grid._runtime_client.ConfirmMessageReceived(confirm)
            break
        except httpx.HTTPStatusError as error:
            if error.response.status_code < 500 or attempt == CONFIRM_TRIES - 1:
                raise
            time.sleep(1.0)
    message = inflate_object_from_contents(message_id, contents)
    message.metadata.__dict__["_message_id"] = message_id  # as HttpGrid.pull_messages sets it
    return message


class UploadWatch:
    """The sites' uploads through the proxy during one exchange: how much of each has arrived, and whether one
    has stopped making progress since the deadline."""

    CHECK_EVERY_S = 1.0

    def __init__(self, proxy: ProxyLog | None, *, deadline: float, timeout: float, stall_s: float) -> None:
        self._proxy = proxy
        self._timeout = timeout
        self._offset = proxy.end() if proxy is not None else 0
        self._deadline = deadline
        self._stall_s = stall_s
        self._lock = threading.Lock()
        self._read_at = -float("inf")
        self._tally: dict[str, SiteTraffic] = {}  # read on from _offset, so a long round's log is read once
        self._progress: dict[str, tuple[int, float]] = {}  # site -> (bytes, when they last changed)
        self.complete: dict[str, int] = {}  # site -> its whole reply's bytes at the proxy

    def uploaded(self, site: str) -> int:
        """Bytes of `site`'s replies that have crossed the proxy so far in this exchange."""
        with self._lock:
            now = time.monotonic()
            if self._proxy is not None and now - self._read_at >= self.CHECK_EVERY_S:
                _, self._offset = self._proxy.read(self._offset, into=self._tally)
                self._read_at = now
            return self._tally[site].uploaded if site in self._tally else 0

    def stalled(self, site: str) -> bool:
        """Past the deadline with no byte of `site`'s upload for stall_s. Never without the proxy's log: then
        Flower's own limits end a dead upload."""
        now = time.monotonic()
        if self._proxy is None or now < self._deadline:
            return False
        count = self.uploaded(site)
        last = self._progress.get(site)
        if last is None or count != last[0]:
            self._progress[site] = (count, now)
            return False
        return now - last[1] >= self._stall_s

    def arrived(self, site: str) -> None:
        with self._lock:
            self._read_at = -float("inf")
        self.complete[site] = self.uploaded(site)

    def unfinished(self, site: str) -> str:
        """Why a site whose upload began was dropped, with the bytes that were left."""
        done = self.uploaded(site)
        reason = f"its reply's upload did not finish after the round timeout ({self._timeout:.0f} s)"
        if self._proxy is None:
            return reason
        reason += f": {format_bytes(done)} had crossed the proxy"
        # A whole reply's size: one the coordinator took, else the most another site has sent (the replies may be
        # taken in any order, so one stalled upload can be given up before a finished one is taken).
        others = self.complete or {name: c.uploaded for name, c in self._tally.items() if name != site}
        whole, other = max(((count, name) for name, count in others.items()), default=(0, ""))
        if whole:
            reason += f", about {format_bytes(max(0, whole - done))} were left (site {other}'s reply: "
            reason += f"{format_bytes(whole)})"
        return reason + f", and none of it arrived for {self._stall_s:g} s (strategy.upload_stall_s)"

    def missing(self, site: str) -> str:
        """Why a site whose reply never registered was dropped."""
        reason = f"no reply before the round timeout ({self._timeout:.0f} s)"
        if self._proxy is None:
            return reason
        done = self.uploaded(site)
        return reason + (f"; {format_bytes(done)} of a reply had crossed the proxy" if done else "; it sent none")
