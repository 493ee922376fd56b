"""Exceptions whose message names what is wrong and how to fix it."""

from __future__ import annotations


class FedmedError(Exception):
    """Base class: str(error) is a complete message naming the file or field and the fix."""


class ConfigError(FedmedError):
    """A configuration file or value is invalid."""
