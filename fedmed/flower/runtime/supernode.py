"""Flower's SuperNode with a shorter idle poll: `python -m fedmed.flower.runtime.supernode SECONDS ARGS...`.

When it has no work, Flower 1.41's SuperNode waits a fixed 3 s before asking the SuperLink again,
and it checks for its ClientApp's reply every 0.5 s. Every exchange of a round waits for those
polls, and a round is a chain of exchanges (four under SecAgg+), so the waiting, not the work,
sets the round time. This runs Flower's own SuperNode unchanged except for those waits, capped
by the site's `daemon.poll_interval_s`.

It also declares a heartbeat interval of 10 s (Flower's minimum) instead of 30 s. The SuperLink
keeps a node online for two intervals after its last heartbeat and refuses to activate a node it
thinks online, so after a SuperNode is killed its restart gets in after 20 s instead of 60 s.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .client_tls import present_client_certificate

HEARTBEAT_INTERVAL_S = 10.0


class _IdleWait:
    """The `time` module as the SuperNode's loops see it (they only sleep to poll), waits capped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.seconds))


def main() -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll_seconds = float(sys.argv[1])
    sys.argv = ["flower-supernode", *present_client_certificate(sys.argv[2:])]
    start_client_internal.time = _IdleWait(poll_seconds)
    # The interval the node declares and the one it keeps must agree, or the SuperLink drops it.
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_INTERVAL_S
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_INTERVAL_S
    flower_supernode()


if __name__ == "__main__":
    main()
