"""A deployed federation talks only to itself: while a run goes on, every TCP or UDP socket held by the
coordinator's and the sites' processes (daemons, SuperLink, nginx, SuperNodes, executors, ServerApp and
ClientApp processes) connects loopback to loopback, to or from a port one of those processes listens on.
Each Flower process runs with telemetry, update checks and runtime installs off.

The sockets are read from the kernel (/proc/<pid>/fd and /proc/net), so C code (gRPC, nginx) is seen as
well as Python; a poll every 50 ms can miss a socket that lives shorter than that, which the environment
checks cover: with telemetry and update checks off, Flower opens none.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_helpers import run_config

from fedmed.deploy.local import LocalFederation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUIET_FLOWER = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
TABLES = ("tcp", "tcp6", "udp", "udp6")
TCP_LISTEN = "0A"
POLL_S = 0.05


@dataclass(frozen=True)
class Endpoint:
    table: str
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str

    @property
    def connected(self) -> bool:
        return self.remote[1] != 0


@dataclass(frozen=True)
class Seen:
    """One socket of one process."""

    process: str
    endpoint: Endpoint


def _address(hexadecimal: str) -> str:
    """/proc/net stores addresses as 32-bit words in host (little-endian) byte order."""
    raw = b"".join(bytes.fromhex(hexadecimal[i : i + 8])[::-1] for i in range(0, len(hexadecimal), 8))
    address = ipaddress.ip_address(raw)
    return str(getattr(address, "ipv4_mapped", None) or address)


def _endpoints() -> dict[int, Endpoint]:
    """Every IP socket of this network namespace, by inode."""
    found: dict[int, Endpoint] = {}
    for table in TABLES:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                (local, local_port), (remote, remote_port) = (field.split(":") for field in fields[1:3])
                found[int(fields[9])] = Endpoint(
                    table,
                    (_address(local), int(local_port, 16)),
                    (_address(remote), int(remote_port, 16)),
                    fields[3],
                )
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    return []


def _environ(pid: int) -> dict[str, str]:
    with contextlib.suppress(OSError):
        pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        return dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    return {}


def _trees(roots: list[int]) -> list[int]:
    """The roots and all their descendants, from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    found, stack = list(roots), list(roots)
    while stack:
        below = children.get(stack.pop(), [])
        found.extend(below)
        stack.extend(below)
    return found


class Watcher:
    """Polls the federation's process trees: their sockets, command lines and environments."""

    def __init__(self, federation: LocalFederation) -> None:
        self.roots = [daemon.pid for daemon in federation.daemons.values()]
        self.sockets: set[Seen] = set()
        self.processes: dict[int, tuple[list[str], dict[str, str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            pids = _trees(self.roots)
            owned = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
            endpoints = _endpoints()
            for pid in pids:
                if pid not in self.processes and (command := _cmdline(pid)):
                    self.processes[pid] = (command, _environ(pid))
            for inode, pid in owned.items():
                if inode in endpoints:
                    name = " ".join(self.processes.get(pid, ([str(pid)], {}))[0])[:160]
                    self.sockets.add(Seen(f"{pid} {name}", endpoints[inode]))
            self._stop.wait(POLL_S)


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _python(command: list[str]) -> bool:
    """Python processes: fedmed's daemons and executors, Flower's SuperLink and SuperNodes, the apps."""
    return bool(command) and "python" in Path(command[0]).name


def test_a_deployed_run_talks_only_to_the_federation(federation: LocalFederation) -> None:
    config = run_config(federation, "loopback-only", train={"rounds": 1}, evaluation={"cross_site": False})
    with Watcher(federation) as watcher:
        federation.run(config, "--wait")

    commands = {pid: command for pid, (command, _) in watcher.processes.items()}
    joined = {pid: " ".join(command) for pid, command in commands.items()}
    # The watch saw every kind of process a run involves, and their traffic.
    assert any("fedmed.flower.runtime.superlink" in line for line in joined.values()), joined
    assert any("nginx" in line for line in joined.values()), joined
    assert sum("fedmed.flower.runtime.supernode" in line for line in joined.values()) == 3, joined
    assert any("flwr-serverapp" in line for line in joined.values()), "no ServerApp process was seen"
    listening = {seen.endpoint.local[1] for seen in watcher.sockets if seen.endpoint.state == TCP_LISTEN}
    connected = [seen for seen in watcher.sockets if seen.endpoint.connected]
    to_proxy = [seen for seen in connected if seen.endpoint.remote[1] == federation.port]
    assert federation.port in listening and len({seen.process for seen in to_proxy}) >= 3, to_proxy

    # Every connection is loopback to loopback, between a port the federation listens on and a peer.
    strays = [
        seen
        for seen in connected
        if not (_loopback(seen.endpoint.local[0]) and _loopback(seen.endpoint.remote[0]))
        or not ({seen.endpoint.local[1], seen.endpoint.remote[1]} & listening)
    ]
    assert not strays, "sockets beyond the federation:\n" + "\n".join(map(str, strays))
    # Nothing listens beyond loopback either (the public port is nginx's: on loopback in this federation).
    assert all(_loopback(s.endpoint.local[0]) for s in watcher.sockets if s.endpoint.state == TCP_LISTEN)

    # Flower's processes run quiet: telemetry, update checks and runtime installs off.
    flower = {pid: env for pid, (command, env) in watcher.processes.items() if _python(command)}
    assert len(flower) >= 9, joined  # 4 daemons, SuperLink, 3 SuperNodes, 4 executors, ServerApp, ClientApps
    for pid, env in flower.items():
        assert {key: env.get(key) for key in QUIET_FLOWER} == QUIET_FLOWER, joined[pid]
    superlink = [command for command in commands.values() if "fedmed.flower.runtime.superlink" in " ".join(command[:3])]
    assert superlink and all("--disable-runtime-dependency-installation" in command for command in superlink)
    # Flower's SuperNode has no disable flag; its default is off, and nothing turns it on.
    assert not [line for line in joined.values() if "--allow-runtime-dependency-installation" in line]
