"""An outsider with network access to the coordinator's public port and the federation's public ca.crt
tries every way in that worked before the front proxy (issue 10, 1-5), and one revoked site tries to come
back. Each attempt must be refused AND change nothing: no node added, no run started or stopped, no file
written, no epsilon charged."""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from deploy_helpers import rogue_supernode, run_config

from fedmed.config import load_run_config, load_server_config, load_site_config
from fedmed.deploy import flower_cli, pki, proxy, site_certs
from fedmed.deploy.local import FEDMED, LocalFederation, cli
from fedmed.deploy.workspace import provision
from fedmed.flower.records import encode_run
from fedmed.flower.runtime.app_bundle import APP_PROJECT
from fedmed.site.privacy import ledger_path
from fedmed.workflows import deployed_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINISHED = deployed_run.FINISHED


# The outsider's tools ----------------------------------------------------------------------------
def _ca(federation: LocalFederation) -> Path:
    return federation.workspace / "ca" / "ca.crt"  # public: every site kit holds a copy


def _post(federation: LocalFederation, path: str, *, certificate: tuple[Path, Path] | None = None) -> int | str:
    """POST to the public port; the HTTP status, or 'refused' when TLS or the connection failed."""
    context = ssl.create_default_context(cafile=str(_ca(federation)))
    if certificate is not None:
        context.load_cert_chain(*map(str, certificate))
    try:
        response = httpx.post(
            f"https://127.0.0.1:{federation.port}{path}",
            content=b"",
            headers={"Content-Type": "application/protobuf"},
            verify=context,
            timeout=10,
        )
    except httpx.TransportError:
        return "refused"
    return response.status_code


def _site_certificate(federation: LocalFederation, site: str) -> tuple[Path, Path]:
    config = load_site_config(federation.site_config(site))
    return config.client_certificate, config.client_key


