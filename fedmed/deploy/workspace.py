"""A federation workspace: the CA, the coordinator's server folder and one kit per site.

WORKSPACE/
  ca/ca.key, ca/ca.crt            the federation's CA (keep the key offline)
  server/server.toml              the coordinator's config (fedmed server start)
  server/tls/                     CA certificate, server certificate and key
  server/site-keys/<site>.pub     public keys allowed to connect (node authentication)
  server/site-certs/<site>.crt    client certificates the front proxy lets in (mutual TLS)
  sites/<site>/                   the kit handed to each site: site.toml, ca.crt, README.md,
                                  and keys/ (node key, TLS key and certificate) unless the site
                                  makes its own keys ('fedmed site keygen')
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedmed.core.errors import FedmedError

from . import pki, site_certs

DEFAULT_RUNTIME_PORT = 9094


class WorkspaceError(FedmedError):
    """The workspace is missing, incomplete or would be overwritten."""


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def ca_certificate(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def server_dir(self) -> Path:
        return self.root / "server"

    @property
    def server_config(self) -> Path:
        return self.server_dir / "server.toml"

    @property
    def site_keys(self) -> Path:
        return self.server_dir / "site-keys"

    @property
    def site_certificates(self) -> Path:
        return self.server_dir / "site-certs"

    def kit(self, site: str) -> Path:
        return self.root / "sites" / site


def provision(
    root: Path,
    *,
    federation: str,
    addresses: list[str],
    port: int,
    sites: list[str],
    site_keys: bool,
    app_digest: str,
    listen: str | None = None,
) -> Workspace:
    """Create the workspace; refuses to touch an existing one (it holds the CA key)."""
    workspace = Workspace(Path(root).resolve())
    if workspace.ca_key.exists():
        raise WorkspaceError(
            f"{workspace.root} already holds a federation (ca/ca.key exists); choose a new folder, or add sites "
            f"to this one with 'fedmed server add-site'"
        )
    if not addresses:
        raise WorkspaceError("give at least one --address the sites will use to reach the server (IP or DNS name)")
    duplicates = sorted({site for site in sites if sites.count(site) > 1})
    if duplicates:
        raise WorkspaceError(f"site names must be unique; {', '.join(duplicates)} given twice")

    ca_key, ca_certificate = pki.create_ca(common_name=f"fedmed {federation} CA")
    pki.write_private_key(workspace.ca_key, ca_key)
    pki.write_certificate(workspace.ca_certificate, ca_certificate)
    server_key, server_certificate = pki.create_server_certificate(
        ca_key=ca_key, ca_certificate=ca_certificate, addresses=addresses
    )
    tls = workspace.server_dir / "tls"
    pki.write_private_key(tls / "server.key", server_key)
    pki.write_certificate(tls / "server.crt", server_certificate)
    shutil.copyfile(workspace.ca_certificate, tls / "ca.crt")
    workspace.site_keys.mkdir(parents=True, exist_ok=True)

    public_address = f"{addresses[0]}:{port}"
    server_config = {
        "federation": federation,
        "approved_apps": [app_digest],
        "superlink": {"host": listen or listen_address(addresses), "port": port, "public_address": public_address},
    }
    workspace.server_config.write_text(_header("coordinator", federation) + tomli_w.dumps(server_config))
    for site, runtime_port in zip(sites, runtime_ports(len(sites), taken={port, port + 1}), strict=True):
        write_site_kit(
            workspace,
            site=site,
            public_address=public_address,
            with_keys=site_keys,
            app_digest=app_digest,
            runtime_port=runtime_port,
        )
    return workspace


def runtime_ports(count: int, *, taken: set[int]) -> list[int]:
    """One runtime port per site kit, each its own and none of the coordinator's (its public port and the
    SuperLink's internal one), so that sites, and a coordinator, can share one machine (a demo, a test lab)."""
    ports: list[int] = []
    candidate = DEFAULT_RUNTIME_PORT
    while len(ports) < count:
        if candidate not in taken:
            ports.append(candidate)
        candidate += 1
    return ports


