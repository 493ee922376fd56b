"""Faults in a real federation: a site daemon or its SuperNode dies and comes back by itself; the
coordinator dies and the run resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from deploy_helpers import run_config

from fedmed.config import load_site_config
from fedmed.deploy.local import LocalFederation, alive, wait_for
from fedmed.flower.runtime import supernode
from fedmed.site.audit import AuditLog, audit_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _state(run_dir: Path) -> str | None:
    path = run_dir / "status.json"
    return json.loads(path.read_text()).get("state") if path.exists() else None


def _receiving_train(federation: LocalFederation, site: str, *, after: int) -> bool:
    return "Receiving: train message" in federation.site_log(site).read_text()[after:]


def _updates_sent(federation: LocalFederation, site: str, run_id: str) -> list[int]:
    """The rounds whose model update left the site (recorded in its audit log before it leaves)."""
    records = AuditLog(audit_path(load_site_config(federation.site_config(site)).state_dir)).records()
    return [r["round"] for r in records if r.get("kind") == "model-update" and r.get("run_id") == run_id]


def test_a_site_killed_mid_round_takes_its_processes_and_rejoins(federation: LocalFederation) -> None:
    # Six rounds: the restarted daemon waits until the coordinator sees the old node offline (<= 20 s).
    # Forty local steps a round: the site is still training when it is killed, on a fast machine too.
    config = run_config(
        federation,
        "site-crash",
        train={"rounds": 6, "local_steps": 40},
        strategy={"min_sites": 2, "round_timeout_s": 60},
    )
    log_start = len(federation.site_log("c").read_text())
    run_dir = federation.submit(config)

    # The definite signal: site c's SuperNode has taken round 1's training message (and handed it on).
    wait_for(
        lambda: _receiving_train(federation, "c", after=log_start),
        timeout=120,
        what="site c to receive its first training message",
        interval=0.05,
    )
    # SIGKILL the supervisor alone, mid-round: its SuperNode, executor (and ClientApp, if one is training right
    # now) must die on their own.
    below = federation.kill_supervisor("c")
    try:
        assert len(below) >= 2, f"expected at least a SuperNode and an executor below site c, found {below}"
        wait_for(lambda: not any(alive(pid) for pid in below), timeout=15, what="site c's processes to die with it")
        # Killed mid-round, not after its reply: nothing of round 1 left site c (else this test proves nothing).
        assert _updates_sent(federation, "c", run_dir.name) == [], "site c replied before it was killed"
        wait_for(lambda: len(_rounds(run_dir)) >= 1, timeout=180, what="round 1 to finish without site c")
    finally:
        federation.start_site("c")
    # The ServerApp writes the report after the final model, then marks the run completed.
    wait_for(lambda: _state(run_dir) == "completed", timeout=400, what="the run to complete")

    rounds = _rounds(run_dir)
    assert rounds[0]["sites_trained"] == ["a", "b"], "the crashed site is dropped from its round"
    assert rounds[0]["sites_dropped"] == ["c"] and rounds[0]["sites_refused"] == {}, "dropped, not refusing"
    assert rounds[-1]["sites_trained"] == ["a", "b", "c"], "the restarted site takes part again"
    federation.wait_for_sites({"a", "b", "c"})


def test_a_killed_supernode_is_restarted_and_rejoins(federation: LocalFederation) -> None:
    superlink_log = federation.workspace / "server" / "logs" / "superlink.log"
    activations = superlink_log.read_text().count("Activated node_id")
    supervisor_log_start = len((federation.root / "site-a.out").read_text())
    os.kill(federation.process("a", supernode.__name__), signal.SIGKILL)
    killed = time.monotonic()
    # Refused while the coordinator still counts the dead node online (up to two heartbeats), retried every few
    # seconds meanwhile (not with a doubling backoff, which took it to ~40 s), then in.
    wait_for(
        lambda: superlink_log.read_text().count("Activated node_id") > activations,
        timeout=2 * supernode.HEARTBEAT_INTERVAL_S + 40,
        what="site a's new SuperNode to be activated",
    )
    rejoined_s = time.monotonic() - killed
    print(f"site a's SuperNode rejoined {rejoined_s:.1f} s after SIGKILL")  # the runbook's figure (sites/README.md)
    supervisor_log = (federation.root / "site-a.out").read_text()[supervisor_log_start:]
    assert "restarting it in 16 s" not in supervisor_log and "restarting it in 8 s" not in supervisor_log
    assert "flower-supernode exited with code -9" in supervisor_log and "restarting it in" in supervisor_log
    assert "does not know this site's key" not in supervisor_log, "a known site is never told its key is unknown"

    config = run_config(federation, "after-supernode-kill", train={"rounds": 1}, strategy={"min_sites": 3})
    completed = federation.run(config, "--wait")
    assert "finished:completed" in completed.stdout


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
    # SIGKILL the supervisor alone: the SuperLink, the proxy, the executor and the ServerApp die with it.
    below = federation.kill_supervisor("server")
    wait_for(lambda: not any(alive(pid) for pid in below), timeout=15, what="the coordinator's processes to die")
    done_before = len(_rounds(run_dir))
    assert not (run_dir / "checkpoints" / "final.pt").exists()

    federation.start_server()
    federation.wait_for_server()
    federation.wait_for_sites({"a", "b", "c"}, timeout=120)  # the sites reconnect by themselves
    dead = next(r for r in federation.status()["runs"] if r["run"] == run_dir.name)
    assert dead["state"] == "interrupted", dead
    assert dead["resume"] == f"fedmed run --resume {run_dir} --server {federation.server_config}"
    completed = federation.resume(run_dir)
    assert "finished:completed" in completed.stdout
    assert len(_rounds(run_dir)) == len({row["round"] for row in _rounds(run_dir)}), "no round row twice"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(row["round"], row["site"], row["phase"]) for row in metrics]
    assert len(keys) == len(set(keys)), "no metric row twice"

    rounds = [row["round"] for row in _rounds(run_dir)]
    assert rounds[-1] == 3 and rounds[:done_before] == list(range(1, done_before + 1))
    assert sorted(set(rounds)) == [1, 2, 3]
    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    assert final["round"] == 3
