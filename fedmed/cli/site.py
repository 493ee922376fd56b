"""Site admin commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedmed.core.errors import FedmedError

from .common import setup_logging, user_errors

site_app = typer.Typer(help="Site admin: check data, run the site daemon, approve apps.", no_args_is_help=True)


@site_app.command("check")
def check(
    data_dir: Annotated[Path, typer.Argument(help="Site data folder with dataset.json, or a MedMNIST .npz.")],
    config_file: Annotated[
        Path | None, typer.Option("--config", help="Run config whose [task] the data must fit.")
    ] = None,
) -> None:
    """Validate a site's data (files, NIfTI integrity, shapes, affines, NaN/Inf, labels) without training."""
    # Deferred, as in every command below: fedmed.config, .data, .deploy, .site load pydantic, cryptography or
    # torch, which `fedmed --help` and the other commands must not wait for.
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
    """Make this site's keys and certificate request; send only the .pub and .csr files to the coordinator."""
    # Deferred: start-up cost (see check).
    from fedmed.deploy.pki import create_node_key_pair
    from fedmed.deploy.site_certs import client_certificate_path, client_key_path, create_request

    private, public = key_dir / f"{name}.key", key_dir / f"{name}.pub"
    with user_errors():
        for path in (private, client_key_path(key_dir, name)):
            if path.exists():
                raise FedmedError(f"{path} exists; keep it, or move it away to make new keys")
        create_node_key_pair(private, public)
        request = create_request(key_dir, name)
    typer.echo(
        f"private keys: {private}, {client_key_path(key_dir, name)} (stay here)\n"
        f"public key:   {public} (send to the coordinator)\n"
        f"certificate request: {request} (send to the coordinator; put the certificate it sends back at "
        f"{client_certificate_path(key_dir, name)})"
    )


@site_app.command("start")
def start(
    config_file: Annotated[Path, typer.Argument(help="site.toml", metavar="SITE_CONFIG")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the site daemon (Flower SuperNode and ClientApp executor) until stopped; it reconnects by itself."""
    from fedmed.deploy.site import start as start_site  # deferred: start-up cost (see check)

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
    from fedmed.deploy.site import approve as approve_digest  # deferred: start-up cost (see check)

    with user_errors():
        approved = approve_digest(config_file, digest)
    typer.echo(f"approved apps: {', '.join(d[:12] for d in approved)}")


@site_app.command("budget")
def budget(
    config_file: Annotated[Path, typer.Argument(help="site.toml", metavar="SITE_CONFIG")],
) -> None:
    """Show the DP-SGD privacy spent and remaining, per dataset and run, from this site's ledger."""
    # Deferred: start-up cost (see check).
    from fedmed.config import load_site_config
    from fedmed.site.privacy import format_budget, ledger_path

    with user_errors():
        site = load_site_config(config_file)
        typer.echo(format_budget(ledger_path(site.state_dir), policy=site.privacy, site=site.name))


@site_app.command("audit")
def audit(
    config_file: Annotated[Path, typer.Argument(help="site.toml", metavar="SITE_CONFIG")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check the hash chain; exit 1 when it is broken.")] = False,
) -> None:
    """List everything that left this site (and every ledger event) from its tamper-evident audit log."""
    # Deferred: start-up cost (see check).
    from fedmed.config import load_site_config
    from fedmed.site.audit import AuditLog, audit_path
    from fedmed.site.audit_view import format_audit, format_check

    with user_errors():
        log = AuditLog(audit_path(load_site_config(config_file).state_dir))
        if verify:
            check = log.verify()
            typer.echo(format_check(log, check))
            if not check.ok:
                raise typer.Exit(code=1)
            return
        typer.echo(format_audit(log, as_json=as_json))


@site_app.command("ledger-reset")
def ledger_reset(
    config_file: Annotated[Path, typer.Argument(help="site.toml", metavar="SITE_CONFIG")],
    reason: Annotated[str, typer.Option("--reason", help="Why the budget starts over (kept in the audit log).")],
) -> None:
    """Start a new privacy ledger on purpose: the old one is archived and the reset is audited."""
    # Deferred: start-up cost (see check).
    from fedmed.config import load_site_config
    from fedmed.site.ledger_guard import reset_ledger
    from fedmed.site.privacy import ledger_path

    with user_errors():
        site = load_site_config(config_file)
        identity, archived = reset_ledger(ledger_path(site.state_dir), reason=reason)
    old = f"old ledger archived at {archived}" if archived else "there was no ledger file to archive"
    typer.echo(f"site {site.name}: new privacy ledger {identity.ledger_id}; {old}; recorded in the audit log")
