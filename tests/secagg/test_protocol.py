"""SecAgg+ core: the two state machines driven directly, with real crypto and no Flower transport.

Every message and reply still passes through Flower's ConfigRecord / ArrayRecord, so the tests
also prove the data fits the records the transport will use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedmed.secagg import (
    SecAggClient,
    SecAggInputError,
    SecAggProtocolError,
    SecAggResult,
    SecAggRoundError,
    SecAggServer,
    SecAggSettings,
)
from fedmed.secagg.encoding import VectorLayout, encode_contribution, flatten_update

SHAPES = [(40, 50), (7000,), (10, 10, 10)]  # 10,000 values in arrays of several ranks
NUM_PARAMS = sum(int(np.prod(s)) for s in SHAPES)
SETUP, SHARE_KEYS, MASKED_INPUT, UNMASK = "setup", "share-keys", "masked-input", "unmask"


@dataclass
class Round:
    result: SecAggResult
    server: SecAggServer
    clients: dict[int, SecAggClient]
    replies: list[tuple[str, int, Any]] = field(default_factory=list)  # everything the server received


def make_updates(
    ids: Sequence[int], *, seed: int = 0, shapes: Sequence[tuple[int, ...]] = SHAPES, scale: float = 0.45
) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {nid: [rng.uniform(-scale, scale, size=s).astype(np.float32) for s in shapes] for nid in ids}


def plain_mean(
    updates: Mapping[int, list[np.ndarray]], weights: Mapping[int, int], ids: Sequence[int], *, clip: float = 0.5
) -> list[np.ndarray]:
    total = sum(weights[i] for i in ids)
    return [
        sum(weights[i] * np.clip(updates[i][k].astype(np.float64), -clip, clip) for i in ids) / total
        for k in range(len(updates[ids[0]]))
    ]


def max_error(result: SecAggResult, expected: list[np.ndarray]) -> float:
    return max(float(np.abs(got.astype(np.float64) - want).max()) for got, want in zip(result.mean_update, expected))


def _via_config_record(message: Mapping[str, Any]) -> dict[str, Any]:
    return dict(ConfigRecord(dict(message)))  # raises if a value is not ConfigRecord-compatible


def _via_array_record(vector: np.ndarray) -> np.ndarray:
    return ArrayRecord({"masked": Array(vector)})["masked"].numpy()


def run_round(
    ids: Sequence[int],
    updates: Mapping[int, list[np.ndarray]],
    weights: Mapping[int, int],
    *,
    settings: SecAggSettings | None = None,
    lose: Mapping[str, set[int]] | None = None,
    roundtrip: bool = False,
    extra: Mapping[int, list[int]] | None = None,
    clients: dict[int, SecAggClient] | None = None,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    shuffle_seed: int = 0,
) -> Round:
    """One round; `lose[stage]` are the nodes that never answer that stage's message."""
    lose = lose or {}
    server = SecAggServer(
        node_ids=list(ids),
        shapes=shapes,
        settings=settings,
        extra_length=len(next(iter(extra.values()))) if extra else 0,
        shuffle_seed=shuffle_seed,
    )
    clients = clients if clients is not None else {nid: SecAggClient(node_id=nid) for nid in ids}
    seen: list[tuple[str, int, Any]] = []

    def step(stage: str, messages: dict[int, dict[str, Any]], call: Any) -> dict[int, Any]:
        replies = {}
        for nid, message in messages.items():
            if nid in lose.get(stage, set()):
                continue
            client = clients[nid]
            if roundtrip:  # deployment: a fresh process per stage, state reloaded from context.state
                client = SecAggClient.from_record(_via_config_record(client.state_to_record()), node_id=nid)
            reply = call(client, _via_config_record(message))
            if roundtrip:
                clients[nid] = SecAggClient.from_record(_via_config_record(client.state_to_record()), node_id=nid)
            if isinstance(reply, tuple):
                reply = (_via_array_record(reply[0]), _via_config_record(reply[1]))
            else:
                reply = _via_config_record(reply)
            seen.append((stage, nid, reply))
            replies[nid] = reply
        return replies

    messages = server.setup_messages()
    messages = server.receive_public_keys(step(SETUP, messages, lambda c, msg: c.setup(msg)))
    messages = server.receive_encrypted_shares(step(SHARE_KEYS, messages, lambda c, msg: c.share_keys(msg)))
    messages = server.receive_masked_vectors(
        step(
            MASKED_INPUT,
            messages,
            lambda c, msg: c.mask(
                msg,
                update=updates[c.node_id],
                weight=weights[c.node_id],
                extra_counts=extra[c.node_id] if extra else None,
            ),
        )
    )
    result = server.receive_unmask_shares(step(UNMASK, messages, lambda c, msg: c.unmask(msg)))
    return Round(result=result, server=server, clients=clients, replies=seen)


