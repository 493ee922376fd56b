"""Private fine-tuning from a pretrained start (dp_sgd.trainable), end to end: what trains, what leaves a site,
what the sites' ledgers are charged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmed.config import RunConfig
from fedmed.models import build_model, fixed_by_trainable
from fedmed.privacy import PrivacyLedger
from fedmed.runs.run_dir import DP_PLAN_FILE, STARTING_POINT_FILE
from fedmed.site.audit import AuditLog
from fedmed.site.privacy import ledger_path
from fedmed.workflows.simulate import simulate

DP = {"enabled": True, "epsilon": 4.0, "accountant": "rdp"}


def _pretrained(config: RunConfig, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    state = build_model(config.task, config.model).state_dict()
    torch.save(state, path)
    return state


def _final(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir.checkpoints / "final.pt", weights_only=True)["state_dict"]


def _sent_bytes(run_dir, site: str) -> list[int]:
    records = AuditLog(run_dir.site_dir(site) / "audit.jsonl").records()
    return [record["array_bytes"] for record in records if record.get("kind") == "model-update"]


def _spent(run_dir, site: str) -> tuple[list, float]:
    with PrivacyLedger(ledger_path(run_dir.path / "sites" / site)) as ledger:
        return ledger.history(site), ledger.spent(site, delta=1e-5, accountant="rdp")


@pytest.mark.parametrize("trainable", ["head", "auto"])
def test_what_dp_sgd_trains_is_all_that_is_sent(tiny_config, tmp_path: Path, trainable: str) -> None:
    """The classifier's head, or (auto, from model.init) the normalization layers' scale and shift."""
    config = tiny_config(
        "classification", model={"init": str(tmp_path / "public.pt")}, dp_sgd={**DP, "trainable": trainable}
    )
    chosen = "norm" if trainable == "auto" else trainable
    weights = _pretrained(config, tmp_path / "public.pt")
    run = simulate(config).run_dir
    final = _final(run)
    fixed = set(fixed_by_trainable(build_model(config.task, config.model), chosen))
    trained = [key for key in weights if key not in fixed and "running_" not in key and "num_batches" not in key]
    assert fixed and all(torch.equal(final[key], weights[key]) for key in fixed), "bit-identical to model.init"
    assert any(not torch.equal(final[key], weights[key]) for key in trained), "what trains moved"
    for site in config.site_names:
        sent = _sent_bytes(run, site)
        assert sent == [sum(weights[key].nbytes for key in trained)] * 2, "only what trains leaves the site"
    started = run.read_json(STARTING_POINT_FILE)
    assert started["trainable"] == chosen and started["frozen_parameters"] == len(fixed)


def test_adapters_are_merged_each_round_and_charged_the_epsilon_of_training_everything(
    tiny_config, tmp_path: Path
) -> None:
    """A tiny segmentation federation from model.init training adapters; the same run training every parameter
    has the same plan, so each site's ledger is charged the same."""
    runs = {}
    for trainable in ("adapters", "all"):
        config = tiny_config(model={"init": str(tmp_path / "public.pt")}, dp_sgd={**DP, "trainable": trainable})
        weights = _pretrained(config, tmp_path / "public.pt")
        runs[trainable] = simulate(config).run_dir
    adapted, everything = runs["adapters"], runs["all"]
    assert adapted.read_json(STARTING_POINT_FILE)["trainable"] == "adapters"
    final = _final(adapted)
    assert list(final) == list(weights), "merged: the plain network's keys, nothing of the adapters"
    fixed = set(fixed_by_trainable(build_model(config.task, config.model), "adapters"))
    assert all(torch.equal(final[key], weights[key]) for key in fixed), "biases and norms fixed"
    convolutions = [key for key in weights if key not in fixed]
    assert all(not torch.equal(final[key], weights[key]) for key in convolutions), "every convolution moved"

    plans = {name: run.read_json(DP_PLAN_FILE)["sites"] for name, run in runs.items()}
    for site in config.site_names:
        adapters_plan, all_plan = plans["adapters"][site], plans["all"][site]
        assert adapters_plan["noise_multiplier"] == all_plan["noise_multiplier"]
        fewer = adapters_plan["trained_values"] / all_plan["trained_values"]
        assert fewer < 0.5, "even on channels 8-16 the adapters are fewer values than the convolutions"
        assert adapters_plan["noise_to_signal"] == pytest.approx(all_plan["noise_to_signal"] * fewer**0.5)
        history, spent = _spent(adapted, site)
        assert (history, spent) == _spent(everything, site)
        assert spent == pytest.approx(_spent(everything, site)[1]) and spent <= DP["epsilon"]
        assert _sent_bytes(adapted, site) == [sum(weights[key].nbytes for key in convolutions)] * 2
