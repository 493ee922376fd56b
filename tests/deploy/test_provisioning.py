"""Provisioning and certificates, without starting any process."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509

from fedmed.config import load_server_config, load_site_config
from fedmed.core.errors import ConfigError
from fedmed.deploy import pki
from fedmed.deploy.preflight import PreflightError, check_server
from fedmed.deploy.site import approve
from fedmed.deploy.workspace import WorkspaceError, provision

REPO = Path(__file__).resolve().parents[2]
DIGEST = "ab" * 32


@pytest.fixture
def workspace(tmp_path: Path):
    return provision(
        tmp_path / "fed",
        federation="hospitals",
        addresses=["fed.example.org", "10.0.0.5", "127.0.0.1"],
        port=8443,
        sites=["site-a", "site-b"],
        site_keys=True,
        app_digest=DIGEST,
    )


def test_workspace_layout_and_configs(workspace) -> None:
    server = load_server_config(workspace.server_config)
    assert server.superlink.public_address == "fed.example.org:8443" and server.approved_apps == [DIGEST]
    assert sorted(p.name for p in server.site_keys.iterdir()) == ["site-a.pub", "site-b.pub"]
    site = load_site_config(workspace.kit("site-a") / "site.toml")
    assert site.server.address == "fed.example.org:8443" and site.approved_apps == [DIGEST]
    assert site.server.ca_certificate.read_bytes() == workspace.ca_certificate.read_bytes()
    assert load_site_config(workspace.kit("site-b") / "site.toml").daemon.runtime_port != site.daemon.runtime_port
    assert check_server(server) == sorted(server.site_keys.glob("*.pub"))


def test_private_keys_are_private_and_never_in_the_server_folder(workspace) -> None:
    for key in [
        workspace.ca_key,
        workspace.server_dir / "tls" / "server.key",
        workspace.kit("site-a") / "keys" / "site-a.key",
    ]:
        assert os.stat(key).st_mode & 0o777 == 0o600, key
    assert not list(workspace.server_dir.rglob("site-*.key"))
    public = (workspace.site_keys / "site-a.pub").read_text().strip()
    assert pki.check_node_private_key(workspace.kit("site-a") / "keys" / "site-a.key") == public


def test_server_certificate_is_signed_by_the_ca_and_names_every_address(workspace) -> None:
    certificate = pki.load_certificate(workspace.server_dir / "tls" / "server.crt")
    ca = pki.load_certificate(workspace.ca_certificate)
    certificate.verify_directly_issued_by(ca)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fed.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]


def test_an_existing_workspace_is_never_overwritten(workspace) -> None:
    ca_before = workspace.ca_key.read_bytes()
    with pytest.raises(WorkspaceError, match="already holds a federation"):
        provision(
            workspace.root,
            federation="x",
            addresses=["127.0.0.1"],
            port=8000,
            sites=[],
            site_keys=True,
            app_digest=DIGEST,
        )
    assert workspace.ca_key.read_bytes() == ca_before


def test_expired_and_not_yet_valid_certificates_are_refused(tmp_path: Path) -> None:
    ca_key, ca = pki.create_ca(common_name="test")
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    _, old = pki.create_server_certificate(
        ca_key=ca_key, ca_certificate=ca, addresses=["127.0.0.1"], days=30, valid_from=past
    )
    pki.write_certificate(tmp_path / "old.crt", old)
    with pytest.raises(pki.CertificateError, match="expired on 2020-01-31"):
        pki.check_certificate_validity(tmp_path / "old.crt")
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2)
    _, early = pki.create_server_certificate(
        ca_key=ca_key, ca_certificate=ca, addresses=["127.0.0.1"], valid_from=future
    )
    pki.write_certificate(tmp_path / "early.crt", early)
    with pytest.raises(pki.CertificateError, match="check this machine's clock"):
        pki.check_certificate_validity(tmp_path / "early.crt")


def test_a_readable_private_key_is_refused(workspace) -> None:
    key = workspace.kit("site-a") / "keys" / "site-a.key"
    key.chmod(0o644)
    with pytest.raises(pki.CertificateError, match=f"run 'chmod 600 {key}'"):
        pki.check_node_private_key(key)


def test_a_server_key_from_another_workspace_is_refused(workspace, tmp_path: Path) -> None:
    other = provision(
        tmp_path / "other",
        federation="o",
        addresses=["127.0.0.1"],
        port=8000,
        sites=[],
        site_keys=True,
        app_digest=DIGEST,
    )
    server = load_server_config(workspace.server_config)
    server.tls.private_key = other.server_dir / "tls" / "server.key"
    with pytest.raises(PreflightError, match="does not belong to"):
        check_server(server)


def _outside_approved_apps(text: str) -> list[str]:
    return [line for line in text.splitlines() if "approved_apps" not in line and line.strip()[:1] not in ('"', "]")]


def test_approving_an_app_digest(workspace) -> None:
    config = workspace.kit("site-a") / "site.toml"
    config.chmod(0o600)  # an admin's restriction survives the rewrite
    # So do the admin's comments and layout: approving edits one value, not the file.
    config.write_text(config.read_text().replace('data = "', '# our PACS export, refreshed nightly\ndata = "', 1))
    before = config.read_text()
    assert approve(config, "cd" * 32) == [DIGEST, "cd" * 32]
    after = config.read_text()
    assert "# our PACS export, refreshed nightly\n" in after
    assert _outside_approved_apps(after) == _outside_approved_apps(before)
    assert config.stat().st_mode & 0o777 == 0o600
    assert approve(config, "cd" * 32) == [DIGEST, "cd" * 32]
    assert load_site_config(config).approved_apps == [DIGEST, "cd" * 32]
    with pytest.raises(ConfigError, match="is not an app digest"):
        approve(config, "not-a-digest")


@pytest.mark.parametrize("example", ["server/server.example.toml", "sites/site.example.toml"])
def test_the_repository_examples_are_valid_configs(example: str) -> None:
    loader = load_server_config if example.startswith("server") else load_site_config
    loader(REPO / example)
