"""Checks before a daemon starts, each failing with the file or setting to fix."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedmed.config import ServerConfig, SiteConfig
from fedmed.core.errors import FedmedError
from fedmed.core.files import unwritable_reason
from fedmed.core.log import logger
from fedmed.site.ledger_guard import open_site_ledger

from . import pki, site_certs
from .processes import split_address


class PreflightError(FedmedError):
    """The daemon cannot start with this configuration."""


def check_server(server: ServerConfig) -> list[Path]:
    """Certificates valid, key matching; returns the site public keys to register."""
    pki.check_certificate_validity(server.tls.ca_certificate)
    certificate = pki.check_certificate_validity(server.tls.certificate)
    try:
        key = serialization.load_pem_private_key(server.tls.private_key.read_bytes(), password=None)
    except (FileNotFoundError, ValueError) as error:
        raise PreflightError(f"{server.tls.private_key}: cannot read the server's private key ({error})") from None
    if key.public_key().public_numbers() != certificate.public_key().public_numbers():
        raise PreflightError(
            f"{server.tls.private_key} does not belong to {server.tls.certificate}; copy both from the same "
            f"'fedmed provision' workspace"
        )
    keys = sorted(server.site_keys.glob("*.pub")) if server.site_keys.is_dir() else []
    for key_file in keys:
        pki.load_public_key_line(key_file)
    if not keys:
        logger.warning(
            "no site keys in %s: no site can connect until one is added with 'fedmed server add-site'", server.site_keys
        )
    return keys


def check_site(site: SiteConfig) -> str:
    """Everything the site daemon needs; returns the site's public key line.

    Every check that can refuse runs before anything is written: a refused start leaves the state
    folder as it found it (no ledger, anchor or audit log born of a start that never ran).
    """
    # fedmed.data loads torch (seconds): only the site's start needs it, not every command that imports deploy.
    from fedmed.data import validate_site

    pki.check_certificate_validity(site.server.ca_certificate)
    public_key = pki.check_node_private_key(site.private_key)
    if not site.data.exists():
        raise PreflightError(
            f"site {site.name}: data folder {site.data} does not exist; set 'data' in the site "
            f"config to the folder that holds dataset.json"
        )
    report = validate_site(site.data)
    if not report.ok:
        raise PreflightError(f"site {site.name}: the data at {site.data} is not usable:\n{report.summary()}")
    check_server_certificate(site.server.address, ca_certificate=site.server.ca_certificate)
    # After the server check: a kit with the wrong ca.crt is reported as such, not as a foreign certificate.
    site_certs.check_client_certificate(
        certificate_path=site.client_certificate,
        key_path=site.client_key,
        ca_certificate_path=site.server.ca_certificate,
    )
    # After the kit's checks: a wrong kit is reported as such even while this site's daemon runs.
    check_runtime_port(site)
    # Last, as they write: the state folder, then the ledger (created on the site's first start).
    reason = unwritable_reason(site.state_dir)
    if reason is not None:
        raise PreflightError(f"site {site.name}: cannot write to state_dir {site.state_dir} ({reason})")
    check_site_ledger(site)
    return public_key


def check_runtime_port(site: SiteConfig) -> None:
    """The loopback port between the site's SuperNode and its ClientApps is free (another site on this
    machine, or a daemon of this site still running, would take the other's work or fail to start)."""
    port = site.daemon.runtime_port
    with socket.socket() as probe:
        # As a server binds it: a port held only by connections closing down (TIME_WAIT) counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise PreflightError(
                f"site {site.name}: daemon.runtime_port {port} on 127.0.0.1 is in use ({error.strerror}); another "
                "site daemon on this machine, or this site's daemon already running, holds it. Stop that daemon, "
                "or give this site a port of its own in the [daemon] section of its site config"
            ) from None


def check_site_ledger(site: SiteConfig) -> None:
    """The site's privacy ledger is the one it remembers (created on the site's first start)."""
    # fedmed.site.privacy loads torch (seconds): only the site's start needs it, not every deploy command.
    from fedmed.site.privacy import ledger_path

    open_site_ledger(ledger_path(site.state_dir)).close()


def check_server_certificate(address: str, *, ca_certificate: Path, timeout: float = 5.0, quiet: bool = False) -> bool:
    """True if the server answered with a certificate the CA vouches for; False if it is unreachable.

    An untrusted, expired or wrongly named certificate raises: the site must not talk to that server.
    """
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca_certificate))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLCertVerificationError as error:
        raise PreflightError(
            f"the server at {address} presented a certificate that {ca_certificate} does not accept "
            f"({error.verify_message}); ask the coordinator for the federation's ca.crt and check the address"
        ) from None
    except (OSError, ssl.SSLError) as error:
        if not quiet:
            logger.warning("server %s not reachable yet (%s); the site will keep trying to connect", address, error)
        return False
