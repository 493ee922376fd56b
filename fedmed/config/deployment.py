"""Configs of a deployed federation: the coordinator's server and each hospital's site daemon.

Relative paths are taken relative to the config file, so a kit folder can be moved as a whole.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from .base import StrictModel
from .loader import read_toml, validate
from .privacy import SitePrivacyPolicy
from .sites import SITE_NAME_PATTERN

DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def _digests(values: list[str]) -> list[str]:
    for value in values:
        if not DIGEST_PATTERN.match(value):
            raise ValueError(
                f"'{value}' is not an app digest (64 lowercase hex characters, as printed by 'fedmed app digest')"
            )
    return values


class SuperLinkSettings(StrictModel):
    host: str = Field("127.0.0.1", description="address the public proxy listens on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535, description="the public port: the only one a firewall opens")
    internal_port: int | None = Field(
        None, ge=1, le=65535, description="loopback port of the SuperLink itself (default: port + 1); never exposed"
    )
    public_address: str = Field(description="host:port that sites connect to; must be in the certificate's SANs")
    database: Path = Path("state/superlink.db")
    log_file: Path = Path("logs/superlink.log")
    max_request_mb: float | None = Field(
        None,
        gt=0,
        description="largest request body the public port accepts, in MiB (default: what Flower's largest "
        "message part needs, ~16 MiB, whatever the model's size); raise it only if the log shows 413s from sites",
    )

    @model_validator(mode="after")
    def _internal_port(self) -> SuperLinkSettings:
        if self.internal_port is None:
            self.internal_port = self.port + 1 if self.port < 65535 else self.port - 1
        if self.internal_port == self.port:
            raise ValueError(f"superlink.internal_port must differ from superlink.port ({self.port})")
        return self

    @property
    def internal_address(self) -> str:
        """Where the coordinator's own tools reach the SuperLink: loopback only."""
        return f"127.0.0.1:{self.internal_port}"


class TlsFiles(StrictModel):
    ca_certificate: Path = Path("tls/ca.crt")
    certificate: Path = Path("tls/server.crt")
    private_key: Path = Path("tls/server.key")


class ServerConfig(StrictModel):
    federation: str = Field(pattern=SITE_NAME_PATTERN)
    superlink: SuperLinkSettings
    tls: TlsFiles = Field(default_factory=TlsFiles)
    site_keys: Path = Field(Path("site-keys"), description="folder of <site>.pub files allowed to connect")
    site_certificates: Path = Field(
        Path("site-certs"), description="folder of <site>.crt client certificates the proxy lets in"
    )
    ca_key: Path = Field(
        Path("../ca/ca.key"), description="the federation CA's key, needed only to sign sites' certificate requests"
    )
    approved_apps: list[str] = Field(default_factory=list, description="app digests the coordinator will run")
    runs: Path = Path("runs")

    _check_digests = field_validator("approved_apps")(_digests)

    @property
    def site_nodes_file(self) -> Path:
        """The enrolment list: site -> node id of every site key registered with the SuperLink."""
        return self.superlink.database.parent / "site-nodes.json"

    @property
    def proxy_dir(self) -> Path:
        """The front proxy's config, allow-list and access log."""
        return self.superlink.database.parent / "proxy"

    def resolve(self, base: Path) -> ServerConfig:
        resolved = self.model_copy(deep=True)
        resolved.superlink.database = _under(base, self.superlink.database)
        resolved.superlink.log_file = _under(base, self.superlink.log_file)
        resolved.tls.ca_certificate = _under(base, self.tls.ca_certificate)
        resolved.tls.certificate = _under(base, self.tls.certificate)
        resolved.tls.private_key = _under(base, self.tls.private_key)
        resolved.site_keys = _under(base, self.site_keys)
        resolved.site_certificates = _under(base, self.site_certificates)
        resolved.ca_key = _under(base, self.ca_key)
        resolved.runs = _under(base, self.runs)
        return resolved


class ServerConnection(StrictModel):
    address: str = Field(description="the coordinator's SuperLink, host:port")
    ca_certificate: Path = Path("ca.crt")


class SiteDaemonSettings(StrictModel):
    runtime_port: int = Field(9094, ge=1, le=65535, description="loopback port for this site's ClientApp processes")
    log_file: Path = Path("logs/site.log")
    warm_start: bool = Field(True, description="start ClientApps from a process with torch and MONAI preloaded")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per ClientApp (default: all cores)")
    poll_interval_s: float = Field(
        0.25, ge=0.05, le=60, description="how often an idle site asks the server for work (Flower's default: 3 s)"
    )
    revoked_exit_after_s: float = Field(
        600,
        ge=1,
        description="how long the daemon keeps retrying, slowly, after the coordinator's proxy turned its "
        "certificate away (revoked with 'fedmed server remove-site', or not enrolled) before it stops with exit code 2",
    )


class SiteConfig(StrictModel):
    name: str = Field(pattern=SITE_NAME_PATTERN)
    data: Path = Field(description="the site's data folder (dataset.json) or MedMNIST .npz")
    state_dir: Path = Field(Path("state"), description="site-local parameters and other state, never sent")
    server: ServerConnection
    private_key: Path = Field(description="this site's node-authentication private key (OpenSSH, EC P-384)")
    client_certificate: Path = Field(description="this site's TLS client certificate from the federation CA")
    client_key: Path = Field(description="the private key of client_certificate (PEM, chmod 600)")
    approved_apps: list[str] = Field(default_factory=list, description="app digests this site agrees to run")
    daemon: SiteDaemonSettings = Field(default_factory=SiteDaemonSettings)
    privacy: SitePrivacyPolicy = Field(default_factory=SitePrivacyPolicy)

    _check_digests = field_validator("approved_apps")(_digests)

    def resolve(self, base: Path) -> SiteConfig:
        resolved = self.model_copy(deep=True)
        resolved.data = _under(base, self.data)
        resolved.state_dir = _under(base, self.state_dir)
        resolved.server.ca_certificate = _under(base, self.server.ca_certificate)
        resolved.private_key = _under(base, self.private_key)
        resolved.client_certificate = _under(base, self.client_certificate)
        resolved.client_key = _under(base, self.client_key)
        resolved.daemon.log_file = _under(base, self.daemon.log_file)
        return resolved


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def load_server_config(path: Path) -> ServerConfig:
    path = Path(path)
    return validate(ServerConfig, read_toml(path), source=str(path)).resolve(path.resolve().parent)


def load_site_config(path: Path) -> SiteConfig:
    path = Path(path)
    return validate(SiteConfig, read_toml(path), source=str(path)).resolve(path.resolve().parent)
