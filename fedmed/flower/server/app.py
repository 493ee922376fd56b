"""The fedmed ServerApp: decode the run, then drive the round loop."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.flower.records import decode_config, decode_site_nodes
from fedmed.flower.wire import RUN_DIR_KEY
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import STATUS_FILE

from .rounds import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = decode_config(context.run_config)
    run_dir = RunDirectory(Path(str(context.run_config[RUN_DIR_KEY])))
    run_dir.write_json(STATUS_FILE, {"state": "running"})
    try:
        run_federation(grid, config=config, run_dir=run_dir, site_names=decode_site_nodes(context.run_config))
    except Exception as error:
        # `fedmed status` shows this reason; Flower marks the run failed from the exception.
        run_dir.write_json(STATUS_FILE, {"state": "failed", "reason": str(error)})
        raise
    run_dir.write_json(STATUS_FILE, {"state": "completed"})
