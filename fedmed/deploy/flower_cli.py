"""The coordinator's side of Flower's Control API, through the `flwr` command line (JSON output).

fedmed keeps a Flower home in the server folder whose config.toml names one SuperLink connection,
"fedmed", pointing at the local SuperLink with the federation's CA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import tomli_w

from fedmed.config import ServerConfig
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.flower.runtime import node_table

from .processes import executable, flower_environment

CONNECTION = "fedmed"
UNAVAILABLE = "Connection to the SuperLink is unavailable"  # what flwr says when nothing listens


class ControlApiError(FedmedError):
    """The SuperLink refused or failed a Control API request."""


class ServerNotRunningError(ControlApiError):
    """Nothing answers on the SuperLink's loopback address."""


def flower_home(server: ServerConfig) -> Path:
    return server.superlink.database.parent / "flwr-home"


def write_connection(server: ServerConfig) -> Path:
    home = flower_home(server)
    home.mkdir(parents=True, exist_ok=True)
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {
                # The SuperLink itself, on loopback: the public port (the proxy) refuses the Control API.
                "address": server.superlink.internal_address,
                "root-certificates": str(server.tls.ca_certificate),
            },
        }
    }
    path = home / "config.toml"
    write_text_atomic(path, tomli_w.dumps(config))  # owner-only, as all of the coordinator's state
    return path


def flwr(server: ServerConfig, *arguments: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run `flwr ARGUMENTS --format json` against the federation's SuperLink."""
    return _control(server, [executable("flwr"), *arguments, "--format", "json"], arguments=arguments, timeout=timeout)


def _control(server: ServerConfig, command: list[str], *, arguments: tuple[str, ...], timeout: float) -> dict[str, Any]:
    """Run a Control API client that prints one JSON object; its payload, or the error it reports."""
    write_connection(server)
    try:
        completed = subprocess.run(
            command,
            env=flower_environment(flower_home=flower_home(server)),
            capture_output=True,
            text=True,
            timeout=timeout,
            umask=0o077,  # what flwr writes into the Flower home (state/) stays the coordinator's
        )
    except subprocess.TimeoutExpired:
        raise ControlApiError(
            f"'flwr {' '.join(arguments)}' did not answer in {timeout:.0f} s; is the server up?"
        ) from None
    payload = _json_payload(completed.stdout)
    if payload is None:
        raise ControlApiError(
            f"'flwr {' '.join(arguments)}' failed (exit {completed.returncode}): "
            f"{(completed.stderr or completed.stdout).strip()[-800:]}"
        )
    if not payload.get("success", False):
        message = str(payload.get("error-message", payload)).strip()
        if UNAVAILABLE in message or "ConnectError" in message:
            raise ServerNotRunningError(
                f"the coordinator's SuperLink does not answer on {server.superlink.internal_address}: start it with "
                f"'fedmed server start' (or, if it is running, see its log {server.superlink.log_file})"
            )
        raise ControlApiError(message)
    return payload


def _json_payload(stdout: str) -> dict[str, Any] | None:
    start = stdout.find("{")
    if start < 0:
        return None
    try:
        return json.loads(stdout[start:])
    except json.JSONDecodeError:
        return None


class RetiredKeyError(ControlApiError):
    """The key belonged to a node that was unregistered: Flower never accepts that key again."""


def register_node(server: ServerConfig, *, public_key: Path, name: str) -> int:
    """Register a site's key for node authentication; returns its node id (the existing one if the key
    is registered already). Raises RetiredKeyError for the key of an unregistered node."""
    try:
        return int(flwr(server, "supernode", "register", str(public_key), CONNECTION, "--name", name)["node-id"])
    except ControlApiError as error:
        if "already in use" not in str(error):
            raise
    node = node_of_key(server, public_key=public_key)
    if node is None:  # registered and gone between the two calls: say so rather than guess
        raise ControlApiError(f"the SuperLink says the key {public_key} is in use, but no node holds it; retry")
    if node["status"] == "unregistered":
        raise RetiredKeyError(
            f"the key {public_key} belonged to node {node['node-id']}, which was unregistered (site removed), and "
            f"Flower's SuperLink never accepts a retired key again. Ask the site for a new key and certificate "
            f"request ('fedmed site keygen keys --name {name}') and add it with 'fedmed server add-site SERVER_TOML "
            f"{name} keys/{name}.pub --csr keys/{name}.csr'"
        )
    return int(node["node-id"])


def node_of_key(server: ServerConfig, *, public_key: Path) -> dict[str, Any] | None:
    """The node holding `public_key` (a live one before a retired one), or None."""
    digest = node_table.key_digest(public_key)
    holders = [node for node in list_nodes_with_keys(server) if node["key-sha256"] == digest]
    holders.sort(key=lambda node: node["status"] == "unregistered")
    return holders[0] if holders else None


def list_nodes_with_keys(server: ServerConfig) -> list[dict[str, Any]]:
    """Every node the SuperLink knows, unregistered ones included, with its name and key digest."""
    command = [sys.executable, "-m", node_table.__name__, CONNECTION]
    return _control(server, command, arguments=("supernode", "list"), timeout=120.0)["nodes"]


def list_nodes(server: ServerConfig) -> list[dict[str, Any]]:
    return flwr(server, "supernode", "list", CONNECTION)["nodes"]


def list_runs(server: ServerConfig) -> list[dict[str, Any]]:
    return flwr(server, "list", CONNECTION)["runs"]


def start_run(server: ServerConfig, *, app: Path, run_config_file: Path) -> dict[str, Any]:
    return flwr(server, "run", str(app), CONNECTION, "--run-config", str(run_config_file))


def stop_run(server: ServerConfig, flower_run_id: int) -> None:
    flwr(server, "stop", str(flower_run_id), CONNECTION)


def unregister_node(server: ServerConfig, node_id: int) -> None:
    flwr(server, "supernode", "unregister", str(node_id), CONNECTION)
