"""The fedmed ServerApp: decode the run, then drive the round loop."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmed.runs import RunDirectory

from .protocol import RUN_DIR_KEY, decode_config
from .rounds import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = decode_config(context.run_config)
    run_federation(grid, config=config, run_dir=RunDirectory(Path(str(context.run_config[RUN_DIR_KEY]))))
