"""`fedmed site start`: the site's SuperNode and ClientApp executor, supervised."""

from __future__ import annotations

import sys
from pathlib import Path

import tomli_w

from fedmed.config import SiteConfig, load_site_config
from fedmed.config.deployment import DIGEST_PATTERN
from fedmed.config.loader import read_toml
from fedmed.core.errors import ConfigError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.flower.runtime import executor, supernode
from fedmed.flower.wire import SITE_CONFIG

from . import preflight
from .processes import flower_environment
from .supervisor import Child, Supervisor

SUPERNODE_NOT_ACTIVATED = "Exit Code: 305"  # what Flower prints when the SuperLink refuses this node


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
        "--node-config",
        f"{SITE_CONFIG}='{config_file}'",
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(site.daemon.runtime_port),
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
    ]
    return command if site.daemon.warm_start else [*command, "--cold"]


def start(config_file: Path) -> int:
    """Run until stopped; returns the exit code (3: refused by the server or a fatal setting)."""
    config_file = Path(config_file).resolve()
    site = load_site_config(config_file)
    public_key = preflight.check_site(site)
    env = flower_environment(flower_home=site.state_dir / "flwr-home")
    refused = (
        f"the coordinator does not accept this site's key. Send the public key ({public_key[:40]}...; "
        f"'fedmed site keygen' wrote it next to {site.private_key.name}) to the coordinator, who registers it "
        f"with 'fedmed server add-site', then start the site again"
    )
    supervisor = Supervisor(
        name=f"site {site.name}",
        children=[
            Child(
                "flower-supernode",
                supernode_command(site, config_file),
                env,
                site.daemon.log_file,
                fatal_markers={SUPERNODE_NOT_ACTIVATED: refused},
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
    return supervisor.run()


def approve(config_file: Path, digest: str) -> list[str]:
    """Add an app digest to the site's approved list (takes effect with the next message)."""
    if not DIGEST_PATTERN.match(digest):
        raise ConfigError(f"'{digest}' is not an app digest: 64 lowercase hex characters, as printed in the refusal")
    load_site_config(config_file)  # refuse to edit a config that does not load
    raw = read_toml(config_file)
    approved = list(raw.get("approved_apps", []))
    if digest not in approved:
        approved.append(digest)
        logger.info("site %s: approved app %s", raw.get("name"), digest)
    raw["approved_apps"] = approved
    write_text_atomic(Path(config_file), tomli_w.dumps(raw))
    return approved
