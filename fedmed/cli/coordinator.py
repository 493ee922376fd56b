"""Coordinator commands: provision the federation, run the server, launch and watch runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from fedmed.core.errors import FedmedError
from fedmed.flower.runtime.app_bundle import app_digest

from . import status_view
from .common import setup_logging, user_errors

server_app = typer.Typer(help="Coordinator: run the federation's server.", no_args_is_help=True)
app_app = typer.Typer(help="The fedmed Flower App that runs carry.", no_args_is_help=True)

ServerConfigOption = Annotated[
    Path, typer.Option("--server", help="The coordinator's server.toml (from 'fedmed provision').")
]


def provision(
    workspace: Annotated[Path, typer.Argument(help="New folder for the federation (CA, server, site kits).")],
    federation: Annotated[str, typer.Option(help="Federation name.")] = "fedmed",
    address: Annotated[
        list[str],
        typer.Option(help="Address sites use to reach the server (repeatable); every one goes into the certificate."),
    ] = ["127.0.0.1"],  # noqa: B006
    port: Annotated[int, typer.Option(help="SuperLink port.")] = 8000,
    site: Annotated[list[str] | None, typer.Option(help="A site to make a kit for (repeatable).")] = None,
    site_keys: Annotated[
        bool, typer.Option(help="Generate each site's key pair into its kit; with --no-site-keys sites make their own.")
    ] = True,
    listen: Annotated[
        str | None,
        typer.Option(
            help="Address the public port listens on (default: 127.0.0.1 if every --address is loopback, else 0.0.0.0)."
        ),
    ] = None,
) -> None:
    """Create a federation: CA, server certificate and config, and one kit per site."""
    # Deferred, as in every command below: fedmed.config, .deploy, .workflows load pydantic, cryptography, torch
    # or Flower, which `fedmed --help` and the other commands must not wait for.
    from fedmed.deploy.workspace import provision as make_workspace

    with user_errors():
        # The coordinator's own tools reach the SuperLink on loopback, so that address is always certified.
        addresses = list(dict.fromkeys([*address, "127.0.0.1", "localhost"]))
        workspace_ = make_workspace(
            workspace,
            federation=federation,
            addresses=addresses,
            port=port,
            sites=site or [],
            site_keys=site_keys,
            app_digest=app_digest(),
            listen=listen,
        )
    typer.echo(f"federation '{federation}' in {workspace_.root}")
    typer.echo(
        f"  server config: {workspace_.server_config}  (start it: fedmed server start {workspace_.server_config})"
    )
    for name in site or []:
        typer.echo(f"  site kit:      {workspace_.kit(name)}  (hand this folder to the site's admin)")
    typer.echo(f"  keep {workspace_.ca_key} offline: it can issue certificates for this federation")


@server_app.command("start")
def server_start(
    config_file: Annotated[Path, typer.Argument(help="server.toml", metavar="SERVER_CONFIG")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the SuperLink (TLS, node authentication, persistent state) and the ServerApp executor until stopped."""
    from fedmed.deploy.server import start  # deferred: start-up cost (see provision)

    setup_logging(verbose)
    with user_errors():
        code = start(config_file)
    raise typer.Exit(code)


@server_app.command("add-site")
def server_add_site(
    config_file: Annotated[Path, typer.Argument(help="server.toml", metavar="SERVER_CONFIG")],
    name: Annotated[str, typer.Argument(help="Site name.")],
    public_key: Annotated[Path, typer.Argument(help="The site's public key (.pub) from 'fedmed site keygen'.")],
    csr: Annotated[
        Path | None,
        typer.Option("--csr", help="The site's certificate request (.csr) from 'fedmed site keygen': signed here."),
    ] = None,
    certificate_out: Annotated[
        Path | None, typer.Option(help="Where to write the certificate signed from --csr (default: beside it).")
    ] = None,
    certificate: Annotated[
        Path | None,
        typer.Option(help="Enroll a client certificate this federation's CA issued before (e.g. a kit's, again)."),
    ] = None,
) -> None:
    """Allow a site to connect: register its key and enroll its client certificate (signed from --csr)."""
    # Deferred: start-up cost (see provision).
    from fedmed.config import load_server_config
    from fedmed.deploy import enrollment, flower_cli

    setup_logging(False)
    with user_errors():
        server = load_server_config(config_file)
        signed = enrollment.add_site(
            server,
            site=name,
            public_key=public_key,
            csr=csr,
            certificate=certificate,
            certificate_out=certificate_out,
        )
        if signed is not None:
            typer.echo(f"signed the certificate request of site {name}: send {signed} back to the site's admin")
        try:
            node = enrollment.register_now(server, site=name)
            typer.echo(f"site {name} registered (node {node}); it can connect now")
        except flower_cli.RetiredKeyError:
            raise
        except flower_cli.ControlApiError as error:
            typer.echo(f"site {name} added to {server.site_keys}; it is registered when the server starts ({error})")


@server_app.command("remove-site")
def server_remove_site(
    config_file: Annotated[Path, typer.Argument(help="server.toml", metavar="SERVER_CONFIG")],
    name: Annotated[str, typer.Argument(help="Site name.")],
) -> None:
    """Revoke a site: its key and certificate stop working at once (the proxy reloads, its node is unregistered)."""
    # Deferred: start-up cost (see provision).
    from fedmed.config import load_server_config
    from fedmed.deploy import enrollment

    setup_logging(False)
    with user_errors():
        for line in enrollment.remove_site(load_server_config(config_file), site=name):
            typer.echo(line)


