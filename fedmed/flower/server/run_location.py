"""Where a run writes: from the coordinator's own state in deployment, never from the submitted run config.

In deployment the ServerApp runs under fedmed's executor, which names the coordinator's server.toml
in the environment (wire.SERVER_CONFIG_ENV). The run config then carries only a one-use submission
token that `fedmed run` recorded; anyone else's run (a forged or reused token, a run directory in the
config) is refused here, before the ServerApp writes a file or sends a message. The in-process and
Ray engines run a config this very process made (`fedmed simulate`), so they name the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import UserConfig

from fedmed.config import ServerConfig, load_server_config
from fedmed.flower.wire import RUN_DIR_KEY, RUN_ID_KEY, SERVER_CONFIG_ENV, SUBMISSION_KEY
from fedmed.runs.submissions import SubmissionError, claim


def deployed_server() -> ServerConfig | None:
    """The coordinator's config when this ServerApp runs under fedmed's executor; None in a simulation."""
    server_file = os.environ.get(SERVER_CONFIG_ENV)
    return load_server_config(Path(server_file)) if server_file else None


def resolve_run_dir(run_config: UserConfig) -> Path:
    server_file = os.environ.get(SERVER_CONFIG_ENV)
    if not server_file:
        return Path(str(run_config[RUN_DIR_KEY]))
    # Flower fills keys a submission leaves out with the app's defaults (""): only a value is a choice.
    if str(run_config.get(RUN_DIR_KEY, "")):
        raise SubmissionError(
            f"refusing the run: its run config names a run directory ('{RUN_DIR_KEY}'), which only the coordinator "
            f"decides; submit runs with 'fedmed run' on the coordinator"
        )
    server = load_server_config(Path(server_file))
    run_dir = claim(server.superlink.database.parent, str(run_config.get(SUBMISSION_KEY, "")), runs_root=server.runs)
    # Sites keep per-run state under this name: it must be the directory's, not a value of the submitter's.
    if str(run_config.get(RUN_ID_KEY, "")) != run_dir.name:
        raise SubmissionError(
            f"refusing the run: its run id '{run_config.get(RUN_ID_KEY)}' is not its run directory's name "
            f"'{run_dir.name}'; submit runs with 'fedmed run' on the coordinator"
        )
    return run_dir