def _public_flwr(federation: LocalFederation, home: Path, *arguments: str) -> subprocess.CompletedProcess:
    """The flwr CLI pointed at the public port, as an outsider would configure it."""
    home.mkdir(parents=True, exist_ok=True)
    connection = {"address": f"127.0.0.1:{federation.port}", "root-certificates": str(_ca(federation))}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "public", "public": connection}}))
    flwr = str(Path(sys.executable).with_name("flwr"))
    return subprocess.run(
        [flwr, *arguments, "--format", "json"],
        env={"FLWR_HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _failed(completed: subprocess.CompletedProcess) -> bool:
    start = completed.stdout.find("{")
    try:
        payload = json.loads(completed.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    return completed.returncode != 0 or not payload.get("success", False)


# What must not change ----------------------------------------------------------------------------
def _server(federation: LocalFederation):
    return load_server_config(federation.server_config)


def _files(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _ledgers(federation: LocalFederation) -> dict[str, bytes]:
    ledgers = {}
    for site in federation.sites:
        path = ledger_path(load_site_config(federation.site_config(site)).state_dir)
        ledgers[site] = path.read_bytes() if path.exists() else b""
    return ledgers


def _snapshot(federation: LocalFederation) -> dict[str, Any]:
    server = _server(federation)
    return {
        "nodes": sorted(_active_nodes(server)),
        "runs": sorted((int(run["run-id"]), str(run["status"])) for run in flower_cli.list_runs(server)),
        "files": _files(server.runs),
        "ledgers": _ledgers(federation),
    }


def _active_nodes(server) -> set[int]:
    """Node ids the SuperLink would let in (an unregistered node stays listed, marked so)."""
    return {int(node["node-id"]) for node in flower_cli.list_nodes(server) if node.get("status") != "unregistered"}


def _wait_finished(federation: LocalFederation, flower_run_id: int, *, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in flower_cli.list_runs(_server(federation)):
            if int(run["run-id"]) == flower_run_id and run["status"] in FINISHED:
                return str(run["status"])
        time.sleep(1)
    raise TimeoutError(f"Flower run {flower_run_id} did not finish in {timeout:.0f} s")


# 1. The Control API from the network -------------------------------------------------------------
def test_the_control_api_is_closed_to_the_network(federation: LocalFederation, tmp_path: Path) -> None:
    before = _snapshot(federation)
    foreign = provision(
        tmp_path / "foreign",
        federation="foreign",
        addresses=["127.0.0.1"],
        port=1,
        sites=["a"],
        site_keys=True,
        app_digest="ab" * 32,
    )
    foreign_certificate = (foreign.kit("a") / "keys" / "a.crt", foreign.kit("a") / "keys" / "a-tls.key")
    for path in ("/v1/control/list-nodes", "/v1/control/list-runs"):
        assert _post(federation, path) in ("refused", 400), "no client certificate"
        assert _post(federation, path, certificate=foreign_certificate) in ("refused", 400), "another CA's certificate"
        # An enrolled site's certificate opens the Fleet API only.
        assert _post(federation, path, certificate=_site_certificate(federation, "a")) == 403
    for path in ("/v1/fleet/register-node", "/v1/fleet/unregister-node", "/v1/runtime/pull-messages"):
        assert _post(federation, path, certificate=_site_certificate(federation, "a")) == 403
    # The same certificate does reach the SuperLink's Fleet API (which then wants node authentication).
    assert _post(federation, "/v1/fleet/get-run", certificate=_site_certificate(federation, "a")) == 401
    assert _snapshot(federation) == before


# 2. A node that enrolls itself ---------------------------------------------------------------------
def test_an_outsider_cannot_register_or_run_a_node(federation: LocalFederation, tmp_path: Path) -> None:
    before = _snapshot(federation)
    keys = tmp_path / "keys"
    pki.create_node_key_pair(keys / "outsider.key", keys / "outsider.pub")
    completed = _public_flwr(
        federation, tmp_path / "flwr-home", "supernode", "register", str(keys / "outsider.pub"), "public"
    )
    assert _failed(completed), completed.stdout
    # Its own SuperNode, with the fresh key and no enrolled certificate, tries for a while.
    access_log = proxy.proxy_dir(_server(federation)) / "access.log"
    offset = access_log.stat().st_size
    log = (tmp_path / "supernode.log").open("wb")
    node = rogue_supernode(
        address=f"127.0.0.1:{federation.port}",
        ca_certificate=_ca(federation),
        private_key=keys / "outsider.key",
        output=log,
    )
    try:
        # Until the proxy has turned away a few of its attempts (it retries with a backoff), then look.
        lines = _outsider_attempts(access_log, offset=offset, at_least=2, timeout=60)
        assert _snapshot(federation) == before
    finally:
        node.kill()
        node.wait()
    assert _active_nodes(_server(federation)) == set(before["nodes"])
    # It did try, and the proxy turned it away: no client certificate (fingerprint "-"), 400, never the SuperLink.
    attempts = [line for line in lines if ' "-" - "POST /v1/fleet/' in line]
    assert attempts, f"no request of the outsider's SuperNode reached the proxy: {lines[-5:]}"
    assert all(re.search(r'HTTP/1\.1" 400 ', line) for line in attempts), attempts
    assert "400 Bad Request" in (tmp_path / "supernode.log").read_text(), "the SuperNode was told no"


def _outsider_attempts(access_log: Path, *, offset: int, at_least: int, timeout: float) -> list[str]:
    """The proxy's access-log lines since `offset`, once it holds `at_least` certificate-less Fleet requests."""
    deadline = time.monotonic() + timeout
    while True:
        with access_log.open("rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").splitlines()
        if sum(' "-" - "POST /v1/fleet/' in line for line in lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


# 5. A DP-SGD run from the network ------------------------------------------------------------------
def test_a_dp_sgd_run_from_the_network_is_refused_and_charges_nothing(
    federation: LocalFederation, tmp_path: Path
) -> None:
    before = _snapshot(federation)
    config = load_run_config(
        run_config(federation, "outsider-dp", dp_sgd={"enabled": True, "epsilon": 3.0, "accountant": "rdp"})
    )
    run_config_file = tmp_path / "run.toml"
    run_config_file.write_text(tomli_w.dumps(encode_run(config, run_id="outsider-dp", submission="A" * 43)))
    completed = _public_flwr(
        federation, tmp_path / "flwr-home", "run", str(APP_PROJECT), "public", "--run-config", str(run_config_file)
    )
    assert _failed(completed), completed.stdout
    # `flwr run` returned with the SuperLink's answer: a run it had taken would already be in the snapshot's runs.
    assert _snapshot(federation) == before


# 4. Stopping the coordinator's run from the network -------------------------------------------------
@pytest.fixture(scope="module")
def coordinator_run(federation: LocalFederation) -> tuple[Path, int]:
    """A run the coordinator started: its directory and Flower run id."""
    completed = federation.run(run_config(federation, "coordinators", train={"rounds": 2}), check=False)
    assert completed.returncode == 0, completed.stderr
    run_dir = Path(completed.stdout.split("run directory: ")[1].split()[0])
    return run_dir, deployed_run.flower_run_ids(deployed_run.RunDirectory(run_dir))[-1]


def test_an_outsider_cannot_stop_a_run(
    federation: LocalFederation, coordinator_run: tuple[Path, int], tmp_path: Path
) -> None:
    run_dir, flower_run_id = coordinator_run
    runs_before = {int(run["run-id"]) for run in flower_cli.list_runs(_server(federation))}
    completed = _public_flwr(federation, tmp_path / "flwr-home", "stop", str(flower_run_id), "public")
    assert _failed(completed), completed.stdout
    runs = {int(run["run-id"]): run["status"] for run in flower_cli.list_runs(_server(federation))}
    assert set(runs) == runs_before and runs[flower_run_id] not in ("finished:stopped",)
    assert _wait_finished(federation, flower_run_id) == "finished:completed"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


# 3. Choosing where the coordinator writes -----------------------------------------------------------
@pytest.mark.parametrize("forgery", ["run directory", "unknown token", "used token"])
def test_a_run_cannot_choose_or_reuse_a_run_directory(
    federation: LocalFederation, coordinator_run: tuple[Path, int], forgery: str, tmp_path: Path
) -> None:
    """Submitted through the loopback Control API: an attacker already past the network boundary."""
    run_dir, flower_run_id = coordinator_run
    assert _wait_finished(federation, flower_run_id) == "finished:completed"
    server = _server(federation)
    config = load_run_config(run_dir / "config.toml")
    if forgery == "run directory":
        encoded = encode_run(config, run_id=run_dir.name, run_dir=run_dir)
    elif forgery == "unknown token":
        encoded = encode_run(config, run_id=run_dir.name, submission="A" * 43)
    else:
        recorded = (run_dir / "flower-run-config.toml").read_text()
        token = next(line.split('"')[1] for line in recorded.splitlines() if line.startswith("fedmed-submission"))
        encoded = encode_run(config, run_id=run_dir.name, submission=token)
    before = _snapshot(federation)
    final = (run_dir / "checkpoints" / "final.pt").read_bytes()
    run_config_file = tmp_path / "forged.toml"
    run_config_file.write_text(tomli_w.dumps(encoded))
    forged = int(flower_cli.start_run(server, app=APP_PROJECT, run_config_file=run_config_file)["run-id"])
    assert _wait_finished(federation, forged, timeout=120) == "finished:failed"
    after = _snapshot(federation)
    assert after["files"] == before["files"] and after["ledgers"] == before["ledgers"]
    assert after["nodes"] == before["nodes"]
    assert (run_dir / "checkpoints" / "final.pt").read_bytes() == final
    assert "refusing the run" in server.superlink.log_file.read_text()


# Revocation ----------------------------------------------------------------------------------------
def test_remove_site_shuts_a_site_out(federation: LocalFederation, tmp_path: Path) -> None:
    """A site enrolled from its own certificate request, then removed: the proxy refuses its certificate and
    its node is unregistered. (A site of its own, so that the shared sites keep serving the other tests.)"""
    keys = tmp_path / "keys"
    cli([FEDMED, "site", "keygen", str(keys), "--name", "d"])
    server = _server(federation)
    nodes_before = _active_nodes(server)
    added = cli(
        [
            FEDMED,
            "server",
            "add-site",
            str(federation.server_config),
            "d",
            str(keys / "d.pub"),
            "--csr",
            str(keys / "d.csr"),
        ]
    )
    assert "registered" in added.stdout and (keys / "d.crt").exists()
    certificate = (keys / "d.crt", site_certs.client_key_path(keys, "d"))
    node = json.loads((server.superlink.database.parent / "site-nodes.json").read_text())["d"]
    assert _active_nodes(server) == nodes_before | {node}
    assert _wait_for_status(federation, certificate, 401), "an enrolled certificate reaches the SuperLink"

    removed = cli([FEDMED, "server", "remove-site", str(federation.server_config), "d"])
    assert "revoked" in removed.stdout and "unregistered" in removed.stdout, removed.stdout
    assert _wait_for_status(federation, certificate, 403), "a revoked certificate is refused at the proxy"
    assert _active_nodes(server) == nodes_before
    assert not (server.site_keys / "d.pub").exists() and not (server.site_certificates / "d.crt").exists()
    for site in federation.sites:  # the others are untouched
        assert _post(federation, "/v1/fleet/get-run", certificate=_site_certificate(federation, site)) == 401


def _wait_for_status(federation: LocalFederation, certificate: tuple[Path, Path], status: int) -> bool:
    # nginx applies a reload within a moment (new workers); allow it a few seconds.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _post(federation, "/v1/fleet/get-run", certificate=certificate) == status:
            return True
        time.sleep(0.3)
    return False