# ---------------------------------------------------------------------------- correctness


def test_settings_give_fine_levels_and_small_bound() -> None:
    settings = SecAggSettings()
    assert settings.levels == 65534  # largest even L with 2^16 * L <= 2^32 - 1
    assert settings.max_quantization_error < 1e-4
    assert settings.stage_timeout_s == 120.0
    for bad in (
        {"clipping_range": 0.0},
        {"max_total_weight": 0},
        {"reconstruction_threshold": 1},
        {"num_shares": 4},
        {"stage_timeout_s": float("inf")},
        {"max_total_weight": 2**31 + 1},
    ):
        with pytest.raises(SecAggInputError):
            SecAggSettings(**bad)


@pytest.mark.parametrize("num_sites", [3, 5])
def test_secure_weighted_mean_matches_plain_mean(num_sites: int) -> None:
    ids = [101 + 7 * i for i in range(num_sites)]
    updates = make_updates(ids, seed=num_sites)
    weights = dict(zip(ids, [120, 3000, 57, 800, 9]))
    rnd = run_round(ids, updates, weights)
    result = rnd.result
    assert result.sites_aggregated == sorted(ids) and result.sites_dropped == {}
    assert result.total_weight == sum(weights.values())
    assert result.clipped_values == 0
    assert [a.shape for a in result.mean_update] == SHAPES
    assert all(a.dtype == np.float32 for a in result.mean_update)
    error = max_error(result, plain_mean(updates, weights, ids))
    assert error <= result.max_quantization_error < 1e-4
    assert error > 0  # the comparison is real: quantisation leaves a measurable trace


def test_vectors_are_uint32_and_about_model_size() -> None:
    ids = [1, 2, 3]
    rnd = run_round(ids, make_updates(ids), {1: 5, 2: 6, 3: 7})
    vectors = [reply[0] for stage, _, reply in rnd.replies if stage == MASKED_INPUT]
    assert len(vectors) == 3
    for vector in vectors:
        assert vector.dtype == np.uint32 and vector.shape == (NUM_PARAMS + 2,)
        assert vector.nbytes <= 1.5 * NUM_PARAMS * 4
    assert rnd.server.vector_length == NUM_PARAMS + 2


def test_extra_counts_are_summed_securely() -> None:
    ids = [4, 5, 6]
    extra = {4: [1, -2, 0], 5: [0, 5, 1], 6: [3, 0, 1]}
    rnd = run_round(ids, make_updates(ids), {4: 10, 5: 20, 6: 30}, extra=extra)
    assert rnd.result.extra_sums is not None
    assert rnd.result.extra_sums.tolist() == [4, 3, 2]
    assert rnd.server.vector_length == NUM_PARAMS + 2 + 3


def test_clipped_values_are_counted_and_reported() -> None:
    ids = [1, 2, 3]
    updates = make_updates(ids)
    updates[2][1][:25] = 2.0
    updates[3][0][0, :12] = -1.5
    weights = {1: 10, 2: 10, 3: 10}
    rnd = run_round(ids, updates, weights)
    assert rnd.result.clipped_values == 37
    assert max_error(rnd.result, plain_mean(updates, weights, ids)) <= rnd.result.max_quantization_error


