"""`fedmed site start` refusing a kit it cannot run with: exit code 2, the fix in the message, and the
site's folder exactly as it was (no ledger, anchor or audit log born of a start that never ran)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import one_site_data
from typer.testing import CliRunner

from fedmed.cli.site import site_app
from fedmed.config import load_site_config, read_toml
from fedmed.deploy.local import _edit_toml, free_port
from fedmed.deploy.workspace import DEFAULT_RUNTIME_PORT, Workspace, provision

DIGEST = "ab" * 32


def _provision(root: Path, *, port: int) -> Workspace:
    return provision(
        root, federation="f", addresses=["127.0.0.1"], port=port, sites=["a"], site_keys=True, app_digest=DIGEST
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_site_data(tmp_path_factory.mktemp("data"))


class _TlsServer:
    """A real TLS endpoint with the workspace's server certificate, at the address the kit names: the
    site's server check talks to it as to the coordinator's proxy."""

    def __init__(self, workspace: Workspace, port: int) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls = workspace.server_dir / "tls"
        context.load_cert_chain(tls / "server.crt", tls / "server.key")
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(connection, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def kit(tmp_path: Path, data: Path) -> Iterator[Path]:
    port = free_port()
    workspace = _provision(tmp_path / "fed", port=port)
    kit = workspace.kit("a")
    _edit_toml(kit / "site.toml", {"data": str(data), "daemon": {"runtime_port": free_port()}})
    server = _TlsServer(workspace, port)
    try:
        yield kit
    finally:
        server.close()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _other_ca(tmp_path: Path) -> Workspace:
    return _provision(tmp_path / "other", port=free_port())


def _missing_node_key(kit: Path, tmp_path: Path, held: contextlib.ExitStack) -> str:
    (kit / "keys" / "a.key").unlink()
    return "a.key"


def _missing_tls_key(kit: Path, tmp_path: Path, held: contextlib.ExitStack) -> str:
    (kit / "keys" / "a-tls.key").unlink()
    return "a-tls.key"


def _wrong_ca(kit: Path, tmp_path: Path, held: contextlib.ExitStack) -> str:
    shutil.copyfile(_other_ca(tmp_path).ca_certificate, kit / "ca.crt")
    return "ask the coordinator for the federation's ca.crt"


def _certificate_from_another_ca(kit: Path, tmp_path: Path, held: contextlib.ExitStack) -> str:
    other = _other_ca(tmp_path).kit("a") / "keys"
    for name in ("a.crt", "a-tls.key"):
        shutil.copyfile(other / name, kit / "keys" / name)
    return "a.crt"


def _runtime_port_in_use(kit: Path, tmp_path: Path, held: contextlib.ExitStack) -> str:
    port = load_site_config(kit / "site.toml").daemon.runtime_port
    held.enter_context(socket.create_server(("127.0.0.1", port)))  # another daemon's runtime API on this machine
    return f"daemon.runtime_port {port} on 127.0.0.1 is in use"


@pytest.mark.parametrize(
    "fault", [_missing_node_key, _missing_tls_key, _wrong_ca, _certificate_from_another_ca, _runtime_port_in_use]
)
def test_a_refused_start_leaves_the_site_folder_as_it_was(kit: Path, tmp_path: Path, fault) -> None:
    with contextlib.ExitStack() as held:
        expected = fault(kit, tmp_path, held)
        before = _files(kit)
        result = CliRunner().invoke(site_app, ["start", str(kit / "site.toml")])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert _files(kit) == before, "a refused start wrote to the site's folder"
    assert not (kit / "state").exists() and not (kit / "logs").exists()


def test_provisioned_kits_have_their_own_runtime_ports_and_none_of_the_coordinators(tmp_path: Path) -> None:
    workspace = provision(
        tmp_path / "fed",
        federation="f",
        addresses=["127.0.0.1"],
        port=DEFAULT_RUNTIME_PORT + 1,  # the coordinator on the ports the kits would otherwise start at
        sites=["a", "b", "c"],
        site_keys=False,
        app_digest=DIGEST,
    )
    ports = [read_toml(workspace.kit(site) / "site.toml")["daemon"]["runtime_port"] for site in ("a", "b", "c")]
    assert len(set(ports)) == 3
    assert not set(ports) & {DEFAULT_RUNTIME_PORT + 1, DEFAULT_RUNTIME_PORT + 2}
