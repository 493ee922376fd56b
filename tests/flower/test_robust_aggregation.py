"""The robust layer on hand-worked updates: each rule's golden value, the per-site diagnostics, quarantine,
the case-count cap, the replies the coordinator refuses, and the rule composed with FedAvgM's momentum.

Sites send models; every expected value below is worked out by hand on the updates (model - global)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fedmed.config import RobustConfig, RunConfig, run_config_from_dict
from fedmed.core.errors import ConfigError
from fedmed.flower.server.reply_checks import refuse_implausible
from fedmed.flower.server.robust import QuarantineBook, RobustAggregation, capped_weights, measure
from fedmed.flower.server.strategies import build_strategy
from fedmed.flower.wire import ARRAYS, METRICS, SITE, SITE_NAME

pytestmark = pytest.mark.usefixtures("server_task")

START = [1.0, 1.0, 1.0]


class Nodes:
    def get_node_ids(self) -> list[int]:
        return list(range(1, 8))


def reply(site: str, update: list[float], *, examples: int = 10, **metrics: Any) -> Message:
    model = np.asarray(START) + np.asarray(update)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({"w": Array(model.astype(np.float32))}),
            METRICS: MetricRecord({"num-examples": examples, "train_steps": 1, **metrics}),
            SITE: ConfigRecord({SITE_NAME: site}),
        }
    )
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=1 + ord(site) - ord("a"), message_type="train"))


def aggregate(strategy: RobustAggregation, updates: dict[str, list[float]], **claims: int) -> np.ndarray:
    list(strategy.configure_train(1, ArrayRecord({"w": Array(np.asarray(START, np.float32))}), ConfigRecord(), Nodes()))
    replies = [reply(site, update, examples=claims.get(site, 10)) for site, update in updates.items()]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None
    return aggregated["w"].numpy() - np.asarray(START, np.float32)


def robust(rule: str, **settings: Any) -> RobustAggregation:
    return RobustAggregation(FedAvg(), settings=RobustConfig(rule=rule, leave_out_flagged=False, **settings))


# Five sites: four honest updates near (1, 0, 0) and one bad update.
HONEST = {"a": [1.0, 0.0, 0.0], "b": [1.2, 0.2, 0.0], "c": [0.8, -0.2, 0.0], "d": [1.0, 0.0, 0.4]}


def test_median_is_the_coordinate_wise_median() -> None:
    # Per coordinate over a, b, c, d and e = (-10, 0, 0): (-10, 0.8, 1, 1, 1.2) -> 1; (0, 0.2, -0.2, 0, 0) -> 0;
    # (0, 0, 0, 0.4, 0) -> 0.
    result = aggregate(robust("median"), {**HONEST, "e": [-10.0, 0.0, 0.0]})
    assert result == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)


def test_trimmed_mean_cuts_one_site_at_each_end_of_every_coordinate() -> None:
    # trim 0.2 of 5 sites = 1 per side. Coordinate 0: (-10, 0.8, 1, 1, 1.2) -> mean(0.8, 1, 1) = 0.9333;
    # coordinate 1: (-0.2, 0, 0, 0, 0.2) -> 0; coordinate 2: (0, 0, 0, 0, 0.4) -> 0.
    result = aggregate(robust("trimmed_mean", trim_fraction=0.2), {**HONEST, "e": [-10.0, 0.0, 0.0]})
    assert result == pytest.approx([2.8 / 3, 0.0, 0.0], abs=1e-6)


def test_krum_keeps_the_update_closest_to_its_neighbours() -> None:
    # n = 5, f = 1: each site's score sums its squared distances to its n - f - 2 = 2 nearest others.
    # a: to b 0.08, c 0.08, d 0.16 -> 0.16; b: a 0.08, d 0.24 (c 0.32) -> 0.32; c: a 0.08, d 0.24 -> 0.32;
    # d: a 0.16, b 0.24 -> 0.40; e is far from all. Krum keeps a.
    result = aggregate(robust("krum"), {**HONEST, "e": [-10.0, 0.0, 0.0]})
    assert result == pytest.approx(HONEST["a"], abs=1e-6)


def test_multi_krum_averages_the_n_minus_f_best_by_weight() -> None:
    # Keeps a, b, c, d (the four lowest scores); FedAvg averages them with weights 10, 10, 10, 30.
    result = aggregate(robust("multi_krum"), {**HONEST, "e": [-10.0, 0.0, 0.0]}, d=30)
    expected = (np.asarray(HONEST["a"]) + HONEST["b"] + np.asarray(HONEST["c"]) + 3 * np.asarray(HONEST["d"])) / 6
    assert result == pytest.approx(expected, abs=1e-6)


def test_norm_bound_scales_a_long_update_down_to_the_multiple_of_the_median_norm() -> None:
    # Norms: a 1, b ~1.2166, c ~0.8246, d ~1.0770, e 10; median ~1.0770 -> bound 2 x 1.0770 = 2.1541.
    # e becomes (-2.1541, 0, 0); the others are kept as they are; FedAvg averages the five equally.
    median_norm = float(np.median([1.0, np.hypot(1.2, 0.2), np.hypot(0.8, 0.2), np.hypot(1.0, 0.4), 10.0]))
    result = aggregate(robust("norm_bound", norm_bound_multiple=2.0), {**HONEST, "e": [-10.0, 0.0, 0.0]})
    honest_sum = np.sum([HONEST[site] for site in "abcd"], axis=0)
    assert result == pytest.approx((honest_sum + np.asarray([-2 * median_norm, 0.0, 0.0])) / 5, abs=1e-5)


def test_a_flagged_update_is_left_out_of_the_round_and_shown() -> None:
    strategy = RobustAggregation(FedAvg(), settings=RobustConfig(rule="mean"))
    result = aggregate(strategy, {**HONEST, "e": [-10.0, 0.0, 0.0]})
    assert result == pytest.approx(np.mean([HONEST[site] for site in "abcd"], axis=0), abs=1e-6)
    row = strategy.last_record["contributions"]["e"]
    assert row["flagged"] and row["left_out"] == "flagged" and row["weight"] == 0.0
    assert row["norm_ratio"] == pytest.approx(10 / np.hypot(1.0, 0.4), rel=1e-4)  # the median of the five norms
    assert row["cosine"] < -0.9
    assert not any(strategy.last_record["contributions"][site]["flagged"] for site in "abcd")


def test_a_vouched_for_sites_unusual_update_is_kept_at_a_weight_scaled_by_its_cosine() -> None:
    # e = (0.3, 0, 1): cosine 0.2873 to the median (1, 0, 0), 0.6828 below the median cosine 0.9701; re-admitted by
    # the coordinator, its weight is 10 x 0.2873/0.9701 = 2.962 beside the others' 10 each; norm 1.044, under
    # 2 x the median norm 1.0770.
    strategy = RobustAggregation(FedAvg(), settings=RobustConfig(rule="mean"))
    strategy.book.restore({"quarantined": {"e": {"round": 3, "evidence": "..."}}})
    strategy.book.readmit(["e"], server_round=4)
    unusual = [0.3, 0.0, 1.0]
    result = aggregate(strategy, {**HONEST, "e": unusual})
    trust = (0.3 / np.hypot(0.3, 1.0)) / (0.8 / np.hypot(0.8, 0.2))
    expected = (10 * np.sum([HONEST[site] for site in "abcd"], axis=0) + 10 * trust * np.asarray(unusual)) / (
        40 + 10 * trust
    )
    assert result == pytest.approx(expected, abs=1e-5)
    row = strategy.last_record["contributions"]["e"]
    assert row["unusual"] and not row["flagged"] and row["left_out"] is None
    assert row["weight"] == pytest.approx(10 * trust, abs=1e-3) and row["trust"] == pytest.approx(trust, abs=1e-4)
    assert not strategy.book.recent["e"][-1]  # it does not count towards quarantine


def test_the_rule_hands_fedavgm_its_result_so_momentum_steps_from_it() -> None:
    # Median update (1, 0, 0); FedAvgM with server learning rate 1 and momentum 0.5: round 1 steps by the
    # median, round 2 (same updates, from the new global) by median + 0.5 x previous = (1.5, 0, 0).
    strategy = RobustAggregation(
        FedAvgM(server_learning_rate=1.0, server_momentum=0.5), settings=RobustConfig(rule="median")
    )
    updates = {**HONEST, "e": [-10.0, 0.0, 0.0]}
    first = aggregate(strategy, updates)
    assert first == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    list(strategy.configure_train(2, ArrayRecord({"w": Array(np.asarray(START, np.float32))}), ConfigRecord(), Nodes()))
    second, _ = strategy.aggregate_train(2, [reply(site, update) for site, update in updates.items()])
    assert second["w"].numpy() - np.asarray(START) == pytest.approx([1.5, 0.0, 0.0], abs=1e-6)


def test_diagnostics_flag_long_and_opposed_updates_but_not_honest_spread() -> None:
    settings = RobustConfig()
    updates = {site: np.asarray(update) for site, update in HONEST.items()}
    honest = measure(updates, settings=settings)
    assert not any(contribution.flagged or contribution.unusual for contribution in honest.values())
    noisy = measure({**updates, "e": np.asarray([-0.1, 0.0, 3.0])}, settings=settings)
    # The coordinate-wise median of the five is (1, 0, 0). Cosines: a 1, b 1.2/1.2166 = 0.9864, c 0.8/0.8246 =
    # 0.9701, d 1/1.0770 = 0.9285, e -0.1/3.0017; their median 0.9701, so e is 1.0034 below it: score 1.0034 / 0.3.
    # e's norm, 3.0017 / median(1, 1.2166, 0.8246, 1.0770, 3.0017) = 2.787, stays under 4: its direction, far
    # below the others' and against them, flags it.
    assert noisy["e"].cosine_gap == pytest.approx(0.8 / np.hypot(0.8, 0.2) + 0.1 / np.hypot(0.1, 3), abs=1e-4)
    assert noisy["e"].score == pytest.approx(noisy["e"].cosine_gap / 0.3, abs=1e-6) and noisy["e"].flagged
    assert noisy["e"].norm_ratio == pytest.approx(np.hypot(0.1, 3) / np.hypot(1.0, 0.4), abs=1e-4)
    # As far below the others but still their way (cosine 0.3/1.0440 = 0.2873): flagged, unless the coordinator has
    # vouched for e (re-admitted it): then unusual, kept, weight x 0.2873/0.9701; against them it is flagged still.
    different = {**updates, "e": np.asarray([0.3, 0.0, 1.0])}
    assert measure(different, settings=settings)["e"].flagged
    other = measure(different, settings=settings, vouched={"e"})["e"]
    assert other.unusual and not other.flagged and other.score > 1
    assert other.trust == pytest.approx((0.3 / np.hypot(0.3, 1.0)) / (0.8 / np.hypot(0.8, 0.2)), abs=1e-6)
    assert measure({**updates, "e": np.asarray([-0.1, 0.0, 3.0])}, settings=settings, vouched={"e"})["e"].flagged
    scaled = measure({**updates, "e": np.asarray([5.0, 0.0, 0.0])}, settings=settings)
    assert scaled["e"].flagged and scaled["e"].cosine == pytest.approx(1.0)  # same direction, 5x as long
    two = measure({"a": np.asarray([1.0, 0.0]), "b": np.asarray([-50.0, 0.0])}, settings=settings)
    assert not any(c.flagged for c in two.values())  # with two sites neither can be called the outlier


def test_quarantine_after_k_flags_within_the_window_until_readmitted() -> None:
    bad = measure({"a": np.ones(2), "b": np.ones(2), "c": np.ones(2), "d": -10 * np.ones(2)}, settings=RobustConfig())
    good = measure({site: np.ones(2) for site in "abcd"}, settings=RobustConfig())

    def quarantined_at(pattern: str) -> int | None:
        """The round at which d is quarantined when it is flagged in the rounds marked B (3 flags within 6 rounds)."""
        book = QuarantineBook(quarantine_after=3, window=6)
        for server_round, mark in enumerate(pattern, start=1):
            if book.note_round(bad if mark == "B" else good, server_round=server_round):
                return server_round
        return None

    assert quarantined_at("BBB") == 3
    assert quarantined_at("BGBGB") == 5  # broken labels can be flagged every other round
    assert quarantined_at("BGGGGBB") is None  # round 1's flag has left the window of rounds 2-7
    assert quarantined_at("BGGGBB") == 6  # ... but is within rounds 1-6
    book = QuarantineBook(quarantine_after=3, window=6)
    for server_round in (1, 2, 3):
        events = book.note_round(bad, server_round=server_round)
    assert [(e["site"], e["round"], e["event"]) for e in events] == [("d", 3, "quarantined")]
    assert (
        "flagged in 3 of its last 3 rounds: round 1:" in events[0]["evidence"] and "round 3:" in events[0]["evidence"]
    )
    restored = QuarantineBook(quarantine_after=3, window=6)
    restored.restore(book.state())
    assert restored.holds("d")
    assert [e["event"] for e in restored.readmit(["d", "a"], server_round=4)] == ["readmitted"]
    assert not restored.holds("d") and "d" not in restored.recent
    assert restored.note_round(bad, server_round=4) == []  # its count starts afresh
    assert restored.vouched == {"d"} and restored.state()["vouched"] == ["d"]
    assert bad["d"].flagged  # pointing against the others: flagged even once vouched for (measure's golden test)


def test_a_site_cannot_claim_the_federation_with_its_case_count() -> None:
    assert capped_weights({"a": 10, "b": 20, "c": 1_000_000}, max_ratio=10) == {"a": 10, "b": 20, "c": 200}


@pytest.mark.parametrize(
    ("metrics", "update", "reason"),
    [
        ({"train_loss": float("nan")}, [0.0, 0.0, 0.0], "training loss is nan"),
        ({"dice": 1.5}, [0.0, 0.0, 0.0], "outside [0, 1]"),
        ({"num-examples": 1_000_000}, [0.0, 0.0, 0.0], "claims 1000000 cases"),
        ({}, [0.0, float("inf"), 0.0], "NaN or infinite"),
    ],
)
def test_an_implausible_reply_is_refused_for_its_site_alone(metrics: dict, update: list[float], reason: str) -> None:
    sent = ArrayRecord({"w": Array(np.asarray(START, np.float32))})
    bad = reply("b", update, **{"num-examples": 10, **metrics})
    passed, refused = refuse_implausible([reply("a", [0.1, 0, 0]), bad], sent=sent, settings=RobustConfig())
    assert [m.content[SITE][SITE_NAME] for m in passed] == ["a"]
    assert reason in refused["b"] and refused["b"].startswith("site b:")


def test_an_undefined_metric_is_not_an_impossible_one() -> None:
    # An evaluation on a site whose validation cases hold one class has no AUC: NaN, as the task reports it.
    evaluated = reply("a", [0.0, 0.0, 0.0], auc=float("nan"), dice=float("nan"))
    passed, refused = refuse_implausible([evaluated], sent=None, settings=RobustConfig())
    assert len(passed) == 1 and refused == {}


def test_a_reply_for_another_model_is_refused() -> None:
    sent = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    passed, refused = refuse_implausible([reply("a", [0.0, 0.0, 0.0])], sent=sent, settings=RobustConfig())
    assert passed == [] and "shape (3,)" in refused["a"] and "(4,)" in refused["a"]


def test_a_float32_update_to_a_float64_round_is_accepted() -> None:
    # FedAdam's step makes the global arrays float64; the sites still train and reply in float32.
    sent = ArrayRecord({"w": Array(np.asarray(START, np.float64))})
    passed, refused = refuse_implausible([reply("a", [0.1, 0.0, 0.0])], sent=sent, settings=RobustConfig())
    assert len(passed) == 1 and refused == {}


def run_config(tmp_path: Path, sites: int, **sections: Any) -> RunConfig:
    raw = {
        "name": "t",
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [32, 32]},
        "sites": [{"name": f"s{i}", "path": f"data/s{i}"} for i in range(sites)],
        **sections,
    }
    return run_config_from_dict(raw, base=tmp_path)


def test_the_default_strategy_is_wrapped_by_the_robust_layer_except_under_secure_aggregation(tmp_path: Path) -> None:
    assert isinstance(build_strategy(run_config(tmp_path, 3)), RobustAggregation)
    secure = run_config(tmp_path, 3, secagg={"enabled": True})
    assert not isinstance(build_strategy(secure), RobustAggregation)


@pytest.mark.parametrize(
    ("sites", "sections", "words"),
    [
        (4, {"robust": {"rule": "krum"}}, "needs at least 5 sites"),
        (5, {"robust": {"rule": "median"}, "client_dp": {"enabled": True}}, "cannot run under client_dp"),
        (5, {"robust": {"rule": "median"}, "secagg": {"enabled": True}}, "masked sum"),
        (5, {"robust": {"update_norm_bound": 1.0}}, "applies under secagg only"),
        (5, {"robust": {"rule": "geomedian"}}, "unknown aggregation rule 'geomedian'"),
    ],
)
def test_rules_the_federation_cannot_run_are_refused(tmp_path: Path, sites: int, sections: dict, words: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=None) as caught:
        build_strategy(run_config(tmp_path, sites, **sections))
    assert words in str(caught.value)
