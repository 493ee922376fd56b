"""Which sites may connect: `fedmed server add-site` and `fedmed server remove-site`, at the coordinator.

A site is enrolled by two files in the server folder: its node public key (`site-keys/<site>.pub`,
registered with the SuperLink) and its TLS client certificate (`site-certs/<site>.crt`, in the front
proxy's allow-list). Removing a site deletes both, reloads the proxy (its connections are refused from
then on) and unregisters its node.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from fedmed.config import ServerConfig
from fedmed.config.sites import SITE_NAME_PATTERN
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger

from . import flower_cli, pki, proxy, site_certs
from .server import register_sites, site_nodes_file


class EnrollmentError(FedmedError):
    """A site cannot be added or removed as asked."""


def add_site(
    server: ServerConfig,
    *,
    site: str,
    public_key: Path,
    csr: Path | None = None,
    certificate: Path | None = None,
    certificate_out: Path | None = None,
) -> Path | None:
    """Enroll a site's node key and client certificate; returns the certificate signed from `csr`, if any."""
    _check_name(site)
    line = pki.load_public_key_line(public_key)
    if csr is not None and certificate is not None:
        raise EnrollmentError("give either --csr (sign the site's request) or --certificate (one already issued)")
    _refuse_retired_key(server, site=site, public_key=public_key)
    signed = None
    if csr is not None:
        issued = site_certs.sign_request(
            request_path=csr, site=site, ca_key_path=server.ca_key, ca_certificate_path=server.tls.ca_certificate
        )
        signed = certificate_out or Path(csr).with_suffix(".crt")
        pki.write_certificate(signed, issued)
        certificate = signed
    if certificate is not None:
        checked = pki.check_certificate_validity(certificate)
        site_certs.check_issued_by(checked, certificate_path=certificate, ca_certificate_path=server.tls.ca_certificate)
        target = server.site_certificates / f"{site}.crt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(certificate, target)
    elif not (server.site_certificates / f"{site}.crt").exists():
        logger.warning(
            "site %s has no enrolled client certificate: the proxy will refuse it until you add its request "
            "with 'fedmed server add-site ... --csr %s.csr'",
            site,
            site,
        )
    key_file = server.site_keys / f"{site}.pub"
    write_text_atomic(key_file, line + "\n", private=False)
    proxy.reload(server)
    return signed


def register_now(server: ServerConfig, *, site: str) -> int:
    """Register the site's key with the running SuperLink; returns its node id (raises ControlApiError
    when the server is down, RetiredKeyError for the key of a removed site)."""
    return register_sites(server, [server.site_keys / f"{site}.pub"], strict=True)[site]


def _refuse_retired_key(server: ServerConfig, *, site: str, public_key: Path) -> None:
    """Flower keeps a removed site's key as retired and refuses it ever after: say so before anything is
    written or signed. With the server down this is checked when it starts (the site is then left out)."""
    try:
        node = flower_cli.node_of_key(server, public_key=public_key)
    except flower_cli.ServerNotRunningError:
        return
    if node is not None and node["status"] == "unregistered":
        raise EnrollmentError(
            f"cannot add site '{site}' with {public_key}: that key belonged to node {node['node-id']}, removed "
            f"with 'fedmed server remove-site', and Flower's SuperLink never accepts a retired key again. Ask "
            f"the site's admin for a new key and certificate request ('fedmed site keygen keys --name {site}') "
            f"and add those: 'fedmed server add-site SERVER_TOML {site} keys/{site}.pub --csr keys/{site}.csr'"
        )


def remove_site(server: ServerConfig, *, site: str) -> list[str]:
    """Revoke a site; returns what was done, one line each, for the admin."""
    _check_name(site)
    key_file = server.site_keys / f"{site}.pub"
    certificate = server.site_certificates / f"{site}.crt"
    nodes = _site_nodes(server)
    if not key_file.exists() and not certificate.exists() and site not in nodes:
        raise EnrollmentError(
            f"site '{site}' is not enrolled (nothing in {server.site_keys} or {server.site_certificates}); "
            f"check the name against 'fedmed status'"
        )
    done = []
    certificate.unlink(missing_ok=True)
    key_file.unlink(missing_ok=True)
    if proxy.reload(server):
        done.append(f"site {site}: client certificate revoked; the proxy refuses its connections from now on")
    else:
        done.append(f"site {site}: client certificate removed; the proxy (not running) refuses it when it starts")
    if site in nodes:
        try:
            flower_cli.unregister_node(server, nodes[site])
        except flower_cli.ControlApiError as error:
            done.append(
                f"site {site}: node {nodes[site]} is still registered with the SuperLink ({error}); run this "
                f"command again while the server runs to unregister it"
            )
            return done
        del nodes[site]
        write_text_atomic(site_nodes_file(server), json.dumps(nodes, indent=2), private=False)
        done.append(f"site {site}: node unregistered from the SuperLink")
    return done


def _site_nodes(server: ServerConfig) -> dict[str, int]:
    path = site_nodes_file(server)
    return {name: int(node) for name, node in json.loads(path.read_text()).items()} if path.exists() else {}


def _check_name(site: str) -> None:
    if not re.match(SITE_NAME_PATTERN, site):
        raise EnrollmentError(f"'{site}' is not a site name: letters, digits, '-' and '_' (as in site.toml's 'name')")
