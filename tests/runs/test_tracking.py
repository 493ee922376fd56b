"""The run tracker on its own: scalars from metrics rows, a resumed run appending to the same event folder
and MLflow run, and MLflow asked for where it is not installed refused with the fix."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from fedmed.config import RunConfig
from fedmed.core.errors import ConfigError
from fedmed.runs import RunDirectory
from fedmed.runs.tracking import MLFLOW_ENVIRONMENT, RunTracker, check_tracking, mlflow_uri, round_scalars


def _config(*, mlflow: bool) -> RunConfig:
    return RunConfig.model_validate(
        {"name": "tracked", "task": {"kind": "segmentation"}, "tracking": {"mlflow": mlflow}}
    )


def test_round_scalars_per_site_global_and_round() -> None:
    scalars = round_scalars(
        train={
            "a": {"num-examples": 4, "train_loss": 0.5, "train_steps": 2, "train_seconds": 1.0, "epsilon": 1.2},
            "b": {"num-examples": 4, "train_loss": 0.7, "train_steps": 2, "train_seconds": 1.0},
        },
        evaluation={
            "a": {"num-examples": 3, "dice": 0.8, "hd95": math.inf, "eval_seconds": 0.2},
            "b": {"num-examples": 3, "dice": 0.6, "hd95": 4.0, "eval_seconds": 0.2},
        },
        round_row={"round": 1, "seconds": 2.5, "sites_trained": ["a", "b"]},
    )
    assert scalars == {
        "a/train_loss": 0.5,
        "a/epsilon": 1.2,
        "b/train_loss": 0.7,
        "a/dice": 0.8,
        "a/hd95": math.inf,
        "b/dice": 0.6,
        "b/hd95": 4.0,
        "global/dice_mean": pytest.approx(0.7),
        "global/epsilon_mean": 1.2,
        "global/hd95_mean": 4.0,  # over the finite values only
        "global/train_loss_mean": pytest.approx(0.6),
        "round/seconds": 2.5,
    }


def test_a_resumed_run_appends_to_the_same_events_and_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="the mlflow extra (in fedmed[test]) is not installed")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = RunDirectory.create(tmp_path, "tracked")
    config = _config(mlflow=True)

    def rounds(first: int, last: int) -> None:
        with RunTracker.open(run_dir, config=config, first_round=first) as tracker:
            for number in range(first, last + 1):
                tracker.log_round(
                    number, train={"a": {"train_loss": 1.0 / number}}, evaluation={}, round_row={"seconds": 1.0}
                )

    rounds(1, 2)
    with pytest.raises(KeyboardInterrupt), RunTracker.open(run_dir, config=config, first_round=3):
        raise KeyboardInterrupt  # the process stopped before round 3 was committed
    rounds(3, 4)

    events = EventAccumulator(str(run_dir.path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    written = {event.step: event.value for event in events.Scalars("a/train_loss")}
    assert written == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25})
    for name, value in MLFLOW_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=mlflow_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "a/train_loss")
    assert [metric.step for metric in history] == [1, 2, 3, 4]


def test_mlflow_asked_for_but_not_installed_is_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "mlflow" else find_spec(name))
    with pytest.raises(ConfigError, match=r"run\.toml: \[tracking\] mlflow = true .*pip install 'fedmed\[mlflow\]'"):
        check_tracking(_config(mlflow=True), source="run.toml")
    check_tracking(_config(mlflow=False), source="run.toml")  # TensorBoard alone needs nothing optional
    with pytest.raises(ConfigError, match=r"pip install 'fedmed\[mlflow\]'"):
        RunTracker.open(RunDirectory.create(tmp_path, "tracked"), config=_config(mlflow=True))
