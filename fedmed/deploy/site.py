"""`fedmed site start`: the site's SuperNode and ClientApp executor, supervised."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import tomlkit

from fedmed.config import SiteConfig, load_site_config
from fedmed.config.deployment import DIGEST_PATTERN
from fedmed.core.errors import ConfigError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.flower.runtime import client_tls, executor, supernode
from fedmed.flower.wire import SITE_CONFIG

from . import preflight
from .processes import flower_environment, shared_secret
from .supervisor import Child, Diagnosis, Refusal, Supervisor

# What the SuperNode's log says when the coordinator refuses it. Flower sends the same public message
# whether the key is unknown or the node is still marked online, so only persistence tells them apart.
ACTIVATION_REFUSED = "Failed to activate SuperNode"
TLS_REFUSED = "[SSL"  # httpx: "[SSL: CERTIFICATE_VERIFY_FAILED]", "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]", ...
TLS_REJECTED = "400 Bad Request"  # nginx's answer to a missing certificate or one from another CA
# The proxy's answer to a certificate from the federation's CA that is not enrolled (fedmed.deploy.proxy):
# revoked with 'fedmed server remove-site', or never added. httpx: "Client error '403 Forbidden' for url ...".
NOT_ENROLLED = "'403 Forbidden'"
# While the coordinator still counts a dead node online, retry this often: the doubling backoff would
# otherwise overshoot the moment it lets the node in by up to twice the online window.
ONLINE_RETRY_S = 3.0
PRIVATE_UMASK = 0o077


def revocation(site: SiteConfig) -> Callable[[str], Refusal | None]:
    """The coordinator's proxy turning this site's certificate away: retried slowly, said once, given up on."""
    bound = site.daemon.revoked_exit_after_s
    refusal = Refusal(
        message=(
            f"the coordinator refuses this site's certificate ({site.client_certificate.name}; "
            f"HTTP 403 from {site.server.address}): it was revoked with 'fedmed server remove-site', or is not "
            "enrolled yet. Ask the coordinator to (re-)add this site ('fedmed server add-site'); this daemon stops "
            f"with exit code 2 if the refusal lasts {bound:.0f} s (daemon.revoked_exit_after_s)"
        ),
        retry_after_s=min(60.0, max(5.0, bound / 10)),
        give_up_after_s=bound,
    )
    return lambda output: refusal if NOT_ENROLLED in output else None


def refusal_diagnosis(site: SiteConfig, *, public_key: str) -> Callable[[str, float], Diagnosis | None]:
    """What a failed SuperNode start means for the admin, given its output and how long it has failed."""
    # A node killed without signing off stays online at the coordinator for two heartbeats.
    online_window_s = 2 * supernode.HEARTBEAT_INTERVAL_S
    unknown_key = (
        f"the coordinator does not know this site's key. Send the public key ({public_key[:40]}...; "
        f"'fedmed site keygen' wrote it next to {site.private_key.name}) to the coordinator, who registers it "
        f"with 'fedmed server add-site'; this daemon keeps trying meanwhile"
    )

    def diagnose(output: str, failing_for_s: float) -> Diagnosis | None:
        if ACTIVATION_REFUSED in output:
            if failing_for_s <= 2 * online_window_s:
                return Diagnosis(
                    "the coordinator refused to activate this site's node: it most likely still lists the site as "
                    f"online (a SuperNode that ended without signing off stays so for up to {online_window_s:.0f} s)",
                    retry_within_s=ONLINE_RETRY_S,
                )
            return Diagnosis(f"refused for {failing_for_s:.0f} s, longer than a dead node stays online: {unknown_key}")
        if TLS_REFUSED in output or TLS_REJECTED in output:
            return Diagnosis(
                f"the TLS connection to {site.server.address} failed: check that {site.server.ca_certificate.name} "
                f"is the federation's CA and that this site's certificate ({site.client_certificate.name}) is the "
                f"one the coordinator issued and has not been revoked ('fedmed server remove-site')"
            )
        return None

    return diagnose


def runtime_secret(site: SiteConfig) -> Path:
    """Shared secret between this site's SuperNode and its executor: the runtime API takes no other callers."""
    return shared_secret(site.state_dir / "runtime.secret")


def supernode_command(site: SiteConfig, config_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        supernode.__name__,
        str(site.daemon.poll_interval_s),
        "--superlink",
        site.server.address,
        "--root-certificates",
        str(site.server.ca_certificate),
        "--auth-supernode-private-key",
        str(site.private_key),
        # Mutual TLS with the coordinator's proxy (fedmed.flower.runtime.client_tls): not Flower options.
        client_tls.CERTIFICATE_OPTION,
        str(site.client_certificate),
        client_tls.KEY_OPTION,
        str(site.client_key),
        "--node-config",
        f"{SITE_CONFIG}='{config_file}'",
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(site.daemon.runtime_port),
        "--superexec-auth-secret-file",
        str(runtime_secret(site)),
    ]


def executor_command(site: SiteConfig, config_file: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        executor.__name__,
        "--role",
        "site",
        "--config",
        str(config_file),
        "--runtime-api-address",
        f"127.0.0.1:{site.daemon.runtime_port}",
        "--secret-file",
        str(runtime_secret(site)),
    ]
    return command if site.daemon.warm_start else [*command, "--cold"]


def start(config_file: Path) -> int:
    """Run until stopped (returns 0); a config fault ends it before, and a revoked certificate after
    `daemon.revoked_exit_after_s`, with exit code 2."""
    config_file = Path(config_file).resolve()
    site = load_site_config(config_file)
    # The ledger, audit log, kept state, Flower's files and the log are the site's alone: everything this
    # process and its children create is owner-only.
    os.umask(PRIVATE_UMASK)
    public_key = preflight.check_site(site)
    env = flower_environment(flower_home=site.state_dir / "flwr-home")
    supervisor = Supervisor(
        name=f"site {site.name}",
        children=[
            Child(
                "flower-supernode",
                supernode_command(site, config_file),
                env,
                site.daemon.log_file,
                diagnose=refusal_diagnosis(site, public_key=public_key),
                refusal=revocation(site),
            ),
            # Flower's executor looks for new ClientApp work every second unless told otherwise.
            Child(
                "ClientApp executor",
                executor_command(site, config_file),
                {**env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(site.daemon.poll_interval_s)},
                site.daemon.log_file,
            ),
        ],
    )
    logger.info(
        "site %s: connecting to %s; data %s; log %s", site.name, site.server.address, site.data, site.daemon.log_file
    )
    return supervisor.run()  # GAVE_UP (2) after a lasting revocation


def approve(config_file: Path, digest: str) -> list[str]:
    """Add an app digest to the site's approved list (takes effect with the next message)."""
    if not DIGEST_PATTERN.match(digest):
        raise ConfigError(f"'{digest}' is not an app digest: 64 lowercase hex characters, as printed in the refusal")
    load_site_config(config_file)  # refuse to edit a config that does not load
    # tomlkit edits the document in place: the admin's comments and layout survive.
    document = tomlkit.parse(Path(config_file).read_text(encoding="utf-8"))
    approved = document.setdefault("approved_apps", tomlkit.array())
    if digest not in approved:
        approved.append(digest)
        approved.multiline(len(approved) > 1)
        logger.info("site %s: approved app %s", document.get("name"), digest)
    write_text_atomic(Path(config_file), tomlkit.dumps(document))
    return [str(value) for value in approved]
