"""A whole federation on this machine, as real processes on 127.0.0.1: `fedmed provision`, then
`fedmed server start` and one `fedmed site start` per site, stopped with everything they started on
close. Used by the deployment tests and benchmarks; also a way to try deployment without three
machines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedmed.config import load_server_config, read_toml

from .ports import free_port
from .server import site_nodes_file
from .slow_link import SlowLink

FEDMED = str(Path(sys.executable).with_name("fedmed"))


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it: a machine losing power, as far as fedmed can tell."""
    for process in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


class LocalFederation:
    def __init__(self, root: Path, *, site_data: dict[str, Path], federation: str = "local") -> None:
        self.root = root
        self.federation = federation
        self.site_data = site_data
        self.sites = tuple(site_data)
        self.port = free_port(2)  # the proxy's; the SuperLink takes the next
        self.daemons: dict[str, subprocess.Popen] = {}
        self.links: list[SlowLink] = []
        self.workspace = root / "workspace"
        self.server_config = self.workspace / "server" / "server.toml"

    # Set-up ----------------------------------------------------------------------------------
    def provision(self) -> None:
        cli(
            [
                FEDMED,
                "provision",
                str(self.workspace),
                "--federation",
                self.federation,
                "--port",
                str(self.port),
                *[arg for site in self.sites for arg in ("--site", site)],
            ]
        )
        server = read_toml(self.server_config)
        server["superlink"]["host"] = "127.0.0.1"  # one machine: listen on loopback only
        self.server_config.write_text(tomli_w.dumps(server))
        # Sites share this machine's cores: more threads per ClientApp than that only thrash.
        threads = max(1, (os.cpu_count() or 1) // len(self.site_data))
        for site, data in self.site_data.items():
            self.edit_site(site, data=str(data), daemon={"runtime_port": free_port(), "torch_threads": threads})

    def site_config(self, site: str) -> Path:
        return self.workspace / "sites" / site / "site.toml"

    def site_log(self, site: str) -> Path:
        return self.workspace / "sites" / site / "logs" / "site.log"

    def slow_link(self, site: str, *, upload_rate: float | None, download_rate: float | None = None) -> SlowLink:
        """Send `site`'s connections through a SlowLink at these rates (bytes/s; None: unlimited), from its next
        start on; the link closes with the federation."""
        link = SlowLink(("127.0.0.1", self.port), upload_rate=upload_rate, download_rate=download_rate).__enter__()
        self.links.append(link)
        self.edit_site(site, server={"address": link.address})
        return link

    def edit_site(self, site: str, **changes: Any) -> None:
        _edit_toml(self.site_config(site), changes)

    def edit_server(self, **changes: Any) -> None:
        _edit_toml(self.server_config, changes)

    # Daemons ---------------------------------------------------------------------------------
    def start_server(self) -> None:
        self.daemons["server"] = self._spawn([FEDMED, "server", "start", str(self.server_config)], "server")

    def start_site(self, site: str) -> None:
        self.daemons[site] = self._spawn([FEDMED, "site", "start", str(self.site_config(site))], f"site-{site}")

    def start(self) -> None:
        """Start the server and every site, and wait until all sites are online."""
        self.start_server()
        self.wait_for_server()
        for site in self.sites:
            self.start_site(site)
        self.wait_for_sites(set(self.sites))

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen:
        log = (self.root / f"{name}.out").open("ab")
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def crash(self, name: str) -> None:
        kill_tree(self.daemons.pop(name).pid)

    def kill_supervisor(self, name: str) -> list[int]:
        """SIGKILL only the daemon's own process; returns the processes that were below it."""
        daemon = self.daemons.pop(name)
        below = descendants(daemon.pid)
        daemon.kill()
        daemon.wait()
        return below

    def process(self, name: str, module: str) -> int:
        """The pid of the daemon's child running `python -m module` (e.g. its SuperNode)."""
        for pid in descendants(self.daemons[name].pid):
            with contextlib.suppress(OSError):
                if module in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"):
                    return pid
        raise LookupError(f"no process running {module} below {name}")

    def stop(self, name: str) -> None:
        daemon = self.daemons.pop(name)
        others = descendants(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(timeout=30)
        for process in [daemon.pid, *others]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)

    def close(self) -> None:
        for name in list(self.daemons):
            self.stop(name)
        for link in self.links:
            link.close()

    # Coordinator -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return json.loads(cli([FEDMED, "status", "--server", str(self.server_config), "--json"]).stdout)

    def wait_for_server(self, *, timeout: float = 60.0) -> None:
        """Until the SuperLink answers and has registered every site key."""
        nodes = site_nodes_file(load_server_config(self.server_config))
        wait_for(
            lambda: nodes.exists() and set(json.loads(nodes.read_text())) >= set(self.sites),
            timeout=timeout,
            what=f"the server to register {self.sites}; see {self.root}/server.out",
        )

    def wait_for_sites(self, online: set[str], *, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                sites = {s["site"] for s in self.status()["sites"] if s["status"] == "online"}
            except subprocess.CalledProcessError:
                sites = set()
            if online <= sites:
                return
            time.sleep(1)
        raise TimeoutError(f"sites online: {sites}, expected {online}; see {self.root}/*.out")

    def write_run_config(self, config: dict[str, Any]) -> Path:
        path = self.root / f"{config['name']}.toml"
        path.write_text(tomli_w.dumps(config))
        return path

    def run(self, config: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        return cli([FEDMED, "run", str(config), "--server", str(self.server_config), *extra], check=check, timeout=600)

    def resume(self, run_dir: Path) -> subprocess.CompletedProcess:
        return cli(
            [FEDMED, "run", "--resume", str(run_dir), "--server", str(self.server_config), "--wait"], timeout=600
        )

    def submit(self, config: Path) -> Path:
        """Start a run without waiting; returns its run directory."""
        output = self.run(config).stdout
        return Path(re.search(r"run directory: (\S+)", output).group(1))


def _edit_toml(path: Path, changes: dict[str, Any]) -> None:
    config = read_toml(path)
    for key, value in changes.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(tomli_w.dumps(config))


def cli(command: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise subprocess.CalledProcessError(completed.returncode, command, completed.stdout, completed.stderr)
    return completed


def wait_for(predicate, *, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
