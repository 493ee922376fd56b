"""Issue 13: before a DP-SGD run spends anything, every site's plan is asked for; a plan whose updates would be
mostly noise stops the run before round 1, with the options, and no site is charged."""

from __future__ import annotations

import json

import pytest

from fedmed.config import DpSgdConfig
from fedmed.flower.server.dp_plan import MostlyNoiseError
from fedmed.privacy import PrivacyLedger
from fedmed.runs.run_dir import DP_PLAN_FILE, STATUS_FILE, SUMMARY_FILE
from fedmed.runs.summary import format_summary
from fedmed.site.privacy import ledger_path
from fedmed.workflows.simulate import simulate

DELTA = 1e-5
MOSTLY_NOISE = DpSgdConfig().max_effective_noise


def _ledger(run_dir, site: str) -> PrivacyLedger:
    return PrivacyLedger(ledger_path(run_dir / "sites" / site), create=False)


def test_a_mostly_noise_plan_stops_the_run_before_any_site_spends(tiny_config) -> None:
    # 3 cases per site and ε 0.5: σ ≈ 7.7 on a batch of 3, each step's mean gradient buried under noise.
    config = tiny_config(
        train={"rounds": 1}, synth={"train_cases": 3}, dp_sgd={"enabled": True, "epsilon": 0.5, "accountant": "rdp"}
    )
    with pytest.raises(MostlyNoiseError) as stopped:
        simulate(config)
    message = str(stopped.value)
    (run_dir,) = [path.parent for path in config.output_dir.glob(f"*/{DP_PLAN_FILE}")]
    plan = json.loads((run_dir / DP_PLAN_FILE).read_text())
    assert plan["max_effective_noise"] == MOSTLY_NOISE
    assert "stops before round 1" in message and f"above {MOSTLY_NOISE:g}" in message
    for site in config.site_names:
        row = plan["sites"][site]
        assert row["verdict"] == "mostly noise" and row["effective_noise"] > MOSTLY_NOISE
        assert row["effective_noise"] == pytest.approx(row["noise_multiplier"] / row["expected_batch"])
        assert row["expected_batch"] == pytest.approx(3.0)
        assert (
            f"{site}: σ {row['noise_multiplier']:.2f} on an expected batch of 3.0 cases, effective noise "
            f"{row['effective_noise']:.2f}" in message
        )
        with _ledger(run_dir, site) as ledger:
            stored = ledger.get_plan(dataset=site, run_id=run_dir.name)
            assert ledger.history(site) == [] and ledger.spent(site, delta=DELTA, accountant="rdp") == 0
            assert all(summary.rounds == 0 for summary in ledger.summary())
        assert stored is not None and stored.noise_multiplier == pytest.approx(row["noise_multiplier"])
    for option in ("fewer rounds", "larger sites", "batch_size", "[pretrain]", "[client_dp]", "larger ε"):
        assert option in message, option
    assert not (run_dir / "rounds.jsonl").exists() and not (run_dir / "metrics.jsonl").exists()
    status = json.loads((run_dir / STATUS_FILE).read_text())
    assert status["state"] == "failed" and status["reason"] == message
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["dp_plan"] == plan
    assert "site-a          DP-SGD plan σ" in format_summary(summary)


def test_a_healthy_plan_runs_and_records_the_plans_the_ledgers_hold(tiny_config) -> None:
    config = tiny_config(train={"rounds": 1}, dp_sgd={"enabled": True, "epsilon": 8.0, "accountant": "rdp"})
    run = simulate(config)
    plan = json.loads((run.run_dir.path / DP_PLAN_FILE).read_text())
    assert set(plan["sites"]) == set(config.site_names)
    for site in config.site_names:
        row = plan["sites"][site]
        with _ledger(run.run_dir.path, site) as ledger:
            stored = ledger.get_plan(dataset=site, run_id=run.run_dir.path.name)
            history = ledger.history(site)
        assert row["verdict"] == "ok" and row["effective_noise"] <= MOSTLY_NOISE
        assert row["noise_multiplier"] == stored.noise_multiplier
        assert row["sample_rate"] == stored.sample_rate and row["planned_steps"] == stored.planned_steps
        assert row["target_epsilon"] == stored.target_epsilon and row["delta"] == stored.delta
        assert [sigma for sigma, _, _ in history] == [stored.noise_multiplier], "the round trained on the plan"
        assert run.summary["privacy"][site]["noise_multiplier"] == row["noise_multiplier"]
    assert run.summary["dp_plan"] == plan
    assert "DP-SGD plan σ" in run.table()


def test_a_stricter_ceiling_stops_the_same_plan(tiny_config) -> None:
    """The same healthy plan stops the run under a stricter [dp_sgd] max_effective_noise."""
    config = tiny_config(
        train={"rounds": 1},
        dp_sgd={"enabled": True, "epsilon": 8.0, "accountant": "rdp", "max_effective_noise": 0.01},
    )
    with pytest.raises(MostlyNoiseError, match=r"the run stops above 0\.01\."):
        simulate(config)