def test_state_round_trip_between_every_stage_gives_the_same_result() -> None:
    ids = [9, 8, 7, 6]
    updates = make_updates(ids, seed=3)
    weights = {9: 1, 8: 40, 7: 300, 6: 2}
    direct = run_round(ids, updates, weights).result
    reloaded = run_round(ids, updates, weights, roundtrip=True).result
    # Masks differ between the runs, but they cancel exactly: the decoded means are bit-identical.
    assert all(np.array_equal(a, b) for a, b in zip(direct.mean_update, reloaded.mean_update))
    assert reloaded.total_weight == direct.total_weight == 343


def test_state_record_survives_masked_input_with_dropout_recovery() -> None:
    ids = [10, 20, 30, 40, 50]
    updates = make_updates(ids, seed=5)
    weights = dict(zip(ids, [3, 4, 5, 6, 7]))
    rnd = run_round(ids, updates, weights, roundtrip=True, lose={MASKED_INPUT: {30}})
    survivors = [10, 20, 40, 50]
    assert rnd.result.sites_aggregated == survivors
    assert max_error(rnd.result, plain_mean(updates, weights, survivors)) <= rnd.result.max_quantization_error


def test_fresh_keys_every_round() -> None:
    ids = [1, 2, 3]
    clients = {nid: SecAggClient(node_id=nid) for nid in ids}
    first = run_round(ids, make_updates(ids), {1: 1, 2: 2, 3: 3}, clients=clients)
    second = run_round(ids, make_updates(ids), {1: 1, 2: 2, 3: 3}, clients=clients)
    keys = [[reply["pk1"] for stage, _, reply in rnd.replies if stage == SETUP] for rnd in (first, second)]
    commitments = [
        [reply["seed_commitment"] for stage, _, reply in rnd.replies if stage == SHARE_KEYS] for rnd in (first, second)
    ]
    assert not set(keys[0]) & set(keys[1])
    assert not set(commitments[0]) & set(commitments[1])
    assert all(client.stage == "idle" and client.state_to_record()["sk1"] == b"" for client in clients.values())


def test_one_million_parameters_is_exact_within_bound() -> None:
    # Its speed is measured by experiments/bench_secagg_core.py (1M parameters, 3 and 5 sites), not asserted here.
    ids = [1, 2, 3]
    shapes = [(1000, 1000)]
    updates = make_updates(ids, shapes=shapes, scale=0.3)
    weights = {1: 100, 2: 250, 3: 17}
    rnd = run_round(ids, updates, weights, shapes=shapes)
    assert max_error(rnd.result, plain_mean(updates, weights, ids)) <= rnd.result.max_quantization_error


def test_ring_neighbourhoods_for_many_sites_with_large_node_ids() -> None:
    ids = [2**63 - 1 - 104729 * i for i in range(13)]
    updates = make_updates(ids, seed=13, shapes=[(500,)])
    weights = {nid: 1 + i for i, nid in enumerate(ids)}
    settings = SecAggSettings(num_shares=5)
    rnd = run_round(
        ids, updates, weights, settings=settings, shapes=[(500,)], lose={SETUP: {ids[0]}, MASKED_INPUT: {ids[5]}}
    )
    nbrs = rnd.server.neighbourhoods
    assert all(len(n) == 5 and nid in n for nid, n in nbrs.items())
    assert all(u in nbrs[v] for u in ids for v in nbrs[u])  # symmetric
    assert rnd.server.threshold == 3
    survivors = [nid for nid in ids if nid not in (ids[0], ids[5])]
    assert rnd.result.sites_aggregated == sorted(survivors)
    assert rnd.result.sites_dropped == {ids[0]: SETUP, ids[5]: MASKED_INPUT}
    assert max_error(rnd.result, plain_mean(updates, weights, survivors)) <= rnd.result.max_quantization_error


# ---------------------------------------------------------------------------- privacy


