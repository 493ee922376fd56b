"""A hostile site in a simulated federation: flagged from its first update, quarantined after
robust.quarantine_after rounds and no longer asked to train, kept in quarantine across a resume, and taken
back only when the coordinator resumes the run with --readmit.

The hostile site runs modified code, as a real one would: its trainer sends -10 x its update."""

from __future__ import annotations

from typing import Any

import pytest

from fedmed.core.errors import FedmedError
from fedmed.runs import RunDirectory
from fedmed.runs.readmission import request_readmission
from fedmed.runs.run_dir import READMIT_FILE
from fedmed.site.trainer import SiteTrainer
from fedmed.workflows.simulate import RunInterruptedError, resume_simulation, simulate

HOSTILE = "site-c"


def hostile_trainer(*, stop_at_round: int):
    honest = SiteTrainer.train

    def train(trainer: SiteTrainer, global_state: dict, **kwargs: Any) -> tuple[dict, dict]:
        if kwargs["server_round"] == stop_at_round:
            raise KeyboardInterrupt  # the person running the simulation presses Ctrl-C
        update, metrics = honest(trainer, global_state, **kwargs)
        if trainer.site.spec.name == HOSTILE:
            update = {key: start - 10 * (update[key] - start) for key, start in global_state.items()}
        return update, metrics

    return train


def test_a_hostile_site_is_quarantined_until_the_coordinator_readmits_it(tiny_config, monkeypatch) -> None:
    config = tiny_config(train={"rounds": 4}, robust={"quarantine_after": 2})
    monkeypatch.setattr(SiteTrainer, "train", hostile_trainer(stop_at_round=4))
    with pytest.raises(RunInterruptedError) as interrupted:
        simulate(config)
    (path,) = config.output_dir.glob(f"{config.name}-*")
    run_dir = RunDirectory(path)
    assert path.name in str(interrupted.value)
    rounds = run_dir.read_rounds()
    assert [row["round"] for row in rounds] == [1, 2, 3]
    first, second, third = rounds
    assert first["contributions"][HOSTILE]["flagged"] and first["contributions"][HOSTILE]["left_out"] == "flagged"
    assert first["contributions"][HOSTILE]["norm_ratio"] > 4 and first["contributions"][HOSTILE]["cosine"] < -0.3
    assert not any(first["contributions"][site]["flagged"] for site in ("site-a", "site-b"))
    assert [(e["site"], e["event"]) for e in second["quarantine_events"]] == [(HOSTILE, "quarantined")]
    assert "round 1:" in second["quarantine_events"][0]["evidence"]
    # From the round after, the quarantined site is not asked to train at all; the round still meets its quorum.
    assert third["sites_trained"] == ["site-a", "site-b"] and third["sites_quarantined"] == [HOSTILE]
    assert HOSTILE not in third["contributions"]

    with pytest.raises(FedmedError, match="site-a: not quarantined"):
        request_readmission(run_dir, ["site-a"])
    monkeypatch.undo()  # the site fixed its code
    resume_simulation(run_dir.path, readmit=[HOSTILE])
    fourth = run_dir.read_rounds()[-1]
    assert fourth["round"] == 4 and fourth["sites_trained"] == ["site-a", "site-b", HOSTILE]
    assert [(e["site"], e["event"]) for e in fourth["quarantine_events"]] == [(HOSTILE, "readmitted")]
    assert "kept at a lower weight" in fourth["quarantine_events"][0]["evidence"]  # vouched for from now on
    assert fourth["sites_quarantined"] == [] and not (run_dir.path / READMIT_FILE).exists()
