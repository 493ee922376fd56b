"""What every exchange of a run needs: the grid to the sites, the run's config, task and directory, the
sites' names by node, and the settings every message's config carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedmed.config import RunConfig
from fedmed.runs import RunDirectory
from fedmed.runs.proxy_traffic import ProxyLog
from fedmed.tasks import Task


@dataclass
class RunContext:
    grid: Grid
    config: RunConfig
    task: Task  # built once per ServerApp run: its primary metric ranks the models
    run_dir: RunDirectory
    site_names: dict[int, str]  # node id -> site; replies fill in what deployment did not tell
    settings: dict[str, Any] = field(default_factory=dict)  # the layout digest and, with Nyúl, the landmarks
    held: ArrayRecord | None = None  # frozen and site-local starting values (model.freeze, model.init), packed
    proxy: ProxyLog | None = None  # deployment: the front proxy's access log, for each site's bytes

    @property
    def timeout(self) -> float:
        """How long an exchange waits for the sites (the round timeout)."""
        return self.config.strategy.round_timeout_s

    def site_of(self, node_id: int) -> str:
        return self.site_names.get(node_id, f"node {node_id}")
