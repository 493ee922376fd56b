"""Free ports on loopback for the processes of a local deployment."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port(count: int = 1) -> int:
    """A port p with p .. p + count - 1 free on loopback now, below the kernel's range for outgoing connections:
    a port the kernel hands out (bind to 0) can be taken by any client's connection before the server binds it,
    which happened to the SuperLink's port (the proxy's + 1) under the test suite's load."""
    first_ephemeral = _ephemeral_start()
    randomness = random.SystemRandom()
    for _ in range(1000):
        port = randomness.randrange(max(1024, first_ephemeral - 12000), first_ephemeral - count)
        if all(_bindable(candidate) for candidate in range(port, port + count)):
            return port
    raise OSError(f"no {count} consecutive free port(s) on 127.0.0.1 below {first_ephemeral}")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
