"""The round's updates on the coordinator's disk: written as replies arrive, read back a slice at a time, and the
robust layer's results from them the same as from updates held in memory; the memory it takes does not grow with
the number of sites."""

from __future__ import annotations

import copy
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedmed.config import RobustConfig
from fedmed.flower.server.normalized_averaging import NormalizedAveraging
from fedmed.flower.server.robust import RobustAggregation, measure
from fedmed.flower.server.robust import updates as store
from fedmed.flower.server.robust.rules import RoundUpdates
from fedmed.flower.server.robust.updates import HeldUpdates, SpilledUpdates, UpdateStoreError, squared_distances
from fedmed.flower.wire import ARRAYS, METRICS, SITE, SITE_NAME

pytestmark = pytest.mark.usefixtures("server_task")


def _global(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv": rng.standard_normal((size // 2, 1)).astype(np.float32),
        "steps": np.array([7], dtype=np.int64),  # a counter: not part of any update
        "head": rng.standard_normal(size - size // 2).astype(np.float32),
    }


def _reply(site: str, start: dict[str, np.ndarray], *, seed: int, examples: int = 10, steps: int = 1) -> Message:
    rng = np.random.default_rng(seed)
    arrays = {
        key: Array(value + rng.standard_normal(value.shape).astype(value.dtype) if value.dtype.kind == "f" else value)
        for key, value in start.items()
    }
    content = RecordDict(
        {
            ARRAYS: ArrayRecord(arrays),
            METRICS: MetricRecord({"num-examples": examples, "train_steps": steps}),
            SITE: ConfigRecord({SITE_NAME: site}),
        }
    )
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=1 + seed, message_type="train"))


def _flat_update(reply: Message, start: dict[str, np.ndarray]) -> np.ndarray:
    received = reply.content[ARRAYS]
    return np.concatenate([(received[key].numpy().astype(np.float64) - start[key]).ravel() for key in ("conv", "head")])


