"""A federation started from pretrained weights (model.init) with frozen modules (model.freeze), end to end."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fedmed.config import RunConfig
from fedmed.core.errors import ConfigError, FedmedError
from fedmed.flower.server.start import INIT_DIGEST, check_resumed_start, global_start
from fedmed.models import build_model, site_local_keys
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import STARTING_POINT_FILE
from fedmed.site.audit import AuditLog
from fedmed.workflows.simulate import simulate

FREEZE = ["features.conv0", "features.denseblock1"]


def _pretrained(config: RunConfig, path: Path) -> dict[str, torch.Tensor]:
    """Weights of the run's network from another seed, saved as a plain state dict."""
    torch.manual_seed(1234)
    state = build_model(config.task, config.model).state_dict()
    torch.save(state, path)
    return state


def _final(run_dir) -> dict:
    return torch.load(run_dir.checkpoints / "final.pt", weights_only=True)


def test_the_global_model_at_round_0_is_the_init(tiny_config, tmp_path: Path) -> None:
    config = tiny_config("classification", train={"rounds": 1})
    weights = _pretrained(config, tmp_path / "pretrained.pt")
    config.model.init = tmp_path / "pretrained.pt"

    torch.manual_seed(config.seed)
    start = global_start(config)
    assert all(torch.equal(start.state[key], value) for key, value in weights.items())
    source, started = build_model(config.task, config.model), build_model(config.task, config.model)
    source.load_state_dict(weights)
    started.load_state_dict(start.state)
    images = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(source.eval()(images), started.eval()(images))
    assert start.held is None, "nothing frozen or site-local: the shared weights are the whole model"

    result = simulate(config)
    recorded = result.run_dir.read_json(STARTING_POINT_FILE)
    digest = hashlib.sha256((tmp_path / "pretrained.pt").read_bytes()).hexdigest()
    assert recorded["init"] == {
        "path": str(tmp_path / "pretrained.pt"),
        "format": "file",
        "sha256": digest,
        "tensors": len(weights),
    }
    assert result.summary["starting_point"] == recorded
    assert f"started from {tmp_path / 'pretrained.pt'} (sha256 {digest[:16]})" in result.table()
    assert digest[:16] in result.run_dir.report_html.read_text()


def test_frozen_parameters_are_never_trained_nor_sent(tiny_config, tmp_path: Path) -> None:
    config = tiny_config(
        "classification",
        model={"init": str(tmp_path / "pretrained.pt"), "freeze": FREEZE},
        strategy={"fedbn": True},
        # DP-SGD would train adapters from model.init by default (tests/federation/test_private_finetuning.py).
        dp_sgd={"enabled": True, "epsilon": 8.0, "accountant": "rdp", "trainable": "all"},
    )
    weights = _pretrained(config, tmp_path / "pretrained.pt")
    run = simulate(config).run_dir

    final = _final(run)["state_dict"]
    frozen = [key for key in weights if key.startswith(tuple(f"{prefix}." for prefix in FREEZE))]
    assert frozen and all(torch.equal(final[key], weights[key]) for key in frozen), "bit-identical to model.init"
    local = [key for key in site_local_keys(build_model(config.task, config.model)) if key not in frozen]
    shared = [key for key in weights if key not in frozen and key not in local]
    assert any(not torch.equal(final[key], weights[key]) for key in shared), "the rest trained"
    assert _final(run)["site_local_keys"] == local

    for site in config.site_names:
        # FedBN: each site's own layers start from model.init's values and never include a frozen one.
        assert sorted(torch.load(run.site_dir(site) / "local_parameters.pt", weights_only=True)) == sorted(local)
        updates = [
            record
            for record in AuditLog(run.site_dir(site) / "audit.jsonl").records()
            if record.get("kind") == "model-update"
        ]
        assert len(updates) == 2
        assert all(record["array_bytes"] == sum(weights[key].nbytes for key in shared) for record in updates)
    assert run.read_json(STARTING_POINT_FILE)["frozen_parameters"] == len(frozen)


def test_secure_aggregation_sends_the_trainable_part_only(tiny_config, tmp_path: Path) -> None:
    config = tiny_config(
        "classification",
        train={"rounds": 1},
        model={"init": str(tmp_path / "pretrained.pt"), "freeze": ["features"]},
        secagg={"enabled": True},
    )
    weights = _pretrained(config, tmp_path / "pretrained.pt")
    run = simulate(config).run_dir
    final = _final(run)["state_dict"]
    assert all(torch.equal(final[key], weights[key]) for key in weights if key.startswith("features."))
    assert not torch.equal(final["class_layers.out.weight"], weights["class_layers.out.weight"])
    # The masked vector covers the head's values alone (uint32 each), not the frozen feature extractor.
    head = sum(weights[key].numel() for key in weights if key.startswith("class_layers."))
    (row,) = run.read_rounds()
    assert head * 4 <= row["upload_bytes_per_site"] < head * 4 + 4096


def test_a_mismatched_init_fails_before_the_run_directory_exists(tiny_config, tmp_path: Path) -> None:
    config = tiny_config("classification", model={"init": str(tmp_path / "three.pt")})
    three = config.task.model_copy(update={"num_classes": 3})
    torch.save(build_model(three, config.model).state_dict(), tmp_path / "three.pt")
    with pytest.raises(ConfigError, match=r"2 of another shape.*init_exclude = \['class_layers'\]"):
        simulate(config)
    assert not (tmp_path / "runs").exists() or not any(
        path.name.startswith("tiny-classification") for path in (tmp_path / "runs").iterdir()
    )


def test_a_resumed_run_refuses_changed_init_weights(tiny_config, tmp_path: Path) -> None:
    config = tiny_config("classification", model={"init": str(tmp_path / "pretrained.pt")})
    _pretrained(config, tmp_path / "pretrained.pt")
    start = global_start(config)
    run_dir = RunDirectory(tmp_path / "run")
    check_resumed_start({INIT_DIGEST: start.init.sha256}, start, run_dir=run_dir)
    with pytest.raises(FedmedError, match=r"has changed since the run started.*restore the original weights"):
        check_resumed_start({INIT_DIGEST: "0" * 64}, start, run_dir=run_dir)
