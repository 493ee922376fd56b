"""A federation workspace: the CA, the coordinator's server folder and one kit per site.

WORKSPACE/
  ca/ca.key, ca/ca.crt            the federation's CA (keep the key offline)
  server/server.toml              the coordinator's config (fedmed server start)
  server/tls/                     CA certificate, server certificate and key
  server/site-keys/<site>.pub     public keys allowed to connect (node authentication)
  sites/<site>/                   the kit handed to each site: site.toml, ca.crt, README.md,
                                  and keys/ unless the site makes its own key pair
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedmed.core.errors import FedmedError

from . import pki

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
        "superlink": {"host": "0.0.0.0", "port": port, "public_address": public_address},
    }
    workspace.server_config.write_text(_header("coordinator", federation) + tomli_w.dumps(server_config))
    for index, site in enumerate(sites):
        write_site_kit(
            workspace,
            site=site,
            public_address=public_address,
            with_keys=site_keys,
            app_digest=app_digest,
            runtime_port=DEFAULT_RUNTIME_PORT + index,
        )
    return workspace


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
    site_config = {
        "name": site,
        "data": f"/data/fedmed/{site}",
        "state_dir": "state",
        "private_key": f"keys/{site}.key",
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


def _header(kind: str, name: str) -> str:
    return f"# fedmed {kind} config for '{name}', written by 'fedmed provision'. Paths are relative to this file.\n"


def _kit_readme(site: str, *, with_keys: bool) -> str:
    keys = (
        f"`keys/{site}.key` is this site's private key: it authenticates the site to the coordinator. Keep it here\n"
        f"(chmod 600) and never send it anywhere.\n"
        if with_keys
        else f"Make this site's key pair here, then send ONLY the public key to the coordinator:\n\n"
        f"    fedmed site keygen keys --name {site}\n"
        f"    # send keys/{site}.pub; the private key never leaves this machine\n"
    )
    return f"""# fedmed site kit: {site}

{keys}
1. Set `data` in `site.toml` to your data folder, then check it: `fedmed site check /path/to/data`
2. Start the site daemon: `fedmed site start site.toml` (or install `fedmed-site.service`, see the
   fedmed repository's `sites/RUNBOOK.md`).
3. The daemon runs only the app digests listed in `approved_apps`. A refused app is logged with its
   digest; approve it with `fedmed site approve site.toml DIGEST` after checking it with the coordinator.
"""