def test_updates_come_back_slice_by_slice_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "SLICE_VALUES", 14)  # two sites read together: 25 values in slices of 7, 7, 7 and 4
    start = _global(25)
    replies = {site: _reply(site, start, seed=index) for index, site in enumerate("abc")}
    with SpilledUpdates(start, folder=tmp_path) as spilled:
        for site, reply in replies.items():
            spilled.add(site, reply.content[ARRAYS])
        blocks = list(spilled.slices(["c", "a"]))
        assert [offset for offset, _ in blocks] == [0, 7, 14, 21]
        read = np.concatenate([block for _, block in blocks], axis=1)
        expected = {site: _flat_update(reply, start) for site, reply in replies.items()}
        np.testing.assert_allclose(read, np.stack([expected["c"], expected["a"]]), rtol=1e-6)
        assert spilled.norms["b"] == pytest.approx(np.linalg.norm(expected["b"]), rel=1e-6)
        assert spilled.counters["a"]["steps"].numpy().tolist() == [7]
        np.testing.assert_allclose(spilled.row("b"), expected["b"], rtol=1e-6)
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == [], "the round's update files go with the round"
    left = SpilledUpdates(start, folder=tmp_path)  # a coordinator killed mid-round
    left.add("a", replies["a"].content[ARRAYS])
    SpilledUpdates.remove_stale(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_the_site_and_the_space_it_needs(tmp_path: Path) -> None:
    start = _global(10)
    with SpilledUpdates(start, folder=tmp_path) as spilled:
        (folder,) = tmp_path.iterdir()
        (folder / "0.f32").mkdir()  # where the first update goes, something that cannot be written
        with pytest.raises(UpdateStoreError, match=r"writing site a's update to .* failed.* free disk space"):
            spilled.add("a", _reply("a", start, seed=0).content[ARRAYS])
        assert "a" not in spilled.norms


def test_a_site_name_cannot_lead_the_update_file_out_of_its_folder(tmp_path: Path) -> None:
    """The site's name is what its reply says: a hostile one names a path elsewhere on the coordinator's disk."""
    start = _global(10)
    hostile = "../../escaped"
    (tmp_path / "run").mkdir()
    with SpilledUpdates(start, folder=tmp_path / "run") as spilled:
        spilled.add(hostile, _reply(hostile, start, seed=0).content[ARRAYS])
        written = [path for path in tmp_path.rglob("*") if path.is_file()]
        (folder,) = (tmp_path / "run").iterdir()
        assert [path.parent for path in written] == [folder]
        np.testing.assert_allclose(spilled.row(hostile), _flat_update(_reply(hostile, start, seed=0), start), rtol=1e-6)


def test_measurements_and_krum_from_slices_equal_those_on_whole_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "SLICE_VALUES", 25)
    rng = np.random.default_rng(3)
    updates = {site: rng.standard_normal(23) for site in "abcde"}
    updates["e"] = -4 * updates["a"]
    whole = {site: update.astype(np.float32) for site, update in updates.items()}
    settings = RobustConfig()
    sliced = measure(HeldUpdates(whole), settings=settings)
    for site, update in whole.items():
        centre = np.median(np.stack(list(whole.values())).astype(np.float64), axis=0)
        exact = update.astype(np.float64)
        cosine = float(exact @ centre / np.linalg.norm(exact) / np.linalg.norm(centre))
        assert sliced[site].cosine == pytest.approx(cosine, abs=1e-9)
    distances = squared_distances(HeldUpdates(whole), sorted(whole))
    for i, a in enumerate(sorted(whole)):
        for j, b in enumerate(sorted(whole)):
            assert distances[i, j] == pytest.approx(float(np.sum((whole[a] - whole[b]) ** 2.0)), rel=1e-6, abs=1e-9)
    # Krum from the sliced distances picks what Flower's own selection picks.
    kept = RobustAggregation(FedAvg(), settings=RobustConfig(rule="multi_krum", byzantine_sites=1, krum_select=2))
    contents = [RecordDict({"u": ArrayRecord({"u": Array(whole[site])})}) for site in sorted(whole)]
    flower = {id(content) for content in select_multikrum(contents, num_malicious_nodes=1, num_nodes_to_select=2)}
    expected = {site for site, content in zip(sorted(whole), contents, strict=True) if id(content) in flower}
    chosen = kept.rule(
        RoundUpdates(sites=sorted(whole), updates=HeldUpdates(whole), weights=[1.0] * 5, settings=kept.settings)
    )
    assert set(chosen.scales or {}) == expected


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "normalized"])
@pytest.mark.parametrize("rule", ["norm_bound", "median", "multi_krum"])
def test_spilled_and_held_updates_aggregate_alike(tmp_path: Path, strategy: str, rule: str) -> None:
    start = _global(40)
    replies = [
        _reply(site, start, seed=index, examples=5 + index, steps=1 + index) for index, site in enumerate("abcd")
    ]

    def layer() -> RobustAggregation:
        inner = {"fedavg": FedAvg(), "fedavgm": FedAvgM(server_momentum=0.5)}.get(strategy) or NormalizedAveraging(
            FedAvg()
        )
        robust = RobustAggregation(inner, settings=RobustConfig(rule=rule, byzantine_sites=0))
        list(robust.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord(), _Nodes()))
        return robust

    held, _ = layer().aggregate_train(1, [_copy(reply) for reply in replies])
    robust = layer()
    with SpilledUpdates(robust.sent, folder=tmp_path) as spilled:
        stripped = []
        for reply in map(_copy, replies):
            spilled.add(reply.content[SITE][SITE_NAME], reply.content[ARRAYS])
            del reply.content[ARRAYS]
            stripped.append(reply)
        robust.spilled = spilled
        streamed, _ = robust.aggregate_train(1, stripped)
    assert held is not None and streamed is not None
    for key in start:
        np.testing.assert_allclose(streamed[key].numpy(), held[key].numpy(), rtol=1e-5, atol=1e-6)


def test_the_coordinators_memory_does_not_grow_with_the_sites(tmp_path: Path) -> None:
    """Traced allocations (numpy's included) while 4 and then 16 sites' updates of a 2 MB model arrive and are
    aggregated: the peak is about the same."""
    start = _global(500_000)

    def peak(sites: int) -> int:
        robust = RobustAggregation(FedAvg(), settings=RobustConfig())
        list(robust.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord(), _Nodes()))
        tracemalloc.start()
        with SpilledUpdates(robust.sent, folder=tmp_path) as spilled:
            kept = []
            for index in range(sites):
                reply = _reply(f"s{index:02d}", start, seed=index)
                spilled.add(f"s{index:02d}", reply.content[ARRAYS])
                del reply.content[ARRAYS]
                kept.append(reply)
            robust.spilled = spilled
            robust.aggregate_train(1, kept)
        _, highest = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return highest

    few, many = peak(4), peak(16)
    assert many < 1.25 * few, f"peak {many / 1e6:.1f} MB with 16 sites, {few / 1e6:.1f} MB with 4"


class _Nodes:
    def get_node_ids(self) -> list[int]:
        return list(range(1, 20))


def _copy(reply: Message) -> Message:
    return Message(RecordDict(dict(reply.content.items())), metadata=copy.copy(reply.metadata))
