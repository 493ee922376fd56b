"""Processes that cannot outlive their parent (Linux's parent-death signal).

A supervisor killed with SIGKILL runs no clean-up, so its children must be told by the kernel:
each one asks for a signal when its parent dies. Elsewhere (no prctl) this is a no-op and the
supervisor's own stop path is the only guarantee.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(*, parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """In a freshly forked child: receive `signum` when the parent dies (also if it already has)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    # The parent may have died between fork and prctl; then nobody would ever send the signal.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)
