"""Every message a site sends is in its audit log, matching what the server recorded from it."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from fedmed.site.audit import AuditLog
from fedmed.workflows.simulate import simulate


def test_the_audit_log_holds_exactly_what_each_site_sent(tiny_config) -> None:
    run = simulate(tiny_config(train={"rounds": 2}, dp_sgd={"enabled": True, "epsilon": 4.0, "accountant": "rdp"}))
    rows = run.run_dir.read_metrics()
    rounds = [json.loads(line) for line in (run.run_dir.path / "rounds.jsonl").read_text().splitlines()]
    final = torch.load(run.run_dir.checkpoints / "final.pt", weights_only=False)["state_dict"]
    model_bytes = sum(tensor.numel() * tensor.element_size() for tensor in final.values())
    for site in ("site-a", "site-b", "site-c"):
        log = AuditLog(run.run_dir.path / "sites" / site / "audit.jsonl")
        assert log.verify().ok
        records = log.records()
        sent = [record for record in records if record["event"] == "message-sent"]
        assert {record["run_id"] for record in sent} == {run.run_dir.path.name}
        train = [row for row in rows if row["site"] == site and row["phase"] == "train"]
        updates = [record for record in sent if record["kind"] == "model-update"]
        assert [record["round"] for record in updates] == [row["round"] for row in train] == [1, 2]
        for record, row, round_row in zip(updates, train, rounds, strict=True):
            # The bytes the server counted on receipt are the bytes the site logged as sent.
            assert record["bytes"] == round_row["upload_bytes"][site]
            # The values the server recorded are the values the site says it sent.
            assert record["metrics"]["metrics"]["train_loss"] == pytest.approx(row["train_loss"], rel=1e-6)
            assert record["metrics"]["metrics"]["epsilon"] == pytest.approx(row["epsilon"], rel=1e-6)
            assert record["array_bytes"] == model_bytes, "the whole shared model, nothing more"
            assert record["bytes"] > model_bytes and len(record["sha256"]) == 64
        evaluated = [row for row in rows if row["site"] == site and row["phase"] == "evaluate"]
        metric_replies = [record for record in sent if record["kind"] == "metrics"]
        assert sum(record["message_type"] == "evaluate" for record in metric_replies) == len(evaluated) == 2
        assert all(record["array_bytes"] == 0 for record in metric_replies), "metrics carry no arrays"
        kinds = Counter(record["kind"] for record in sent)
        assert set(kinds) <= {"model-update", "metrics", "normalization-statistics", "personalized-model"}, kinds
        charges = [record for record in records if record["event"] == "ledger-charged"]
        assert [record["charges"] for record in charges] == [1, 2]
        ledger_events = [record["event"] for record in records if record["event"] != "message-sent"]
        assert ledger_events == ["ledger-created", "ledger-charged", "ledger-charged"]
        # A charge is recorded before the update it paid for leaves.
        assert records.index(charges[0]) < records.index(updates[0])
        print(site, json.dumps(kinds))
