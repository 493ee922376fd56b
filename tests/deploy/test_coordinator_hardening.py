"""The coordinator's side of issue 24 on a live federation: a removed site's key, the request-body limit,
a node a local user registers on the loopback Control API, the firewall that closes that port, owner-only
files, a SuperLink on loopback only, an unapproved app, and a run the coordinator stopped.

Every test leaves the shared federation as it found it (sites, nodes, server.toml, firewall)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w
from deploy_helpers import rogue_supernode, run_config
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

from fedmed.config import load_server_config, load_site_config, read_toml
from fedmed.deploy import flower_cli, pki, proxy, site_certs
from fedmed.deploy.local import FEDMED, LocalFederation, cli, descendants, free_port, wait_for
from fedmed.flower.runtime.app_bundle import app_digest
from fedmed.runs.run_dir import STATUS_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1024 * 1024


def _server(federation: LocalFederation):
    return load_server_config(federation.server_config)


def _site_nodes(federation: LocalFederation) -> dict[str, int]:
    return json.loads(_server(federation).site_nodes_file.read_text())


def _superlink_pid(federation: LocalFederation) -> int:
    for pid in descendants(federation.daemons["server"].pid):
        with contextlib.suppress(OSError):
            if b"fedmed.flower.runtime.superlink" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise LookupError("no flower-superlink below the coordinator")


def _rss(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def _access_log(federation: LocalFederation) -> Path:
    return proxy.proxy_dir(_server(federation)) / "access.log"


def _new_lines(path: Path, offset: int) -> list[str]:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace").splitlines()


def _site_certificate(federation: LocalFederation, site: str) -> tuple[Path, Path]:
    config = load_site_config(federation.site_config(site))
    return config.client_certificate, config.client_key


def _post(federation: LocalFederation, path: str, *, content, headers: dict[str, str] | None = None) -> int | str:
    """POST with site a's enrolled certificate; the status, or 'reset' when the connection broke."""
    context = ssl.create_default_context(cafile=str(federation.workspace / "ca" / "ca.crt"))
    context.load_cert_chain(*map(str, _site_certificate(federation, "a")))
    try:
        response = httpx.post(
            f"https://127.0.0.1:{federation.port}{path}",
            content=content,
            headers={"Content-Type": "application/protobuf", **(headers or {})},
            verify=context,
            timeout=60,
        )
    except httpx.TransportError:
        return "reset"
    return response.status_code


# 2. A removed site's key -----------------------------------------------------------------------------------
def test_registering_a_registered_key_again_finds_its_node(federation: LocalFederation) -> None:
    """What every server restart does: 'already in use' is the node the key has, not None."""
    server = _server(federation)
    nodes = _site_nodes(federation)
    assert flower_cli.register_node(server, public_key=server.site_keys / "a.pub", name="a") == nodes["a"]


def _kit(federation: LocalFederation, site: str, keys: Path) -> None:
    """A site kit for `site` beside the others: site a's data and settings, the site's own keys."""
    config = read_toml(federation.site_config("a"))
    a = load_site_config(federation.site_config("a"))
    folder = federation.site_config(site).parent
    folder.mkdir(parents=True, exist_ok=True)
    config.update(
        name=site,
        data=str(a.data),
        state_dir=str(folder / "state"),
        private_key=str(keys / f"{site}.key"),
        client_certificate=str(keys / f"{site}.crt"),
        client_key=str(site_certs.client_key_path(keys, site)),
    )
    config["server"]["ca_certificate"] = str(a.server.ca_certificate)
    config["daemon"] = {**config.get("daemon", {}), "runtime_port": free_port(), "log_file": str(folder / "site.log")}
    federation.site_config(site).write_text(tomli_w.dumps(config))


def test_a_removed_site_comes_back_with_a_new_key_never_with_its_retired_one(
    federation: LocalFederation, tmp_path: Path
) -> None:
    server = _server(federation)
    add = [FEDMED, "server", "add-site", str(federation.server_config), "e"]
    old = tmp_path / "old"
    cli([FEDMED, "site", "keygen", str(old), "--name", "e"])
    cli([*add, str(old / "e.pub"), "--csr", str(old / "e.csr")])
    retired = _site_nodes(federation)["e"]
    started = False
    try:
        cli([FEDMED, "server", "remove-site", str(federation.server_config), "e"])
        # What the runbook said before: the same key and certificate again. Flower keeps the key retired.
        again = cli([*add, str(old / "e.pub"), "--certificate", str(old / "e.crt")], check=False)
        said = again.stdout + again.stderr
        assert again.returncode != 0, said
        assert "registered" not in again.stdout and "site keygen" in said and "--csr" in said, said
        assert not (server.site_keys / "e.pub").exists() and not (server.site_certificates / "e.crt").exists()
        assert "e" not in _site_nodes(federation)

        # The fix it names: a new key and certificate request. The site connects and is listed by name.
        new = tmp_path / "new"
        cli([FEDMED, "site", "keygen", str(new), "--name", "e"])
        added = cli([*add, str(new / "e.pub"), "--csr", str(new / "e.csr")])
        node = _site_nodes(federation)["e"]
        assert f"registered (node {node})" in added.stdout and node != retired
        _kit(federation, "e", new)
        federation.start_site("e")
        started = True
        federation.wait_for_sites({"e"})
        listed = {site["site"]: site for site in federation.status()["sites"]}
        assert listed["e"]["node_id"] == node and listed["e"]["status"] == "online"
    finally:
        if started:
            federation.stop("e")
        cli([FEDMED, "server", "remove-site", str(federation.server_config), "e"], check=False)
    assert "e" not in _site_nodes(federation)


