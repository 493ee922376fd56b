"""The fedmed ServerApp: decode the run, then drive the round loop."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.core.log import logger
from fedmed.flower.records import decode_config, decode_site_nodes
from fedmed.runs import RunDirectory
from fedmed.runs.outputs import write_outputs
from fedmed.runs.proxy_traffic import LOG_NAME, ProxyLog
from fedmed.runs.run_dir import STATUS_FILE
from fedmed.runs.status import process_identity
from fedmed.tasks import Task, get_task

from .enrolled import EnrolledNodes
from .rounds import run_federation
from .run_location import deployed_server, resolve_run_dir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = decode_config(context.run_config)
    task = get_task(config.task)  # once per run: the round loop, cross-site evaluation and the report use it
    run_dir = RunDirectory(resolve_run_dir(context.run_config))  # refuses others' runs before any write
    # Who runs the run: `fedmed status` tells a dead ServerApp (coordinator crash) from a running one.
    run_dir.write_json(STATUS_FILE, {"state": "running", **process_identity()})
    site_names = decode_site_nodes(context.run_config)
    server = deployed_server()
    proxy = None
    if server is not None:  # deployment: the enrolment list, not the submitted config, says who takes part
        grid = EnrolledNodes(grid, enrolment=server.site_nodes_file)
        site_names = grid.enrolled()
        proxy = ProxyLog(server.proxy_dir / LOG_NAME)
    try:
        run_federation(grid, config=config, task=task, run_dir=run_dir, site_names=site_names, proxy=proxy)
    except Exception as error:
        # `fedmed status` shows this reason; Flower marks the run failed from the exception.
        run_dir.write_json(STATUS_FILE, {"state": "failed", "reason": str(error)})
        _write_outputs(run_dir, task)
        raise
    _write_outputs(run_dir, task)
    run_dir.write_json(STATUS_FILE, {"state": "completed"})


def _write_outputs(run_dir: RunDirectory, task: Task) -> None:
    """summary.json, report.html and plots, as a simulation writes them: the same files whatever ran the run."""
    try:
        write_outputs(run_dir, primary_metric=task.primary_metric, higher_is_better=task.higher_is_better)
    except Exception:  # the model and metrics are safe already; `fedmed report RUN` redraws the report
        logger.exception("could not write the report of %s; run 'fedmed report %s'", run_dir.path.name, run_dir.path)
