"""Site admin commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import user_errors

site_app = typer.Typer(help="Site admin: check local data.", no_args_is_help=True)


@site_app.command("check")
def check(
    data_dir: Annotated[Path, typer.Argument(help="Site data folder with dataset.json, or a MedMNIST .npz.")],
    config_file: Annotated[Path | None, typer.Option("--config", help="Run config whose [task] the data must fit.")] = None,
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
