"""Faults in a real federation: a site dies mid-round and comes back; the coordinator dies and the
run resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deploy_helpers import run_config

from fedmed.deploy.local import LocalFederation, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _receiving_train(federation: LocalFederation, site: str, *, after: int) -> bool:
    return "Receiving: train message" in federation.site_log(site).read_text()[after:]


def test_a_site_killed_mid_round_is_dropped_and_rejoins(federation: LocalFederation) -> None:
    # Six rounds: a restarted daemon takes ~20 s to connect again, several rounds without it here.
    config = run_config(federation, "site-crash", train={"rounds": 6}, strategy={"min_sites": 2, "round_timeout_s": 30})
    log_start = len(federation.site_log("c").read_text())
    run_dir = federation.submit(config)

    wait_for(
        lambda: _receiving_train(federation, "c", after=log_start),
        timeout=120,
        what="site c to receive its first training message",
    )
    federation.crash("c")  # SIGKILL the daemon, its SuperNode and the ClientApp mid-round
    wait_for(lambda: len(_rounds(run_dir)) >= 1, timeout=180, what="round 1 to finish without site c")
    federation.start_site("c")
    wait_for(lambda: (run_dir / "checkpoints" / "final.pt").exists(), timeout=300, what="the run to finish")

    rounds = _rounds(run_dir)
    assert rounds[0]["sites_trained"] == ["a", "b"], "the crashed site is dropped from its round"
    assert rounds[-1]["sites_trained"] == ["a", "b", "c"], "the restarted site takes part again"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    federation.wait_for_sites({"a", "b", "c"})


def test_a_round_below_quorum_fails_with_the_reason_in_status(federation: LocalFederation) -> None:
    config = run_config(
        federation, "below-quorum", train={"rounds": 2}, strategy={"min_sites": 3, "round_timeout_s": 20}
    )
    federation.stop("b")
    try:
        completed = federation.run(config, "--wait", check=False)
    finally:
        federation.start_site("b")
    assert completed.returncode == 1
    assert "finished:failed" in completed.stdout
    assert "quorum is 3" in completed.stdout
    assert "not connected: b" in completed.stdout or "b: no reply before the round timeout" in completed.stdout
    run = next(r for r in federation.status()["runs"] if r["run"].startswith("below-quorum"))
    assert "quorum is 3" in run["reason"]
    federation.wait_for_sites({"a", "b", "c"})


def test_the_coordinator_crashes_and_the_run_resumes(federation: LocalFederation) -> None:
    config = run_config(federation, "server-crash", train={"rounds": 3}, strategy={"round_timeout_s": 60})
    run_dir = federation.submit(config)
    wait_for(lambda: len(_rounds(run_dir)) >= 1, timeout=180, what="round 1 to finish")
    federation.crash("server")  # SuperLink, executor and ServerApp killed at once
    done_before = len(_rounds(run_dir))
    assert not (run_dir / "checkpoints" / "final.pt").exists()

    federation.start_server()
    federation.wait_for_server()
    federation.wait_for_sites({"a", "b", "c"}, timeout=120)  # the sites reconnect by themselves
    completed = federation.resume(run_dir)
    assert "finished:completed" in completed.stdout

    rounds = [row["round"] for row in _rounds(run_dir)]
    assert rounds[-1] == 3 and rounds[:done_before] == list(range(1, done_before + 1))
    assert sorted(set(rounds)) == [1, 2, 3]
    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    assert final["round"] == 3
