"""Watching a run: one plain line per round when output is not a terminal (no ANSI codes, no carriage-return
bars), and the same per-round numbers as metrics.jsonl in TensorBoard event files and, when asked, MLflow.

One real `fedmed simulate` (2 sites, 3 rounds, output piped) serves the tests of this file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Each module fixture runs a real simulation in a subprocess: not the fast loop.
pytestmark = pytest.mark.federation

CONFIG = """
name = "watched"
[task]
kind = "segmentation"
image_size = [32, 32]
[model]
channels = [8, 16]
[train]
rounds = 3
eval_every = 2
[evaluation]
cross_site = false
[tracking]
mlflow = true
[synth]
task = "segmentation"
spatial_dims = 2
image_size = [32, 32]
train_cases = 3
val_cases = 2
[[synth.sites]]
name = "one"
[[synth.sites]]
name = "two"
noise_std = 0.05
"""


class Simulated:
    def __init__(self, completed: subprocess.CompletedProcess, run_dir: Path) -> None:
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.run_dir = run_dir

    def jsonl(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Simulated:
    pytest.importorskip("mlflow", reason="the mlflow extra (in fedmed[test]) is not installed")
    folder = tmp_path_factory.mktemp("watched")
    config = folder / "run.toml"
    config.write_text(CONFIG)
    fedmed = Path(sys.executable).with_name("fedmed")
    # A terminal type that could draw bars: the pipe alone must keep the output plain.
    env = {key: value for key, value in os.environ.items() if key not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env |= {"TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(
        [str(fedmed), "simulate", str(config), "--set", f"output_dir={folder / 'runs'}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (run_dir,) = (path for path in (folder / "runs").iterdir() if path.name != "data")
    return Simulated(completed, run_dir)


def test_piped_output_is_plain_lines_one_per_round(simulated: Simulated) -> None:
    for name, text in (("stdout", simulated.stdout), ("stderr", simulated.stderr)):
        assert "\x1b" not in text, f"ANSI escape in {name}:\n{text[-2000:]}"
        assert "\r" not in text, f"carriage return in {name}:\n{text[-2000:]}"
    rounds = re.findall(r"^\S+ INFO round (\d+)/3 .*$", simulated.stderr, re.MULTILINE)
    assert rounds == ["1", "2", "3"], simulated.stderr
    lines = [line for line in simulated.stderr.splitlines() if " INFO round " in line]
    assert "loss mean" in lines[0] and "dice mean" in lines[1], lines  # round 1 did not evaluate (eval_every)
    assert all("one " in line and "two " in line and "s/round" in line and "ETA" in line for line in lines), lines
    # Per site and round only under -v.
    assert "trained in" not in simulated.stderr


def _events(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _expected(simulated: Simulated) -> dict[str, dict[int, float]]:
    """Tag -> {round: value} as metrics.jsonl and rounds.jsonl give them."""
    expected: dict[str, dict[int, float]] = {}
    for row in simulated.jsonl("metrics.jsonl"):
        if row["phase"] == "train":
            keys = ["train_loss"]
        else:
            keys = [k for k, v in row.items() if isinstance(v, float) and k != "num-examples"]
            keys = [k for k in keys if not k.endswith("_seconds")]
        for key in keys:
            expected.setdefault(f"{row['site']}/{key}", {})[row["round"]] = row[key]
    dice: dict[int, list[float]] = {}
    for row in simulated.jsonl("metrics.jsonl"):
        if row["phase"] == "evaluate":
            dice.setdefault(row["round"], []).append(row["dice"])
    expected["global/dice_mean"] = {server_round: sum(values) / len(values) for server_round, values in dice.items()}
    for row in simulated.jsonl("rounds.jsonl"):
        expected.setdefault("round/seconds", {})[row["round"]] = row["seconds"]
    return expected


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl(simulated: Simulated) -> None:
    events = _events(simulated.run_dir)
    expected = _expected(simulated)
    assert {"one/train_loss", "two/dice", "one/hd95", "global/dice_mean", "round/seconds"} <= set(expected)
    assert set(expected) <= set(events.Tags()["scalars"])
    for tag, values in expected.items():
        written = {event.step: event.value for event in events.Scalars(tag)}
        assert written == pytest.approx(values, rel=1e-6), tag  # event files store float32
    assert sorted({event.step for event in events.Scalars("two/dice")}) == [2, 3]  # evaluated rounds only


def test_mlflow_store_in_the_run_directory_holds_the_same_metrics(
    simulated: Simulated, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from fedmed.runs.tracking import MLFLOW_ENVIRONMENT

    for name, value in MLFLOW_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    uri = (simulated.run_dir / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("watched")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedmed.run"] == simulated.run_dir.name
    assert run.data.params["strategy"] == "fedavgm"  # the default
    for tag, values in _expected(simulated).items():
        history = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, tag)}
        assert history == pytest.approx(values), tag
