"""A federation whose sites send compressed updates: the bytes counted on receipt are the bytes each site's audit
log says left it, far fewer than float32's; error feedback is kept on each site's disk; client-level DP and FedBN
compose."""

from __future__ import annotations

import json
import math

import torch

from fedmed.site.audit import AuditLog
from fedmed.site.compression import RESIDUAL_FILE
from fedmed.workflows.simulate import simulate


def test_compressed_updates_are_counted_alike_at_both_ends(tiny_config) -> None:
    config = tiny_config(
        compression={"bits": 8, "top_k": 0.1, "chunk": 256},
        client_dp={"enabled": True, "clipping_norm": 0.5, "noise_multiplier": 0.1},
        strategy={"name": "fedavg", "fedbn": True},
    )
    run = simulate(config)
    path = run.run_dir.path
    rounds = [json.loads(line) for line in (path / "rounds.jsonl").read_text().splitlines()]
    final = torch.load(run.run_dir.checkpoints / "final.pt", weights_only=False)
    shared_bytes = sum(
        tensor.numel() * tensor.element_size()
        for key, tensor in final["state_dict"].items()
        if key not in final["site_local_keys"]
    )
    train = [row for row in run.run_dir.read_metrics() if row["phase"] == "train"]
    assert train and all(row["compress_seconds"] > 0 for row in train)
    for site in ("site-a", "site-b", "site-c"):
        sent = [r for r in AuditLog(path / "sites" / site / "audit.jsonl").records() if r["event"] == "message-sent"]
        updates = [record for record in sent if record["kind"] == "model-update"]
        assert [record["bytes"] for record in updates] == [row["upload_bytes"][site] for row in rounds]
        assert all("compressed" in record["records"] and "arrays" not in record["records"] for record in updates)
        # 10 % of the values at 5 bytes each (an int8 and its uint32 index) and a float32 scale per 256 of them.
        kept = math.ceil(0.1 * shared_bytes / 4)
        assert all(record["array_bytes"] == kept * 5 + 4 * math.ceil(kept / 256) for record in updates)
        assert all(row["download_bytes"][site] > shared_bytes for row in rounds)  # the global model goes as float32
        assert (path / "sites" / site / RESIDUAL_FILE).exists()
    assert all(row["decode_s"] >= 0 for row in rounds)
    assert run.summary["sites"], "the run finished and scored every site"
