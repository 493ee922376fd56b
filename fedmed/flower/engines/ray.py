"""Flower's simulation engine (Ray): the same apps, each site in a Ray actor process.

Ray is bound to 127.0.0.1 and started without its dashboard, so nothing listens beyond loopback.
"""

from __future__ import annotations

import os

from flwr.app import Context, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import ServerApp

from fedmed.config import EngineConfig
from fedmed.flower.runtime.app_bundle import APP_PROJECT


def run_ray(
    *,
    server_app: ServerApp,
    client_app: ClientApp,
    num_sites: int,
    run_config: UserConfig,
    run_id: int,
    engine: EngineConfig,
) -> None:
    # flwr 1.41's public run_simulation() cannot pass a run config; its internal entry point can.
    import warnings

    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=run_id)
    run.override_config = dict(run_config)
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    # Flower sets the ServerApp's task identity only when it creates the run itself.
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    backend_config = {
        "client_resources": {"num_cpus": engine.cpus_per_site, "num_gpus": engine.gpus_per_site},
        "init_args": {
            "num_cpus": engine.num_cpus or os.cpu_count() or 1,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            "logging_level": "warning",
            "log_to_driver": True,
        },
    }
    context = Context(
        run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    # Ray announces a future change of its GPU-visibility default on every start; fedmed sets GPUs per site.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    _run_simulation(
        num_supernodes=num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=str(APP_PROJECT),
        run=run,
        is_app=True,
    )
