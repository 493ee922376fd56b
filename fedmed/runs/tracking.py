"""Training curves where researchers look for them: TensorBoard event files in the run directory's
`tensorboard/` (always), and an MLflow file store in its `mlruns/` when `[tracking] mlflow = true`.

Both get the same scalars per round, from the rows metrics.jsonl holds: per site its training loss, DP ε
spent and every evaluation metric (`site-a/dice`), their means over the sites (`global/dice_mean`) and
the round's wall time (`round/seconds`). Nothing leaves the machine: no tracking server, MLflow's
telemetry off, its store a folder of files.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from fedmed.config import RunConfig
from fedmed.core.errors import ConfigError
from fedmed.core.log import logger

from .run_dir import RunDirectory

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_INSTALL = "pip install 'fedmed[mlflow]'"
# From a site's training row: the loss and the privacy spent; the rest is bookkeeping (steps, seconds).
TRAIN_SCALARS = ("train_loss", "epsilon")
# From an evaluation row: every number except these.
NOT_SCORES = ("num-examples",)
# MLflow's client reads these when it is imported: no usage data sent, and its file store (kept for
# existing users, "maintenance mode" since MLflow 3.7) allowed without the database a server would use.
MLFLOW_ENVIRONMENT = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "MLFLOW_ALLOW_FILE_STORE": "true"}

SiteMetrics = dict[str, dict[str, Any]]
# How a run's MLflow run ends when the round loop does not finish: Ctrl-C is a stop, anything else a failure.
_MLFLOW_STATUS: dict[type[BaseException], str] = {KeyboardInterrupt: "KILLED"}


def check_tracking(config: RunConfig, *, source: str) -> None:
    """Refuse, before a run starts, a config asking for MLflow where it is not installed."""
    if config.tracking.mlflow and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"{source}: [tracking] mlflow = true but MLflow is not installed here; install it with "
            f"{MLFLOW_INSTALL}, or set tracking.mlflow = false"
        )


def round_scalars(
    *, train: SiteMetrics, evaluation: SiteMetrics, round_row: dict[str, Any] | None = None
) -> dict[str, float]:
    """The round's scalars by tag: `<site>/<metric>`, `global/<metric>_mean` (over the sites that reported a
    finite value) and `round/seconds`."""
    scalars: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for rows, wanted in ((train, TRAIN_SCALARS), (evaluation, None)):
        for site, metrics in sorted(rows.items()):
            for key, value in metrics.items():
                if not _number(value) or (wanted is not None and key not in wanted) or key in NOT_SCORES:
                    continue
                if wanted is None and key.endswith("_seconds"):
                    continue
                scalars[f"{site}/{key}"] = float(value)
                if math.isfinite(value):
                    per_metric.setdefault(key, []).append(float(value))
    for key, values in sorted(per_metric.items()):
        scalars[f"global/{key}_mean"] = sum(values) / len(values)
    if round_row is not None and _number(round_row.get("seconds")):
        scalars["round/seconds"] = float(round_row["seconds"])
    return scalars


class RunTracker:
    """Open with `RunTracker.open` at the start of the round loop, `log_round` once a round is committed
    (checkpointed), and `close` at the end, also when the run fails (a context manager does that)."""

    def __init__(self, *, writer: Any, mlflow: _MlflowRun | None) -> None:
        self._writer = writer
        self._mlflow = mlflow

    @classmethod
    def open(cls, run_dir: RunDirectory, *, config: RunConfig, first_round: int = 1) -> RunTracker:
        """Event files in `<run>/tensorboard/`; a resumed run appends to the same folder (and the same MLflow
        run), dropping anything a crashed process wrote for rounds from `first_round` on."""
        check_tracking(config, source=str(run_dir.config_file))
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of rounds the resumed run does again.
        writer = SummaryWriter(
            log_dir=str(run_dir.path / TENSORBOARD_DIR), purge_step=first_round if first_round > 1 else None
        )
        mlflow = _MlflowRun.open(run_dir, config=config) if config.tracking.mlflow else None
        return cls(writer=writer, mlflow=mlflow)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(status="FINISHED" if kind is None else _MLFLOW_STATUS.get(kind, "FAILED"))

    def log_round(
        self, server_round: int, *, train: SiteMetrics, evaluation: SiteMetrics, round_row: dict[str, Any]
    ) -> None:
        scalars = round_scalars(train=train, evaluation=evaluation, round_row=round_row)
        now = time.time()
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=server_round, walltime=now)
        self._writer.flush()  # a person watching TensorBoard sees the round now, not at the end
        if self._mlflow is not None:
            self._mlflow.log(scalars, step=server_round, timestamp=now)

    def close(self, *, status: str = "FINISHED") -> None:
        self._writer.close()
        if self._mlflow is not None:
            self._mlflow.close(status=status)
            self._mlflow = None


class _MlflowRun:
    """The run's MLflow run, in a file store inside the run directory; a resumed run continues it."""

    def __init__(self, client: Any, run_id: str) -> None:
        self._client = client
        self._run_id = run_id

    @classmethod
    def open(cls, run_dir: RunDirectory, *, config: RunConfig) -> _MlflowRun:
        for name, value in MLFLOW_ENVIRONMENT.items():
            os.environ[name] = value
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(run_dir)
        # An explicit URI: never MLFLOW_TRACKING_URI from the environment, which could name a server.
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(config.name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.name)
        runs = client.search_runs([experiment_id], filter_string=f"tags.`fedmed.run` = '{run_dir.path.name}'")
        if runs:
            run_id = runs[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(
                experiment_id, run_name=run_dir.path.name, tags={"fedmed.run": run_dir.path.name}
            ).info.run_id
            client.log_batch(run_id, params=_params(config))
        logger.debug("MLflow run %s in %s", run_id, uri)
        return cls(client, run_id)

    def log(self, scalars: dict[str, float], *, step: int, timestamp: float) -> None:
        from mlflow.entities import Metric

        millis = int(timestamp * 1000)
        metrics = [Metric(key=tag, value=value, timestamp=millis, step=step) for tag, value in scalars.items()]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self, *, status: str) -> None:
        self._client.set_terminated(self._run_id, status=status)


def mlflow_uri(run_dir: RunDirectory) -> str:
    return (Path(run_dir.path).resolve() / MLFLOW_DIR).as_uri()


def _params(config: RunConfig) -> list[Any]:
    """The settings a comparison of runs filters on (the whole config is config.toml beside the store)."""
    from mlflow.entities import Param

    values = {
        "task": config.task.kind,
        "model": config.model.name,
        "strategy": config.strategy.name,
        "fedbn": config.strategy.fedbn,
        "rounds": config.train.rounds,
        "local_epochs": config.train.local_epochs,
        "learning_rate": config.train.learning_rate,
        "sites": ",".join(config.site_names),
        "dp_sgd": config.dp_sgd.enabled,
        "secagg": config.secagg.enabled,
    }
    return [Param(key, str(value)) for key, value in values.items() if value != ""]  # a deployed run lists no sites


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
