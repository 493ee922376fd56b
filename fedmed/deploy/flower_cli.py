"""The coordinator's side of Flower's Control API, through the `flwr` command line (JSON output).

fedmed keeps a Flower home in the server folder whose config.toml names one SuperLink connection,
"fedmed", pointing at the local SuperLink with the federation's CA.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import tomli_w

from fedmed.config import ServerConfig
from fedmed.core.errors import FedmedError

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
    path.write_text(tomli_w.dumps(config))
    return path


def flwr(server: ServerConfig, *arguments: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run `flwr ARGUMENTS --format json` against the federation's SuperLink."""
    write_connection(server)
    command = [executable("flwr"), *arguments, "--format", "json"]
    try:
        completed = subprocess.run(
            command,
            env=flower_environment(flower_home=flower_home(server)),
            capture_output=True,
            text=True,
            timeout=timeout,
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
        if UNAVAILABLE in message:
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


def register_node(server: ServerConfig, *, public_key: Path, name: str) -> int | None:
    """Register a site's key for node authentication; None when it was registered before."""
    try:
        return int(flwr(server, "supernode", "register", str(public_key), CONNECTION, "--name", name)["node-id"])
    except ControlApiError as error:
        if "already in use" in str(error):
            return None
        raise


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
