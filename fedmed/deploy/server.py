"""`fedmed server start`: the coordinator's SuperLink and ServerApp executor, supervised."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from fedmed.config import ServerConfig, load_server_config
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.flower.runtime import executor, superlink

from . import flower_cli, preflight, proxy
from .processes import flower_environment, shared_secret
from .supervisor import Child, Supervisor

PRIVATE_UMASK = 0o077


def private_folders(server: ServerConfig) -> list[Path]:
    """What only the coordinator's account may read: its state, its logs and the runs."""
    return [server.superlink.database.parent, server.superlink.log_file.parent, server.runs]


def make_owner_only(folder: Path) -> None:
    """Take group and other permissions off `folder` and everything in it (files left by an older fedmed)."""
    if not folder.is_dir():
        return
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        try:
            mode = path.stat().st_mode & 0o7777
            if mode & 0o077:
                os.chmod(path, mode & ~0o077)
        except FileNotFoundError:  # a temporary file gone meanwhile
            continue


def superexec_secret(server: ServerConfig) -> Path:
    """Shared secret that lets only fedmed's executor take ServerApp tasks from the SuperLink."""
    return shared_secret(server.superlink.database.parent / "superexec.secret")


def site_nodes_file(server: ServerConfig) -> Path:
    return server.site_nodes_file


def register_sites(server: ServerConfig, keys: list[Path], *, strict: bool = False) -> dict[str, int]:
    """Register every site key with the SuperLink; returns site -> node id (kept across restarts).

    A key Flower retired (its site was removed) cannot come back: with `strict` that raises, otherwise the
    site is left out with an error in the log, and the other sites are registered."""
    known = json.loads(site_nodes_file(server).read_text()) if site_nodes_file(server).exists() else {}
    for key in keys:
        try:
            node_id = flower_cli.register_node(server, public_key=key, name=key.stem)
        except flower_cli.RetiredKeyError as retired:
            known.pop(key.stem, None)
            if strict:
                write_text_atomic(site_nodes_file(server), json.dumps(known, indent=2))
                raise
            logger.error("site %s is not registered: %s", key.stem, retired)
            continue
        if known.get(key.stem) != node_id:
            logger.info("registered site %s (node %d)", key.stem, node_id)
        known[key.stem] = node_id
    write_text_atomic(site_nodes_file(server), json.dumps(known, indent=2))
    return known


def wait_until_serving(server: ServerConfig, *, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if preflight.check_server_certificate(
            server.superlink.internal_address, ca_certificate=server.tls.ca_certificate, timeout=1.0, quiet=True
        ):
            return
        time.sleep(0.5)
    raise preflight.PreflightError(
        f"the SuperLink did not start listening on port {server.superlink.internal_port} within "
        f"{timeout:.0f} s; see {server.superlink.log_file}"
    )


def superlink_command(server: ServerConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        superlink.__name__,
        "--ssl-ca-certfile",
        str(server.tls.ca_certificate),
        "--ssl-certfile",
        str(server.tls.certificate),
        "--ssl-keyfile",
        str(server.tls.private_key),
        "--enable-supernode-auth",
        "--database",
        str(server.superlink.database),
        # Loopback only: the network reaches it through the front proxy (fedmed.deploy.proxy).
        "--host",
        "127.0.0.1",
        "--port",
        str(server.superlink.internal_port),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(superexec_secret(server)),
    ]


def executor_command(server: ServerConfig, config_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        executor.__name__,
        "--role",
        "server",
        "--config",
        str(config_file),
        "--runtime-api-address",
        server.superlink.internal_address,
        "--root-certificates",
        str(server.tls.ca_certificate),
        "--secret-file",
        str(superexec_secret(server)),
    ]


def start(config_file: Path) -> int:
    """Run until stopped; returns the exit code."""
    config_file = Path(config_file).resolve()
    server = load_server_config(config_file)
    keys = preflight.check_server(server)
    # Node keys, run configs and messages in transit (superlink.db), logs and run results are the
    # coordinator's alone: everything this process and its children create is owner-only.
    os.umask(PRIVATE_UMASK)
    server.superlink.database.parent.mkdir(parents=True, exist_ok=True)
    server.runs.mkdir(parents=True, exist_ok=True)
    for folder in private_folders(server):
        make_owner_only(folder)
    env = flower_environment(flower_home=flower_cli.flower_home(server))
    proxy_command = proxy.command(server)  # first: a missing nginx stops here, before anything starts
    proxy.render_config(server)
    log = server.superlink.log_file
    supervisor = Supervisor(
        name=f"coordinator {server.federation}",
        children=[
            Child(
                "flower-superlink",
                superlink_command(server),
                env,
                log,
                # Every SuperLink start, first or after a crash, re-registers the site keys.
                after_start=lambda: _after_start(server, keys),
            ),
            Child("ServerApp executor", executor_command(server, config_file), env, log),
            # SIGTERM is nginx's fast shutdown: the master takes its workers (and the port) with it.
            Child("front proxy (nginx)", proxy_command, env, log, death_signal=signal.SIGTERM),
        ],
    )
    logger.info(
        "coordinator %s: proxy on %s:%d, SuperLink on %s (sites connect to %s), log %s",
        server.federation,
        server.superlink.host,
        server.superlink.port,
        server.superlink.internal_address,
        server.superlink.public_address,
        log,
    )
    return supervisor.run()


def _after_start(server: ServerConfig, keys: list[Path]) -> None:
    wait_until_serving(server)
    register_sites(server, keys)
    logger.info("coordinator %s: serving; %d site key(s) registered", server.federation, len(keys))