def test_server_never_receives_an_individual_update() -> None:
    ids = [31, 32, 33]
    updates = make_updates(ids, seed=7)
    weights = {31: 300, 32: 20, 33: 4000}
    rnd = run_round(ids, updates, weights)
    settings = SecAggSettings()
    layout = VectorLayout(num_params=NUM_PARAMS)
    raw_prefixes = [np.concatenate([a.ravel() for a in updates[nid]]).tobytes()[:64] for nid in ids]
    for stage, nid, reply in rnd.replies:
        fields = reply[1] if stage == MASKED_INPUT else reply
        for value in fields.values():  # no float data and no raw update bytes in any reply field
            assert not isinstance(value, (float, np.ndarray))
            for item in value if isinstance(value, list) else [value]:
                assert not isinstance(item, float)
                if isinstance(item, bytes):
                    assert not any(prefix in item for prefix in raw_prefixes)
        if stage != MASKED_INPUT:
            continue
        masked = reply[0].astype(np.float64)
        plain, _ = encode_contribution(
            flatten_update(updates[nid], num_params=NUM_PARAMS),
            weight=weights[nid],
            extra_counts=None,
            layout=layout,
            clipping_range=settings.clipping_range,
            levels=settings.levels,
            max_total_weight=settings.max_total_weight,
            num_sites=3,
        )
        # The plain vector lives below w * L << 2^32; the masked one is uniform over [0, 2^32).
        assert abs(np.corrcoef(masked[:NUM_PARAMS], plain[:NUM_PARAMS].astype(np.float64))[0, 1]) < 0.05
        assert abs(masked.mean() / 2**32 - 0.5) < 0.02
        assert abs(np.mean(masked < 2**31) - 0.5) < 0.02
        assert np.mean(reply[0] == plain) < 0.001
        assert int(reply[0][NUM_PARAMS]) != weights[nid]  # the weight is masked too


def _keys_shared(ids: list[int], *, size: int) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, Any]]:
    """Server and clients driven by hand through setup and key sharing: the masked-input messages, ready for
    tests that tamper with what follows."""
    server = SecAggServer(node_ids=ids, shapes=[(size,)])
    clients = {nid: SecAggClient(node_id=nid) for nid in ids}
    messages = server.setup_messages()
    messages = server.receive_public_keys({n: clients[n].setup(msg) for n, msg in messages.items()})
    return (
        server,
        clients,
        server.receive_encrypted_shares({n: clients[n].share_keys(msg) for n, msg in messages.items()}),
    )


def test_client_refuses_to_reveal_both_shares_of_a_peer() -> None:
    server, clients, messages = _keys_shared([1, 2, 3, 4], size=20)
    update = [np.zeros(20, np.float32)]
    messages = server.receive_masked_vectors(
        {n: clients[n].mask(msg, update=update, weight=1) for n, msg in messages.items()}
    )
    honest = messages[1]
    malicious = dict(honest, dropped_nids=[2])  # node 2 both active and dropped
    with pytest.raises(SecAggProtocolError, match="both active and dropped"):
        clients[1].unmask(malicious)
    with pytest.raises(SecAggProtocolError, match="below the threshold"):
        clients[1].unmask(dict(honest, active_nids=[1, 2], dropped_nids=[3, 4]))
    # A second masked vector under the same masks would leak the difference of two updates.
    with pytest.raises(SecAggProtocolError, match="last completed stage"):
        clients[1].mask(honest, update=update, weight=1)
    clients[1].unmask(honest)
    with pytest.raises(SecAggProtocolError, match="last completed stage"):
        clients[1].unmask(dict(honest, active_nids=[1, 3, 4], dropped_nids=[2]))  # only once per round


def test_client_rejects_tampered_keys_and_stale_rounds() -> None:
    ids = [1, 2, 3]
    server = SecAggServer(node_ids=ids, shapes=[(10,)])
    clients = {nid: SecAggClient(node_id=nid) for nid in ids}
    messages = server.setup_messages()
    messages = server.receive_public_keys({n: clients[n].setup(msg) for n, msg in messages.items()})
    tampered = dict(messages[1], pk1s=[messages[2]["pk1s"][1], *messages[1]["pk1s"][1:]])
    with pytest.raises(SecAggProtocolError):
        clients[1].share_keys(tampered)
    with pytest.raises(SecAggProtocolError, match="belongs to round"):
        clients[1].share_keys(dict(messages[1], round_id="another-round"))


