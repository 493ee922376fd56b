"""Shared CLI helpers: logging set-up and turning fedmed errors into clean exits."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import typer

from fedmed.core.errors import FedmedError
from fedmed.core.log import configure_console_logging


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show a FedmedError as its message (it names the file/field and the fix), exit code 2."""
    try:
        yield
    except FedmedError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


def setup_logging(verbose: bool, *, live: bool = False) -> None:
    """`live`: a command a person runs in the foreground, which may draw a progress bar when stderr is a
    terminal (plain lines otherwise)."""
    configure_console_logging(logging.DEBUG if verbose else logging.INFO, live=live)
