"""Flower's SuperLink with SQLite waiting longer for a lock: `python -m fedmed.flower.runtime.superlink ARGS...`.

Flower 1.42 keeps the SuperLink's state and every object of every message in SQLite and gives a writer 5 s to get
the lock (busy_timeout) before answering 500 "database is locked". On two cores, with three sites each pushing
a 54 M-parameter update in 5 MiB objects while they train, a write waited longer than that; Flower retries no
500, so the site's upload or the coordinator's pull failed and the round with it. This runs Flower's own
SuperLink unchanged except for that wait.
"""

from __future__ import annotations

import sys

BUSY_TIMEOUT_MS = 60_000


def main() -> None:
    from flwr.supercore import sql_mixin
    from flwr.superlink.cli import flower_superlink

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (pragma, str(BUSY_TIMEOUT_MS) if pragma == "busy_timeout" else value)
        for pragma, value in sql_mixin.SQLITE_PRAGMAS
    )
    sys.argv = ["flower-superlink", *sys.argv[1:]]
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