# ---------------------------------------------------------------------------- dropouts

FIVE = [11, 22, 33, 44, 55]
FIVE_WEIGHTS = dict(zip(FIVE, [30, 70, 5, 400, 12]))


@pytest.mark.parametrize("stage", [SETUP, SHARE_KEYS, MASKED_INPUT])
def test_one_site_lost_before_unmasking_is_excluded(stage: str) -> None:
    updates = make_updates(FIVE, seed=11)
    rnd = run_round(FIVE, updates, FIVE_WEIGHTS, lose={stage: {33}})
    survivors = [11, 22, 44, 55]
    result = rnd.result
    assert result.sites_aggregated == survivors
    assert result.sites_dropped == {33: stage}
    assert result.total_weight == sum(FIVE_WEIGHTS[n] for n in survivors)
    assert max_error(result, plain_mean(updates, FIVE_WEIGHTS, survivors)) <= result.max_quantization_error


def test_site_lost_during_unmasking_is_tolerated_and_still_aggregated() -> None:
    updates = make_updates(FIVE, seed=12)
    rnd = run_round(FIVE, updates, FIVE_WEIGHTS, lose={UNMASK: {22, 55}})  # 3 of 5 answer; threshold 3
    result = rnd.result
    assert result.sites_aggregated == FIVE and result.sites_silent_at_unmask == [22, 55]
    assert max_error(result, plain_mean(updates, FIVE_WEIGHTS, FIVE)) <= result.max_quantization_error


def test_sites_lost_at_every_stage_at_once() -> None:
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # threshold 5
    updates = make_updates(ids, seed=14)
    weights = {nid: nid * 3 for nid in ids}
    rnd = run_round(ids, updates, weights, lose={SETUP: {1}, SHARE_KEYS: {2}, MASKED_INPUT: {3}, UNMASK: {4}})
    survivors = [4, 5, 6, 7, 8, 9]  # 4 masked its input, so it is in the mean; 5 shares per secret remain
    assert rnd.result.sites_aggregated == survivors and rnd.result.sites_silent_at_unmask == [4]
    assert rnd.result.sites_dropped == {1: SETUP, 2: SHARE_KEYS, 3: MASKED_INPUT}
    assert max_error(rnd.result, plain_mean(updates, weights, survivors)) <= rnd.result.max_quantization_error


@pytest.mark.parametrize(
    ("lose", "stage", "named"),
    [
        ({SETUP: {22, 33, 44}}, SETUP, [22, 33, 44]),
        ({SHARE_KEYS: {11, 55, 44}}, SHARE_KEYS, [11, 44, 55]),
        ({MASKED_INPUT: {11, 22, 33}}, MASKED_INPUT, [11, 22, 33]),
        ({UNMASK: {11, 22, 33}}, UNMASK, [11, 22, 33]),
        ({SETUP: {11}, MASKED_INPUT: {22}, UNMASK: {33}}, UNMASK, [11, 22, 33]),
    ],
)
def test_too_many_sites_lost_fails_the_round_clearly(lose: dict[str, set[int]], stage: str, named: list[int]) -> None:
    with pytest.raises(SecAggRoundError) as info:
        run_round(FIVE, make_updates(FIVE), FIVE_WEIGHTS, lose=lose)
    error = info.value
    assert error.stage == stage
    assert sorted(error.lost) == named
    message = str(error)
    assert f"failed at stage '{stage}'" in message and "Fix:" in message and "No aggregate" in message
    assert all(f"node {nid}" in message for nid in named)


def test_two_sites_cannot_lose_anyone() -> None:
    with pytest.raises(SecAggRoundError, match="fewer than the threshold 2"):
        run_round([1, 2], make_updates([1, 2]), {1: 1, 2: 1}, lose={SHARE_KEYS: {2}})


