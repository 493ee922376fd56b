"""SecAgg+ over the Message API in a real (in-process) federation: the secure aggregate equals the
plain one within the stated quantization error, the server never receives an individual update,
and sites lost at any protocol stage are tolerated or fail the round loudly."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

from fedmed.flower.engines.inprocess import FIRST_NODE_ID, InProcessGrid
from fedmed.flower.server.rounds import RoundFailedError
from fedmed.flower.server.secure_exchange import STAGE_MESSAGE_TYPES
from fedmed.flower.wire import MASKED, VECTOR
from fedmed.workflows.simulate import simulate

SITE_A, SITE_B, SITE_C = FIRST_NODE_ID, FIRST_NODE_ID + 1, FIRST_NODE_ID + 2


def _final_state(run) -> dict[str, torch.Tensor]:
    return torch.load(run.run_dir.checkpoints / "final.pt", weights_only=False)["state_dict"]


def _rounds(run) -> list[dict]:
    return [json.loads(line) for line in (run.run_dir.path / "rounds.jsonl").read_text().splitlines()]


@contextmanager
def _captured_replies(monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """Everything the server receives, as it receives it (the coordinator lets a reply's arrays go once it has
    written the update to disk)."""
    received: list = []
    original = InProcessGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        replies = list(original(self, messages, timeout=timeout))
        received.extend(_snapshot(reply) for reply in replies)
        return replies

    monkeypatch.setattr(InProcessGrid, "send_and_receive", recording)
    yield received


def _snapshot(reply: Message) -> Message:
    if reply.has_error():
        return reply
    return Message(RecordDict(dict(reply.content.items())), metadata=copy.copy(reply.metadata))


@contextmanager
def _lost(monkeypatch: pytest.MonkeyPatch, *, node: int, stage: str, times: int = 10**6) -> Iterator[None]:
    """The site at `node` does its work for `stage` but its reply never reaches the server."""
    original = InProcessGrid.send_and_receive
    remaining = {"count": times}

    def lossy(self, messages, *, timeout=None):
        replies = list(original(self, messages, timeout=timeout))
        kept = []
        for reply in replies:
            lost = (
                reply.metadata.src_node_id == node
                and reply.metadata.message_type == str(STAGE_MESSAGE_TYPES[stage])
                and remaining["count"] > 0
            )
            if lost:
                remaining["count"] -= 1
            else:
                kept.append(reply)
        return kept

    monkeypatch.setattr(InProcessGrid, "send_and_receive", lossy)
    yield


@pytest.mark.parametrize(
    "changes",
    [{}, {"strategy": {"name": "fedprox", "proximal_mu": 0.01}}, {"strategy": {"fedbn": True}}],
    ids=["fedavg", "fedprox", "fedbn"],
)
def test_secure_aggregate_equals_plain_within_the_quantization_error(tiny_config, changes: dict) -> None:
    plain = simulate(tiny_config(train={"rounds": 1}, **changes))
    secure = simulate(tiny_config(train={"rounds": 1}, secagg={"enabled": True}, **changes))
    plain_state, secure_state = _final_state(plain), _final_state(secure)
    bound = _rounds(secure)[0]["secagg_max_quantization_error"]
    assert 0 < bound < 1e-4
    worst = max(float((plain_state[key].float() - secure_state[key].float()).abs().max()) for key in plain_state)
    assert worst <= bound + 1e-6, f"secure aggregate off by {worst}, stated bound {bound}"
    assert worst > 0, "the secure path must actually have quantized (identical results mean it did not run)"
    if changes.get("strategy", {}).get("fedbn"):
        local = torch.load(plain.run_dir.checkpoints / "final.pt", weights_only=False)["site_local_keys"]
        assert local, "fedbn declares site-local keys"
        assert all(torch.equal(plain_state[key], secure_state[key]) for key in local), "site-local keys never travel"


def test_the_server_receives_only_masked_updates(tiny_config, monkeypatch: pytest.MonkeyPatch) -> None:
    plain_config = tiny_config(train={"rounds": 1})
    with _captured_replies(monkeypatch) as plain_replies:
        simulate(plain_config)
    updates = {
        reply.metadata.src_node_id: reply.content["arrays"].to_numpy_ndarrays()[0]
        for reply in plain_replies
        if reply.metadata.message_type == "train"
    }
    monkeypatch.undo()
    with _captured_replies(monkeypatch) as secure_replies:
        simulate(tiny_config(train={"rounds": 1}, secagg={"enabled": True}))

    train_replies = [reply for reply in secure_replies if reply.metadata.message_type.startswith("train")]
    assert {reply.metadata.message_type for reply in train_replies} == set(map(str, STAGE_MESSAGE_TYPES.values()))
    for reply in train_replies:
        array_records = [key for key, record in reply.content.items() if isinstance(record, ArrayRecord)]
        assert array_records in ([], [MASKED]), "no reply may carry parameters in the clear"
        if array_records:
            assert all(array.dtype == "uint32" for array in reply.content[MASKED].values())
    for reply in (r for r in train_replies if MASKED in r.content):
        masked = reply.content[MASKED][VECTOR].numpy().astype(np.float64)
        weights = updates[reply.metadata.src_node_id].astype(np.float64)
        correlation = np.corrcoef(masked[: weights.size], weights)[0, 1]
        assert abs(correlation) < 0.1, "a masked vector must look unrelated to the site's parameters"
        assert masked.std() > 2**30, "masked values spread over the whole uint32 range"


@pytest.mark.parametrize(
    ("stage", "aggregated"),
    [
        ("setup", ["site-a", "site-c"]),
        ("share-keys", ["site-a", "site-c"]),
        ("masked-input", ["site-a", "site-c"]),
        ("unmask", ["site-a", "site-b", "site-c"]),
    ],
)
def test_a_site_lost_at_any_stage_is_tolerated(
    tiny_config, monkeypatch: pytest.MonkeyPatch, stage: str, aggregated: list[str]
) -> None:
    config = tiny_config(train={"rounds": 2}, secagg={"enabled": True}, strategy={"min_sites": 2})
    with _lost(monkeypatch, node=SITE_B, stage=stage, times=1):
        run = simulate(config)
    first, second = _rounds(run)
    assert first["secagg_sites"] == aggregated
    if stage != "unmask":
        # Keyed by site name once the server has heard from the site, by node id before that.
        assert list(first["secagg_dropped"].values()) == [stage]
    assert second["secagg_sites"] == ["site-a", "site-b", "site-c"], "the site is back the next round"
    assert all(torch.isfinite(value.float()).all() for value in _final_state(run).values())


def test_a_round_that_loses_too_many_sites_is_retried_then_fails_loudly(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(train={"rounds": 1}, secagg={"enabled": True, "max_attempts": 2}, strategy={"min_sites": 2})
    with (
        _lost(monkeypatch, node=SITE_B, stage="share-keys", times=1),
        _lost(monkeypatch, node=SITE_C, stage="share-keys", times=1),
    ):
        run = simulate(config)  # both lost only in the first attempt: the retry succeeds
    assert _rounds(run)[0]["secagg_attempts"] == 2
    assert _rounds(run)[0]["secagg_sites"] == ["site-a", "site-b", "site-c"]

    monkeypatch.undo()
    with (
        _lost(monkeypatch, node=SITE_B, stage="masked-input"),
        _lost(monkeypatch, node=SITE_C, stage="setup"),
        pytest.raises(RoundFailedError, match=r"secure aggregation failed in 2 attempt\(s\)"),
    ):
        simulate(config)


def test_fedavgm_is_the_default_and_keeps_its_momentum_under_secagg(tiny_config) -> None:
    run = simulate(tiny_config(secagg={"enabled": True}))
    assert run.config.strategy.name == "fedavgm"
    latest = run.run_dir.load_checkpoint("latest")
    assert latest is not None and latest["round"] == 2
    momentum = latest["strategy_state"]["momentum_vector"]
    assert momentum is not None and any(np.abs(array).max() > 0 for array in momentum), "FedAvgM stepped"


def test_a_16_bit_field_halves_the_masked_bytes_and_stays_within_its_bound(tiny_config) -> None:
    """compression.bits = 16 under SecAgg+: 16-bit masked vectors, every site weighing one (the sites hold 4 training
    cases each, so the plain weighted mean is the same mean), error feedback kept at each site."""
    plain = simulate(tiny_config(train={"rounds": 1}))
    wide = simulate(tiny_config(train={"rounds": 1}, secagg={"enabled": True}))
    narrow = simulate(tiny_config(train={"rounds": 1}, secagg={"enabled": True}, compression={"bits": 16}))
    row, wide_row = _rounds(narrow)[0], _rounds(wide)[0]
    bound = row["secagg_max_quantization_error"]
    assert wide_row["secagg_max_quantization_error"] < bound < 1e-4  # fewer levels: a coarser, still small grid
    plain_state, narrow_state = _final_state(plain), _final_state(narrow)
    worst = max(float((plain_state[key].float() - narrow_state[key].float()).abs().max()) for key in plain_state)
    assert 0 < worst <= bound + 1e-6
    values = sum(tensor.numel() for tensor in plain_state.values()) + 2  # the update, the weight, the clipped count
    for site in ("site-a", "site-b", "site-c"):
        # The key exchanges cost the same; the masked vector is 2 bytes per value instead of 4.
        assert 2 * values <= wide_row["upload_bytes"][site] - row["upload_bytes"][site] < 2 * values + 64
        assert (narrow.run_dir.path / "sites" / site / "compression_residual.pt").exists()
