"""Engines that run fedmed's ServerApp and one ClientApp per site on one machine: in-process (default)
and Flower's simulation engine (Ray). They import both sides, which they run."""

from __future__ import annotations

from flwr.app import UserConfig

from fedmed.config import EngineConfig
from fedmed.flower.client.app import app as client_app
from fedmed.flower.server.app import app as server_app

from .inprocess import run_inprocess
from .ray import run_ray  # Ray itself is imported only when this engine runs (inside run_ray)


def run_federation_here(engine: EngineConfig, *, num_sites: int, run_config: UserConfig, run_id: int) -> None:
    """Run the whole federation in this process (in-process) or its Ray workers, to completion."""
    if engine.name == "ray":
        run_ray(
            server_app=server_app,
            client_app=client_app,
            num_sites=num_sites,
            run_config=run_config,
            run_id=run_id,
            engine=engine,
        )
        return
    run_inprocess(
        server_app=server_app, client_app=client_app, num_sites=num_sites, run_config=run_config, run_id=run_id
    )
