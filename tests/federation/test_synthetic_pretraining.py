"""Free knowledge first: `fedmed pretrain` and [pretrain] train the run's network on synthetic phantoms before the
federation, and the run says where it started."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from fedmed.cli.main import app
from fedmed.config import SynthConfig, load_run_config
from fedmed.data import load_site, synthesize_federation
from fedmed.flower.server.start import global_start, record_start
from fedmed.models import build_model, starting_model
from fedmed.runs import RunDirectory
from fedmed.runs.outputs import write_outputs
from fedmed.runs.run_dir import PRETRAIN_DIR
from fedmed.runs.summary import format_summary
from fedmed.tasks import get_task, select_device
from fedmed.workflows.simulate import simulate

CONFIG = """
name = "tiny"
seed = 3
[task]
kind = "segmentation"
image_size = [32, 32]
[model]
channels = [8, 16]
[train]
batch_size = 4
learning_rate = 0.003
[synth]
task = "segmentation"
image_size = [32, 32]
train_cases = 4
val_cases = 3
seed = 1
[[synth.sites]]
name = "site-a"
[[synth.sites]]
name = "site-b"
intensity_scale = 2.0
intensity_offset = 10.0
noise_std = 0.03
"""


def test_fedmed_pretrain_writes_weights_that_model_init_loads_and_beat_random(tmp_path: Path) -> None:
    config_file = tmp_path / "run.toml"
    config_file.write_text(CONFIG)
    out = tmp_path / "weights" / "start.pt"
    result = CliRunner().invoke(
        app, ["pretrain", str(config_file), "--out", str(out), "--cases", "24", "--epochs", "5", "--seed", "7"]
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    # The command's own line (the log, on stderr, says the same).
    ((value, random_value),) = re.findall(
        r"^dice ([\d.]+) on 16 held-out phantoms \(random init ([\d.]+)\); 24 phantom cases", result.output, re.M
    )
    assert float(value) > float(random_value)
    state = torch.load(out, weights_only=True)
    assert state and all(isinstance(tensor, torch.Tensor) for tensor in state.values()), "tensors only"

    config = load_run_config(config_file, overrides=[f"model.init={out}"])
    started = starting_model(config.task, config.model)  # strict: every key and shape fits the run's network
    assert started.init is not None and started.init.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()

    # Phantoms neither the sites (seed 1) nor the pretraining (seed 7) drew: the pretrained start does better.
    unseen = SynthConfig(
        task="segmentation", image_size=[32, 32], train_cases=1, val_cases=12, seed=99, sites=[{"name": "x"}]
    )
    (entry,) = synthesize_federation(unseen, tmp_path / "unseen")
    samples = load_site(entry.path, task=config.task).val
    task, device = get_task(config.task), select_device("cpu")
    torch.manual_seed(config.seed)
    random_start = build_model(config.task, config.model)
    dice_random = task.evaluate(random_start, samples, device=device)["dice"]
    dice_pretrained = task.evaluate(started.network, samples, device=device)["dice"]
    assert dice_pretrained > dice_random, (dice_pretrained, dice_random)


def test_a_simulated_run_with_pretrain_starts_from_it_and_says_so(tiny_config) -> None:
    settings = {"enabled": True, "cases": 12, "val_cases": 6, "epochs": 2}
    config = tiny_config(train={"rounds": 1}, strategy={"fedbn": True}, pretrain=settings)
    result = simulate(config)
    run = result.run_dir
    weights = run.path / PRETRAIN_DIR / "pretrained.pt"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()

    start = result.summary["start"]
    assert start["kind"] == "synthetic pretraining"
    assert (start["cases"], start["val_cases"], start["epochs"], start["seed"]) == (12, 6, 2, 2)  # synth.seed + 1
    assert start["scanners"] == ["reference", "site-a", "site-b", "site-c"]
    assert start["metric"] == "dice" and 0.0 <= start["random_value"] <= 1.0 and 0.0 <= start["value"] <= 1.0
    assert (start["file"], start["sha256"]) == (str(weights), digest)
    line = f"started from synthetic pretraining: 12 phantom cases × 2 epoch(s) (seed 2), dice {start['value']:.3f}"
    assert line in result.table()
    assert (
        "Started from synthetic pretraining" in run.report_html.read_text()
        and digest[:16] in run.report_html.read_text()
    )

    # The round-0 global model is the pretrained network (site-local layers included), reused from the run directory.
    again = global_start(result.config, run_dir=run)
    pretrained = torch.load(weights, weights_only=True)
    assert again.init.sha256 == digest and again.held is not None, "FedBN: the sites get the pretrained norm layers"
    assert all(torch.equal(again.state[key], value) for key, value in pretrained.items())


def test_a_run_without_pretrain_records_a_random_start(tiny_config, tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    record_start(run, global_start(tiny_config()))  # what the ServerApp does before round 1
    summary = write_outputs(run, primary_metric="dice", higher_is_better=True)
    assert summary["start"] == {"kind": "random", "seed": 3}
    assert "started from random weights (seed 3)" in format_summary(summary)
    assert "Started from random weights (seed 3)" in run.report_html.read_text()
