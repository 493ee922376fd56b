"""Flower's SuperNode with a shorter idle poll: `python -m fedmed.flower.runtime.supernode SECONDS ARGS...`.

When it has no work, Flower 1.41's SuperNode waits a fixed 3 s before asking the SuperLink again,
and it checks for its ClientApp's reply every 0.5 s. Every exchange of a round waits for those
polls, and a round is a chain of exchanges (four under SecAgg+), so the waiting, not the work,
sets the round time. This runs Flower's own SuperNode unchanged except for those waits, capped
by the site's `daemon.poll_interval_s`.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class _IdleWait:
    """The `time` module as the SuperNode's loops see it (they only sleep to poll), waits capped."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.seconds))


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll_seconds = float(sys.argv[1])
    sys.argv = ["flower-supernode", *sys.argv[2:]]
    start_client_internal.time = _IdleWait(poll_seconds)
    flower_supernode()


if __name__ == "__main__":
    main()
