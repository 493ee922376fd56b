"""A training round's replies, taken one at a time as they arrive: each is counted, decoded and checked, and its
update written to the round's update store before the next is pulled. The coordinator holds one reply at a time,
whatever the number of sites; what is kept of a reply afterwards is its metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from fedmed.flower.records import sender, wire_bytes
from fedmed.flower.wire import ARRAYS

from .compressed import decode_replies
from .context import RunContext
from .exchange import arriving
from .replies import usable_replies
from .reply_checks import refuse_implausible
from .robust.updates import SpilledUpdates


@dataclass
class TrainReplies:
    replies: list[Message] = field(default_factory=list)  # every reply, refusals included
    usable: list[Message] = field(default_factory=list)  # in site order; their updates are in the store, not in them
    refused: dict[str, str] = field(default_factory=dict)  # the reason by site
    upload_bytes: dict[str, int] = field(default_factory=dict)  # each reply as received, before decoding
    why_dropped: dict[str, str] = field(default_factory=dict)  # deployment: each missing site's, with its bytes
    decode_seconds: float = 0.0


def collect_train_replies(
    run: RunContext,
    messages: list[Message],
    *,
    arrays: ArrayRecord,
    start: dict[str, np.ndarray],
    updates: SpilledUpdates,
) -> TrainReplies:
    """Send the round's training messages; every usable reply's update goes to `updates` as it arrives. `arrays` is
    the round's global record and `start` the same arrays unpacked."""
    collected = TrainReplies()
    for reply in arriving(run, messages, timeout=run.timeout, dropped=collected.why_dropped):
        collected.replies.append(reply)
        if reply.has_content():
            collected.upload_bytes[run.site_of(reply.metadata.src_node_id)] = wire_bytes(reply.content)
        usable = usable_replies([reply], phase="train", site_names=run.site_names)
        started = time.perf_counter()
        decoded, undecodable = decode_replies(usable, start=start, settings=run.config.compression)
        collected.decode_seconds += time.perf_counter() - started
        passed, implausible = refuse_implausible(decoded, sent=arrays, settings=run.config.robust)
        collected.refused |= undecodable | implausible
        for kept in passed:
            updates.add(sender(kept), kept.content[ARRAYS])
            del kept.content[ARRAYS]
            collected.usable.append(kept)
    collected.usable.sort(key=sender)
    collected.refused = dict(sorted(collected.refused.items()))
    return collected
