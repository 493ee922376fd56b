"""[[sites]]: the simulated federation's site folders, and the rules every site name follows."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from .base import StrictModel

SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class SiteEntry(StrictModel):
    name: str = Field(pattern=SITE_NAME_PATTERN)
    path: Path


def check_unique_names(names: list[str], where: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{where}: site names must be unique; {', '.join(duplicates)} appear more than once")