@server_app.command("firewall")
def server_firewall(
    config_file: Annotated[Path, typer.Argument(help="server.toml", metavar="SERVER_CONFIG")],
    user: Annotated[
        list[str] | None,
        typer.Option(help="Account allowed to reach the internal port (repeatable; default: this one)."),
    ] = None,
    install: Annotated[bool, typer.Option("--install", help="Load the rules now (root, nft).")] = False,
    remove: Annotated[bool, typer.Option("--remove", help="Delete the rules.")] = False,
) -> None:
    """Print (or install) nftables rules that let only the coordinator's account reach the SuperLink's
    internal port: Flower's Control API there has no authentication."""
    # Deferred: start-up cost (see provision).
    from fedmed.config import load_server_config
    from fedmed.deploy import firewall

    with user_errors():
        server = load_server_config(config_file)
        if remove:
            gone = firewall.remove(server)
            typer.echo(f"table inet {firewall.table_name(server)} " + ("deleted" if gone else "was not installed"))
            return
        uids = firewall.account_uids(user or [])
        if install:
            typer.echo(f"installed table inet {firewall.install(server, uids=uids)}: uids {uids} only")
        else:
            typer.echo(firewall.ruleset(server, uids=uids), nl=False)


def run(
    config_file: Annotated[
        Path | None, typer.Argument(help="Run config (TOML): task, model, train, strategy.", metavar="CONFIG")
    ] = None,
    server_config: ServerConfigOption = Path("server.toml"),
    resume: Annotated[Path | None, typer.Option(help="Continue this run directory from its last checkpoint.")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the run until it ends.")] = False,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a config value (repeatable).")] = None,
    readmit: Annotated[
        list[str] | None,
        typer.Option(help="With --resume: take this quarantined site back into aggregation (repeatable)."),
    ] = None,
) -> None:
    """Launch a federated run on the live federation (or resume one)."""
    # Deferred: start-up cost (see provision).
    from fedmed.config import load_run_config, load_server_config
    from fedmed.deploy.server import PRIVATE_UMASK
    from fedmed.runs.run_dir import STATUS_FILE
    from fedmed.workflows import deployed_run

    setup_logging(False)
    os.umask(PRIVATE_UMASK)  # the run directory and its files are the coordinator's alone
    with user_errors():
        config = None
        if resume is None and config_file is not None:
            # Checked before the server config is even read: nothing is contacted or written for a bad config.
            config = load_run_config(config_file, overrides=overrides or [])
            deployed_run.check_deployable(config, source=str(config_file))
        if readmit and resume is None:
            raise FedmedError("--readmit takes a quarantined site back into a run: use it with --resume RUN_DIR")
        server = load_server_config(server_config)
        if resume is not None:
            deployed = deployed_run.resume(server, resume, readmit=readmit)
        elif config is not None:
            deployed = deployed_run.launch(server, config)
        else:
            raise FedmedError("give a run CONFIG, or --resume RUN_DIR")
        typer.echo(f"run {deployed.run_dir.path.name} submitted (Flower run {deployed.flower_run_id})")
        typer.echo(f"run directory: {deployed.run_dir.path}")
        if wait:
            state = deployed_run.wait(server, deployed)
            recorded = deployed.run_dir.read_json(STATUS_FILE) or {}
            typer.echo(
                f"run {deployed.run_dir.path.name}: {state}"
                + (f" - {recorded['reason']}" if recorded.get("reason") else "")
            )
            if state != "finished:completed":
                raise typer.Exit(1)


def status(
    server_config: ServerConfigOption = Path("server.toml"),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Show it again every --interval seconds until no run is running.")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between two looks with --watch.", min=0.5)] = 5.0,
) -> None:
    """Show the sites, and every run's state, per-round participation (trained, dropped, refused and why)
    and latest per-site metrics (stale ones marked)."""
    # Deferred: start-up cost (see provision).
    from fedmed.config import load_server_config
    from fedmed.workflows import deployed_run

    def fetch() -> dict:
        return deployed_run.status(load_server_config(server_config), server_file=server_config)

    with user_errors():
        if watch and as_json:
            raise FedmedError("--watch redraws a report for a person; drop --json, or poll 'fedmed status --json'")
        if watch:
            try:
                status_view.watch(fetch, interval=interval, echo=typer.echo)
            except KeyboardInterrupt:
                typer.echo("stopped watching (Ctrl-C); the runs go on")
            return
        report = fetch()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for line in status_view.report_lines(report):
        typer.echo(line)


def stop(
    run_name: Annotated[str, typer.Argument(help="Run directory name or Flower run id.", metavar="RUN")],
    server_config: ServerConfigOption = Path("server.toml"),
) -> None:
    """Stop a running federated run."""
    # Deferred: start-up cost (see provision).
    from fedmed.config import load_server_config
    from fedmed.workflows import deployed_run

    with user_errors():
        flower_run_id = deployed_run.stop(load_server_config(server_config), run_name)
    typer.echo(f"stopped Flower run {flower_run_id}")


@app_app.command("digest")
def app_digest_command() -> None:
    """Print the digest of this fedmed version's app, the value sites and coordinators approve."""
    typer.echo(app_digest())
