"""Site admin commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import user_errors

site_app = typer.Typer(help="Site admin: check data, run the site daemon, approve apps.", no_args_is_help=True)


@site_app.command("check")
def check(
    data_dir: Annotated[Path, typer.Argument(help="Site data folder with dataset.json, or a MedMNIST .npz.")],
    config_file: Annotated[
        Path | None, typer.Option("--config", help="Run config whose [task] the data must fit.")
    ] = None,
) -> None:
    """Validate a site's data (files, NIfTI integrity, shapes, affines, NaN/Inf, labels) without training."""
    from fedmed.config import load_run_config
    from fedmed.data import validate_site

    with user_errors():
        task = load_run_config(config_file).task if config_file else None
        report = validate_site(data_dir, task=task)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


@site_app.command("keygen")
def keygen(
    key_dir: Annotated[Path, typer.Argument(help="Folder for the key pair.")],
    name: Annotated[str, typer.Option(help="Site name (file names).")],
) -> None:
    """Make this site's node-authentication key pair; send only the .pub file to the coordinator."""
    from fedmed.deploy.pki import create_node_key_pair

    private, public = key_dir / f"{name}.key", key_dir / f"{name}.pub"
    with user_errors():
        if private.exists():
            from fedmed.core.errors import FedmedError

            raise FedmedError(f"{private} exists; keep it, or move it away to make a new key pair")
        create_node_key_pair(private, public)
    typer.echo(f"private key: {private} (stays here)\npublic key:  {public} (send to the coordinator)")


@site_app.command("start")
def start(
    config_file: Annotated[Path, typer.Argument(help="site.toml", metavar="SITE_CONFIG")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the site daemon (Flower SuperNode and ClientApp executor) until stopped; it reconnects by itself."""
    from fedmed.deploy.site import start as start_site

    from .common import setup_logging

    setup_logging(verbose)
    with user_errors():
        code = start_site(config_file)
    raise typer.Exit(code)


@site_app.command("approve")
def approve(
    config_file: Annotated[Path, typer.Argument(help="site.toml", metavar="SITE_CONFIG")],
    digest: Annotated[str, typer.Argument(help="App digest from the refusal in the site log.")],
) -> None:
    """Allow this site to run an app version (by digest)."""
    from fedmed.deploy.site import approve as approve_digest

    with user_errors():
        approved = approve_digest(config_file, digest)
    typer.echo(f"approved apps: {', '.join(d[:12] for d in approved)}")


@site_app.command("budget")
def budget(
    config_file: Annotated[Path, typer.Argument(help="site.toml", metavar="SITE_CONFIG")],
) -> None:
    """Show the DP-SGD privacy spent and remaining, per dataset and run, from this site's ledger."""
    from fedmed.config import load_site_config
    from fedmed.site.privacy import format_budget, ledger_path

    with user_errors():
        site = load_site_config(config_file)
        typer.echo(format_budget(ledger_path(site.state_dir), policy=site.privacy, site=site.name))
