"""robust.update_norm_bound under SecAgg+ in a real (in-process) federation: each site's own code scales its
update down to the bound before masking and says so in its audit log; the coordinator checks the unmasked mean
and rejects, loudly, an aggregate no set of bounded updates could give (a site running modified code)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmed.flower.client import secagg as site_secagg
from fedmed.flower.server.secure_round import aggregate_norm_tolerance
from fedmed.flower.server.start import global_start
from fedmed.site.audit import AuditLog
from fedmed.site.audit_view import format_audit
from fedmed.workflows.simulate import simulate

BOUND = 0.05  # under a round's update on the tiny federation (about 0.13), far over the quantization tolerance (3e-4)
SITES = ("site-a", "site-b", "site-c")


def _rounds(run) -> list[dict]:
    return [json.loads(line) for line in (run.run_dir.path / "rounds.jsonl").read_text().splitlines()]


def _initial_state(config) -> dict[str, torch.Tensor]:
    torch.manual_seed(config.seed)  # as the round loop seeds before building the round-0 model
    return global_start(config).state


def _final_state(run) -> dict[str, torch.Tensor]:
    return torch.load(run.run_dir.checkpoints / "final.pt", weights_only=False)["state_dict"]


@pytest.mark.parametrize(
    "changes",
    # With client-level DP the server noises the mean (noise norm about 7 here): the check reads the mean before that.
    [{}, {"client_dp": {"enabled": True, "clipping_norm": 1.0, "noise_multiplier": 0.5}}],
    ids=["fedavgm", "client-dp"],
)
def test_each_site_bounds_its_own_update_and_the_coordinator_checks_the_mean(tiny_config, changes: dict) -> None:
    config = tiny_config(train={"rounds": 2}, secagg={"enabled": True}, robust={"update_norm_bound": BOUND}, **changes)
    run = simulate(config)
    params = sum(value.numel() for value in _initial_state(config).values())
    for row in _rounds(run):
        tolerance = aggregate_norm_tolerance(
            bound=BOUND, max_quantization_error=row["secagg_max_quantization_error"], num_params=params
        )
        assert tolerance < 0.1 * BOUND, "the check is meaningful at this bound"
        assert row["update_norm_bound"] == BOUND
        assert 0 < row["aggregate_update_norm"] <= BOUND + tolerance
        assert "aggregate_rejected" not in row
    moved = max(float((a - b).abs().max()) for a, b in zip(_final_state(run).values(), _initial_state(config).values()))
    assert moved > 0, "bounded rounds still train the model"

    for site in SITES:
        log = AuditLog(run.run_dir.path / "sites" / site / "audit.jsonl")
        assert log.verify().ok
        records = log.records()
        bounded = [record for record in records if record["event"] == "update-bounded"]
        assert [record["round"] for record in bounded] == [1, 2]
        for record in bounded:
            assert record["update_norm"] > BOUND and record["update_norm_bound"] == BOUND
            assert record["run_id"] == run.run_dir.path.name
            assert "scaled to the bound before masking" in record["reason"]
        assert "update-bounded" in format_audit(log), "`fedmed site audit` shows it"
        masked = [record for record in records if record.get("kind") == "secagg-masked-update"]
        assert [record["round"] for record in masked] == [1, 2]
        for event, sent in zip(bounded, masked, strict=True):
            assert event["seq"] < sent["seq"], "recorded before the masked update left"
            assert not any("norm" in key for values in sent["metrics"].values() for key in values), (
                "the site's norm stays at the site"
            )


def test_a_site_that_skips_the_bound_gets_the_round_rejected_loudly(
    tiny_config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """site-c runs modified code: it masks its full update. The sum is over the bound, so the round's aggregate is
    rejected and the model stays at round 0; the run still finishes and checkpoints."""
    approved = site_secagg._bound_update

    def modified(msg, context, update, *, bound, site, server_round):
        if site != "site-c":
            approved(msg, context, update, bound=bound, site=site, server_round=server_round)

    monkeypatch.setattr(site_secagg, "_bound_update", modified)
    caplog.set_level("WARNING", logger="fedmed")
    config = tiny_config(train={"rounds": 1}, secagg={"enabled": True}, robust={"update_norm_bound": BOUND})
    run = simulate(config)

    (row,) = _rounds(run)
    assert row["aggregate_update_norm"] > 1.2 * BOUND
    assert "over robust.update_norm_bound 0.05" in row["aggregate_rejected"]
    assert row["secagg_sites"] == list(SITES), "the round itself completed"
    assert any("the aggregate is rejected" in record.getMessage() for record in caplog.records)
    initial, final = _initial_state(config), _final_state(run)
    assert all(torch.equal(final[key], initial[key]) for key in initial), "the global model stayed as it was"
    assert run.run_dir.load_checkpoint("latest")["round"] == 1
    events = {
        site: [r["event"] for r in AuditLog(run.run_dir.path / "sites" / site / "audit.jsonl").records()]
        for site in SITES
    }
    assert "update-bounded" in events["site-a"] and "update-bounded" not in events["site-c"]
    assert np.isfinite(row["aggregate_update_norm"])
