"""Module prefixes as the config names them (model.freeze, model.init_exclude): matching and suggestions.

A prefix is a module path: 'features.conv0' covers 'features.conv0.weight' and everything under that
module, never 'features.conv01.weight'. A full parameter name covers that one parameter.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from fedmed.core.errors import ConfigError


def under(key: str, prefix: str) -> bool:
    """Whether state-dict `key` lies under the module path `prefix` (or is it)."""
    prefix = prefix.strip().rstrip(".")
    return key == prefix or key.startswith(prefix + ".")


def under_any(key: str, prefixes: Iterable[str]) -> bool:
    return any(under(key, prefix) for prefix in prefixes)


def module_paths(keys: Iterable[str], *, depth: int = 2) -> list[str]:
    """The module paths of `keys` up to `depth` components, in first-seen order: what a prefix may name."""
    paths: list[str] = []
    for key in keys:
        parts = key.split(".")[:-1]  # the last part names the tensor, not a module
        for size in range(1, min(depth, len(parts)) + 1):
            path = ".".join(parts[:size])
            if path not in paths:
                paths.append(path)
    return paths


def check_prefixes(prefixes: Sequence[str], keys: Sequence[str], *, field: str, what: str) -> None:
    """Every prefix must cover at least one key: a typo would silently freeze (or exclude) nothing."""
    unmatched = [prefix for prefix in prefixes if not any(under(key, prefix) for key in keys)]
    if not unmatched:
        return
    valid = module_paths(keys)
    hints = []
    for prefix in unmatched:
        close = difflib.get_close_matches(prefix.strip().rstrip("."), valid, n=1, cutoff=0.6)
        hints.append(f"'{prefix}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ConfigError(
        f"model.{field}: {', '.join(hints)} matches no {what} of the configured network; prefixes are module paths "
        f"such as {', '.join(repr(path) for path in valid[:8])}"
        + (f" ({len(valid) - 8} more)" if len(valid) > 8 else "")
        + f"; fix or remove it from model.{field}"
    )