# 6. The request-body limit -----------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_refused_before_the_superlink_reads_it(federation: LocalFederation) -> None:
    server = _server(federation)
    limit = proxy.max_request_bytes(server)
    size = 300 * MIB
    assert size > 10 * limit
    pid = _superlink_pid(federation)
    log = _access_log(federation)
    offset = log.stat().st_size
    before = _rss(pid)

    def body(total: int) -> Iterator[bytes]:
        block = b"\0" * MIB
        for _ in range(total // MIB):
            yield block

    declared = _post(federation, "/v1/fleet/push-object", content=body(size), headers={"Content-Length": str(size)})
    streamed = _post(federation, "/v1/fleet/push-object", content=body(size))  # chunked: no length up front
    grown = _rss(pid) - before
    assert declared in (413, "reset") and streamed in (413, "reset")
    time.sleep(0.5)  # nginx writes the access line when it closes the request
    refused = [line for line in _new_lines(log, offset) if '"POST /v1/fleet/push-object HTTP/1.1" 413 ' in line]
    assert len(refused) == 2, _new_lines(log, offset)
    assert grown < size / 4, f"the SuperLink grew by {grown / MIB:.0f} MiB for a {size / MIB:.0f} MiB body"
    # What a site does send, one of Flower's array chunks with its envelope, still reaches the SuperLink
    # (which wants node authentication: 401).
    assert _post(federation, "/v1/fleet/push-object", content=b"\0" * (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + 65536)) in (
        400,
        401,
    )


# 7. A node a local user registers on the loopback Control API ------------------------------------------------------
def _local_flwr(federation: LocalFederation, home: Path, *arguments: str) -> dict:
    """The flwr CLI of a local user: the internal port on loopback and the (public) federation CA."""
    server = _server(federation)
    home.mkdir(parents=True, exist_ok=True)
    connection = {"address": server.superlink.internal_address, "root-certificates": str(server.tls.ca_certificate)}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "local", "local": connection}}))
    completed = subprocess.run(
        [str(Path(sys.executable).with_name("flwr")), *arguments, "--format", "json"],
        env={"FLWR_HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(completed.stdout[completed.stdout.find("{") :])


def test_a_node_a_local_user_registers_is_flagged_and_never_sampled(
    federation: LocalFederation, tmp_path: Path
) -> None:
    server = _server(federation)
    keys = tmp_path / "keys"
    pki.create_node_key_pair(keys / "evil.key", keys / "evil.pub")
    registered = _local_flwr(federation, tmp_path / "home", "supernode", "register", str(keys / "evil.pub"), "local")
    assert registered.get("success"), registered  # Flower's Control API has no authentication: it works
    evil = int(registered["node-id"])
    output = tmp_path / "evil-supernode.log"
    node = rogue_supernode(
        address=server.superlink.internal_address,
        ca_certificate=server.tls.ca_certificate,
        private_key=keys / "evil.key",
        output=output.open("wb"),
    )
    try:

        def flagged() -> dict | None:
            return next((n for n in federation.status()["unenrolled_nodes"] if n["node_id"] == evil), None)

        wait_for(lambda: (flagged() or {}).get("status") == "online", timeout=60, what=f"node {evil} online")
        shown = cli([FEDMED, "status", "--server", str(federation.server_config)]).stdout
        assert "NOT ENROLLED" in shown and str(evil) in shown
        completed = federation.run(run_config(federation, "enrolled-only", train={"rounds": 1}), "--wait")
        run_dir = Path(re.search(r"run directory: (\S+)", completed.stdout).group(1))
        rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
        assert [row["sites_trained"] for row in rounds] == [sorted(federation.sites)]
        assert node.poll() is None, output.read_text()  # it was connected the whole time
        assert "[RUN" not in output.read_text(), "the outsider's node received a message"
        assert flagged() is not None
    finally:
        node.kill()
        node.wait()
        flower_cli.unregister_node(server, evil)
    assert all(n["node_id"] != evil for n in federation.status()["unenrolled_nodes"])


def test_the_firewall_leaves_the_internal_port_to_the_coordinators_account(federation: LocalFederation) -> None:
    missing = None
    if os.geteuid() != 0:
        missing = "installing nftables rules needs root; run as root to test 'fedmed server firewall --install'"
    elif shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
        missing = "nft is not installed (apt install nftables); the firewall cannot be tried here"
    if missing is not None:
        if os.environ.get("FEDMED_REQUIRE_NFTABLES") == "1":
            pytest.fail(f"{missing} (FEDMED_REQUIRE_NFTABLES=1 makes this a failure, not a skip)")
        pytest.skip(missing)
    server = _server(federation)
    local_user = 54321  # an account with no rights: any local user of the coordinator host
    probe = f"import socket; socket.create_connection(('127.0.0.1', {server.superlink.internal_port}), timeout=5)"

    def reaches(uid: int) -> bool:
        return (
            subprocess.run(["/usr/bin/python3", "-c", probe], user=uid, group=uid, capture_output=True).returncode == 0
        )

    assert reaches(local_user), "without the firewall any local account reaches the Control API"
    command = [FEDMED, "server", "firewall", str(federation.server_config)]
    cli([*command, "--install"])
    try:
        assert not reaches(local_user)
        assert reaches(os.getuid())
        assert flower_cli.list_nodes(server), "the coordinator's own tools still reach the SuperLink"
        assert _post(federation, "/v1/fleet/get-run", content=b"") == 401, "and the sites, through the proxy"
    finally:
        cli([*command, "--remove"])
    assert reaches(local_user)


# 8. Owner-only files --------------------------------------------------------------------------------------
def test_the_coordinators_state_logs_and_runs_are_owner_only(federation: LocalFederation) -> None:
    server = _server(federation)
    if not any(server.runs.glob("*/rounds.jsonl")):
        federation.run(run_config(federation, "private", train={"rounds": 1}), "--wait")
    folders = [server.superlink.database.parent, server.superlink.log_file.parent, server.runs]
    exposed = [
        f"{path} {oct(path.stat().st_mode & 0o777)}"
        for folder in folders
        for path in [folder, *folder.rglob("*")]
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]
    assert not exposed, exposed
    assert (server.superlink.database).exists() and any(server.runs.glob("*/report.html"))


# 14. The SuperLink on loopback only; an app the coordinator did not approve ------------------------------------------
def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((_address(address), int(port, 16)))
    return found


def _address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # /proc prints each 32-bit word in host order
    return str(ipaddress.IPv6Address(b"".join(words)))


def test_the_superlink_listens_on_loopback_only(federation: LocalFederation) -> None:
    server = _server(federation)
    sockets = _listening(_superlink_pid(federation))
    assert ("127.0.0.1", server.superlink.internal_port) in sockets, sockets
    assert all(address in ("127.0.0.1", "::1") for address, _ in sockets), sockets
    assert server.superlink.port not in {port for _, port in sockets}, "the public port is the proxy's"


def test_the_coordinator_refuses_an_app_it_has_not_approved(federation: LocalFederation) -> None:
    server = _server(federation)
    original = federation.server_config.read_text()
    log_offset = server.superlink.log_file.stat().st_size
    federation.edit_server(approved_apps=["cd" * 32])
    try:
        completed = federation.run(run_config(federation, "unapproved", train={"rounds": 1}), "--wait", check=False)
    finally:
        federation.server_config.write_text(original)
    assert completed.returncode != 0, completed.stdout
    run_dir = Path(re.search(r"run directory: (\S+)", completed.stdout).group(1))
    assert "finished:failed" in completed.stdout
    log = _new_lines(server.superlink.log_file, log_offset)
    assert any(f"refused app {app_digest()}" in line for line in log), "\n".join(log[-30:])
    # The ServerApp never ran: it wrote nothing and asked no site anything.
    assert not (run_dir / "rounds.jsonl").exists() and not (run_dir / "metrics.jsonl").exists()
    assert (json.loads((run_dir / STATUS_FILE).read_text()) if (run_dir / STATUS_FILE).exists() else {}).get(
        "state"
    ) != "running"


# 11. A run the coordinator stopped ----------------------------------------------------------------------------
def test_a_run_stopped_by_the_coordinator_says_so(federation: LocalFederation) -> None:
    run_dir = federation.submit(run_config(federation, "to-stop", train={"rounds": 30}))

    def state() -> dict:
        return next(run for run in federation.status()["runs"] if run["run"] == run_dir.name)

    wait_for(lambda: state()["state"] == "running", timeout=120, what="the run to start")
    stopped = cli([FEDMED, "stop", run_dir.name, "--server", str(federation.server_config)])
    assert "stopped" in stopped.stdout
    wait_for(lambda: state()["state"] not in ("running", "submitted"), timeout=120, what="the run to end")
    entry = state()
    assert entry["state"] == "interrupted" and entry["reason"].startswith("stopped by the coordinator"), entry
    shown = cli([FEDMED, "status", "--server", str(federation.server_config)]).stdout
    assert "stopped by the coordinator" in shown
