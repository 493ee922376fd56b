"""A deployed run starts from weights on the coordinator's disk only: the sites receive the frozen values with
the rounds and send back the trainable part alone."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from deploy_helpers import run_config

from fedmed.config import ModelConfig, TaskConfig
from fedmed.deploy.local import LocalFederation
from fedmed.models import build_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FROZEN = "model.0"  # the UNet's first down block


def test_a_deployed_run_starts_from_init_and_keeps_frozen_layers(federation: LocalFederation) -> None:
    torch.manual_seed(11)
    weights = build_model(TaskConfig(kind="segmentation", image_size=[32, 32]), ModelConfig(channels=[8, 16]))
    path = federation.root / "pretrained.pt"  # on the coordinator; no site can read it
    torch.save(weights.state_dict(), path)
    state = weights.state_dict()
    config_file = run_config(
        federation, "pretrained", model={"init": str(path), "freeze": [FROZEN]}, train={"rounds": 1}
    )
    completed = federation.run(config_file, "--wait")
    assert "finished:completed" in completed.stdout
    name = completed.stdout.split("run directory: ")[1].split("/")[-1].split()[0]
    run_dir = federation.workspace / "server" / "runs" / name

    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
    frozen = [key for key in state if key.startswith(f"{FROZEN}.")]
    assert frozen and all(torch.equal(final[key], state[key]) for key in frozen)
    assert any(not torch.equal(final[key], state[key]) for key in state if key not in frozen)
    recorded = json.loads((run_dir / "starting_point.json").read_text())
    assert recorded["init"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    trainable = sum(state[key].nbytes for key in state if key not in frozen)
    (row,) = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert trainable <= row["upload_bytes_per_site"] < trainable + 4096
