"""Named registries: the extension points (strategies, tasks, networks) are a name → builder table each.

Adding a strategy, a task or a network is one new file that registers its builder under a name, and one
import line in its package's ``__init__`` so the file is loaded:

    STRATEGIES = Registry[StrategyBuilder]("strategy", field="strategy.name")

    @STRATEGIES.register("fedavg")
    def fedavg(config: RunConfig, common: dict) -> Strategy: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders by name. Unknown names raise a ConfigError that names the config field and every known name."""

    def __init__(self, kind: str, *, field: str) -> None:
        self.kind = kind
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated builder under `name` (a name is registered once)."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice; give the new one another name")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise ConfigError(f"{self.field}: unknown {self.kind} '{name}'; choose one of: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
