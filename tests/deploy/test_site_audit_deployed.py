"""A deployed site's own records (real SuperLink, SuperNodes and ClientApp processes): its audit log holds
exactly what it sent, and its ledger can neither vanish quietly nor be spent on pure noise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from deploy_helpers import run_config

from fedmed.config import load_site_config
from fedmed.deploy.local import FEDMED, LocalFederation, cli
from fedmed.privacy import PrivacyLedger
from fedmed.privacy.ledger_anchor import anchor_path, read_anchor
from fedmed.site.audit import AuditLog, audit_path
from fedmed.site.ledger_guard import open_site_ledger
from fedmed.site.privacy import ledger_path

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("a", "b", "c")


def _run_dir(output: str) -> Path:
    return Path(re.search(r"run directory: (\S+)", output).group(1))


def _state(federation: LocalFederation, site: str) -> Path:
    return load_site_config(federation.site_config(site)).state_dir


def _sent(federation: LocalFederation, site: str, run_id: str) -> list[dict]:
    records = AuditLog(audit_path(_state(federation, site))).records()
    return [r for r in records if r["event"] == "message-sent" and r["run_id"] == run_id]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_audit_log_records_exactly_what_each_site_sent(federation: LocalFederation) -> None:
    config = run_config(federation, "audited", train={"rounds": 1}, strategy={"min_sites": 3, "round_timeout_s": 60})
    completed = federation.run(config, "--wait", check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    run_dir = _run_dir(completed.stdout)
    metrics = _jsonl(run_dir / "metrics.jsonl")
    rounds = _jsonl(run_dir / "rounds.jsonl")
    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    model_bytes = sum(tensor.numel() * tensor.element_size() for tensor in final.values())
    for site in SITES:
        sent = _sent(federation, site, run_dir.name)
        train = [row for row in metrics if row["site"] == site and row["phase"] == "train"]
        updates = [r for r in sent if r["kind"] == "model-update"]
        assert [r["round"] for r in updates] == [row["round"] for row in train] == [1]
        # What the server measured on receipt, and the values it recorded, are what the site logged.
        assert updates[0]["bytes"] == rounds[0]["upload_bytes"][site]
        assert updates[0]["array_bytes"] == model_bytes
        assert updates[0]["metrics"]["metrics"]["train_loss"] == pytest.approx(train[0]["train_loss"], rel=1e-6)
        evaluated = [row for row in metrics if row["site"] == site and row["phase"] == "evaluate"]
        assert sum(r["message_type"] == "evaluate" for r in sent) == len(evaluated) == 1
        assert {r["kind"] for r in sent} <= {
            "model-update",
            "metrics",
            "normalization-statistics",
            "model-card-statistics",
        }
        assert all(r["flower_run_id"] == sent[0]["flower_run_id"] and r["bytes"] > 0 for r in sent)

        site_config = str(federation.site_config(site))
        verified = cli([FEDMED, "site", "audit", site_config, "--verify"])
        assert "intact" in verified.stdout
        listed = cli([FEDMED, "site", "audit", site_config, "--json"]).stdout.splitlines()
        assert sum(json.loads(line).get("run_id") == run_dir.name for line in listed) == len(sent)
        # What the site daemon keeps (ledger, audit log, kept state, Flower's files, its log) is its alone.
        kit = federation.site_config(site).parent
        shared = [
            f"{path.relative_to(kit)} {path.stat().st_mode & 0o777:o}"
            for folder in (kit / "state", kit / "logs")
            for path in [folder, *folder.rglob("*")]
            if not path.is_symlink() and path.stat().st_mode & 0o077
        ]
        assert not shared, f"site {site}: readable by others: {shared}"


def test_missing_ledgers_and_a_nearly_spent_budget_are_refused(federation: LocalFederation) -> None:
    """Sites a and b lose their ledger files, site c has ε 0.004 left: a DP run asking ε 1 is refused by
    all three, with the reasons in the run's output, no ledger recreated and nothing charged."""
    ledgers = {site: ledger_path(_state(federation, site)) for site in SITES}
    with PrivacyLedger(ledgers["c"], create=False) as ledger:
        spent = ledger.spent("c", delta=1e-5, accountant="prv")
        charges_before = len(ledger.history("c"))
    moved = {site: ledgers[site].with_name("moved-away.sqlite") for site in ("a", "b")}
    for site, aside in moved.items():
        ledgers[site].rename(aside)
    federation.edit_site("c", privacy={"epsilon": spent + 0.004})
    try:
        config = run_config(
            federation,
            "refused",
            train={"rounds": 1},
            dp_sgd={"enabled": True, "epsilon": 1.0, "accountant": "rdp"},
            strategy={"min_sites": 3, "round_timeout_s": 60},
        )
        refused = federation.run(config, "--wait", check=False)
        assert refused.returncode == 1
        output = " ".join(refused.stdout.split())
        for site in ("a", "b"):
            assert not ledgers[site].exists(), "a missing ledger is never silently recreated"
            assert "privacy ledger privacy-ledger.sqlite is missing" in output, refused.stdout
            # The coordinator gets the reason and the fix; the site's paths and ledger id stay in the site's log.
            ledger_id = read_anchor(anchor_path(ledgers[site])).ledger_id
            assert str(_state(federation, site)) not in refused.stdout + refused.stderr
            assert ledger_id not in refused.stdout + refused.stderr
            site_log = federation.site_log(site).read_text()
            assert f"privacy ledger {ledgers[site]} is missing" in site_log and ledger_id in site_log
        assert "site c: privacy budget exhausted for this run (ε 0.004 left, the run asks ε 1)" in output, output
        assert "max_noise_multiplier" in output
        reasons = {"a": "is missing", "b": "is missing", "c": "max_noise_multiplier"}
        for site, reason in reasons.items():
            # The refusal left the site too, so the site's audit log holds it.
            records = AuditLog(audit_path(_state(federation, site))).records()
            assert records[-1]["kind"] == "refusal" and reason in records[-1]["reason"], records[-1]
    finally:
        for site, aside in moved.items():
            aside.rename(ledgers[site])
        federation.edit_site("c", privacy={"epsilon": 8.0})
    with PrivacyLedger(ledgers["c"], create=False) as ledger:
        assert len(ledger.history("c")) == charges_before, "the refused round was not charged"
    for site in SITES:
        open_site_ledger(ledgers[site]).close()  # restored: the anchor accepts them again