def test_malformed_reply_counts_as_a_dropout() -> None:
    server, clients, messages = _keys_shared([1, 2, 3, 4], size=10)
    replies = {n: clients[n].mask(msg, update=[np.full(10, 0.25, np.float32)], weight=2) for n, msg in messages.items()}
    replies[4] = (replies[4][0].astype(np.int64), replies[4][1])  # wrong dtype
    messages = server.receive_masked_vectors(replies)
    result = server.receive_unmask_shares({n: clients[n].unmask(msg) for n, msg in messages.items()})
    assert result.sites_dropped == {4: MASKED_INPUT}
    assert np.allclose(result.mean_update[0], 0.25, atol=result.max_quantization_error)
    assert result.total_weight == 6


# ---------------------------------------------------------------------------- inputs and guards


def test_weight_above_max_total_weight_is_refused_by_the_site() -> None:
    with pytest.raises(SecAggInputError, match="max_total_weight"):
        run_round([1, 2, 3], make_updates([1, 2, 3]), {1: 2**16 + 1, 2: 1, 3: 1})
    with pytest.raises(SecAggInputError, match="weight"):
        run_round([1, 2, 3], make_updates([1, 2, 3]), {1: 0, 2: 1, 3: 1})


def test_total_weight_above_max_fails_instead_of_wrapping() -> None:
    settings = SecAggSettings(max_total_weight=100)
    with pytest.raises(SecAggRoundError, match="max_total_weight"):
        run_round([1, 2, 3], make_updates([1, 2, 3]), {1: 60, 2: 60, 3: 60}, settings=settings)


def test_bad_updates_are_refused_with_a_reason() -> None:
    ids = [1, 2, 3]
    bad = make_updates(ids)
    bad[2][0][0, 0] = np.nan
    with pytest.raises(SecAggInputError, match="NaN"):
        run_round(ids, bad, {1: 1, 2: 1, 3: 1})
    short = make_updates(ids)
    short[1] = short[1][:2]
    with pytest.raises(SecAggInputError, match="same model layout"):
        run_round(ids, short, {1: 1, 2: 1, 3: 1})


def test_server_steps_must_run_in_order() -> None:
    server = SecAggServer(node_ids=[1, 2, 3], shapes=[(4,)])
    with pytest.raises(SecAggProtocolError, match="setup_messages"):
        server.receive_public_keys({})
    server.setup_messages()
    with pytest.raises(SecAggProtocolError, match="not sent a message"):
        server.receive_public_keys({99: {}})


def test_masked_vectors_added_one_at_a_time_give_the_round_and_a_repeat_is_refused() -> None:
    # The coordinator adds each vector to the running sum as its reply arrives and lets the reply go.
    server, clients, messages = _keys_shared([1, 2, 3, 4, 5], size=30)
    updates = {nid: [np.full(30, 0.01 * nid, np.float32)] for nid in clients}
    masked = {n: clients[n].mask(msg, update=updates[n], weight=n) for n, msg in messages.items() if n != 4}
    masked[5] = (masked[5][0][:-1], masked[5][1])  # a malformed vector loses its site, not the round
    for nid in (3, 1, 5, 2):
        server.add_masked_vector(nid, masked[nid])
    assert np.array_equal(server._sum, masked[1][0] + masked[2][0] + masked[3][0])  # uint32: wraps like the sum
    messages = server.masked_vectors_done()
    assert sorted(messages) == [1, 2, 3]
    result = server.receive_unmask_shares({n: clients[n].unmask(msg) for n, msg in messages.items()})
    assert result.sites_aggregated == [1, 2, 3] and set(result.sites_dropped) == {4, 5}
    expected = sum(updates[n][0] * n for n in (1, 2, 3)) / 6
    assert np.abs(result.mean_update[0] - expected).max() <= result.max_quantization_error

    server, clients, messages = _keys_shared([1, 2, 3], size=30)
    vector = clients[1].mask(messages[1], update=[np.zeros(30, np.float32)], weight=1)
    server.add_masked_vector(1, vector)
    with pytest.raises(SecAggProtocolError, match="replied already"):
        server.add_masked_vector(1, vector)