def listen_address(addresses: list[str]) -> str:
    """Loopback when every address sites use is loopback (a one-machine federation), else every interface."""
    loopback = {"127.0.0.1", "localhost", "::1"}
    return "127.0.0.1" if set(addresses) <= loopback else "0.0.0.0"


def write_site_kit(
    workspace: Workspace,
    *,
    site: str,
    public_address: str,
    with_keys: bool,
    app_digest: str,
    runtime_port: int = DEFAULT_RUNTIME_PORT,
) -> Path:
    kit = workspace.kit(site)
    if kit.exists():
        raise WorkspaceError(f"{kit} exists already; remove it first to re-issue this site's kit")
    kit.mkdir(parents=True)
    shutil.copyfile(workspace.ca_certificate, kit / "ca.crt")
    if with_keys:
        pki.create_node_key_pair(kit / "keys" / f"{site}.key", kit / "keys" / f"{site}.pub")
        register_site_key(workspace, site=site, public_key=kit / "keys" / f"{site}.pub")
        certificate = site_certs.issue_client_certificate(
            ca_key_path=workspace.ca_key, ca_certificate_path=workspace.ca_certificate, key_dir=kit / "keys", site=site
        )
        enroll_site_certificate(workspace.site_certificates, site=site, certificate=certificate)
    site_config = {
        "name": site,
        "data": f"/data/fedmed/{site}",
        "state_dir": "state",
        "private_key": f"keys/{site}.key",
        "client_certificate": f"keys/{site}.crt",
        "client_key": f"keys/{site}-tls.key",
        "approved_apps": [app_digest],
        "server": {"address": public_address, "ca_certificate": "ca.crt"},
        # Distinct per kit so that several sites can share one machine (a demo, a test).
        "daemon": {"runtime_port": runtime_port, "log_file": "logs/site.log"},
    }
    (kit / "site.toml").write_text(_header("site", site) + tomli_w.dumps(site_config))
    (kit / "README.md").write_text(_kit_readme(site, with_keys=with_keys))
    return kit


def register_site_key(workspace: Workspace, *, site: str, public_key: Path) -> Path:
    """Allow a site's public key to connect (takes effect when the server starts or via add-site)."""
    line = pki.load_public_key_line(public_key)
    target = workspace.site_keys / f"{site}.pub"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(line + "\n")
    return target


def enroll_site_certificate(folder: Path, *, site: str, certificate: Path) -> Path:
    """Let a site's client certificate through the front proxy (read when it starts or reloads)."""
    target = Path(folder) / f"{site}.crt"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(certificate, target)
    return target


def _header(kind: str, name: str) -> str:
    return f"# fedmed {kind} config for '{name}', written by 'fedmed provision'. Paths are relative to this file.\n"


def _kit_readme(site: str, *, with_keys: bool) -> str:
    keys = (
        f"`keys/{site}.key` (node key) and `keys/{site}-tls.key` (TLS key of the client certificate\n"
        f"`keys/{site}.crt`) are this site's private keys: they authenticate the site to the coordinator. Keep\n"
        f"them here (chmod 600) and never send them anywhere.\n"
        if with_keys
        else f"Make this site's keys here, then send ONLY the public key and the certificate request to the\n"
        f"coordinator:\n\n"
        f"    fedmed site keygen keys --name {site}\n"
        f"    # send keys/{site}.pub and keys/{site}.csr; the private keys never leave this machine\n"
        f"    # put the certificate the coordinator sends back at keys/{site}.crt\n"
    )
    return f"""# fedmed site kit: {site}

{keys}
1. Set `data` in `site.toml` to your data folder, then check it: `fedmed site check /path/to/data`
2. Start the site daemon: `fedmed site start site.toml` (or install `fedmed-site.service`, see the
   site runbook, `sites/README.md` in the fedmed repository).
3. The daemon runs only the app digests listed in `approved_apps`. A refused app is logged with its
   digest; approve it with `fedmed site approve site.toml DIGEST` after checking it with the coordinator.
"""
