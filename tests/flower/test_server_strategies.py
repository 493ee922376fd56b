"""The coordinator's aggregation rules on hand-built updates: FedAvgM's server momentum (also from a
secure round's mean), normalized (FedNova) averaging, their state across a restart, and the config
combinations they refuse.

Every expected value is worked out by hand in the test, on two sites with weights 1 and 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedAvgM, Strategy

from fedmed.config import RunConfig, run_config_from_dict
from fedmed.core.errors import ConfigError
from fedmed.flower.server.normalized_averaging import NormalizedAveraging, NormalizedAveragingError
from fedmed.flower.server.robust import RobustAggregation
from fedmed.flower.server.secure_round import step_from_mean
from fedmed.flower.server.strategies import build_strategy, restore_strategy_state, strategy_state
from fedmed.flower.wire import ARRAYS, METRICS, SITE, SITE_NAME
from fedmed.runs import RunDirectory

pytestmark = pytest.mark.usefixtures("server_task")

SITES = [{"name": "a", "path": "data/a"}, {"name": "b", "path": "data/b"}]


class TwoSites:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def config(tmp_path: Path, **changes: Any) -> RunConfig:
    raw: dict[str, Any] = {
        "name": "t",
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [32, 32]},
        "sites": SITES,
        **changes,
    }
    return run_config_from_dict(raw, base=tmp_path)


def inner(strategy: Strategy) -> Strategy:
    """The strategy the run config names, inside the robust layer every plaintext run has."""
    return strategy.strategy if isinstance(strategy, RobustAggregation) else strategy


def arrays(values: list[float]) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})


def reply(site: str, values: list[float], *, examples: int, steps: int | None) -> Message:
    metrics: dict[str, int] = {"num-examples": examples} | ({"train_steps": steps} if steps is not None else {})
    content = RecordDict(
        {ARRAYS: arrays(values), METRICS: MetricRecord(metrics), SITE: ConfigRecord({SITE_NAME: site})}
    )
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=1 if site == "a" else 2, message_type="train"))


def train_round(
    strategy: Strategy, server_round: int, start: list[float], updates: list[tuple[list[float], int, int]]
) -> list[float]:
    """One round from `start`: each site ("a", "b") sends (its weights, its examples, its steps)."""
    list(strategy.configure_train(server_round, arrays(start), ConfigRecord(), TwoSites()))
    replies = [
        reply(site, values, examples=examples, steps=steps)
        for site, (values, examples, steps) in zip("ab", updates, strict=True)
    ]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    return aggregated["w"].numpy().tolist()


# Round 1 from [0, 0]: site a (1 example) sends [1, 2], site b (3 examples) sends [5, 6].
# FedAvg: (1 * [1, 2] + 3 * [5, 6]) / 4 = [4, 5].
ROUND_1 = [([1.0, 2.0], 1, 2), ([5.0, 6.0], 3, 2)]


def test_fedavgm_without_momentum_at_rate_1_is_fedavg(tmp_path: Path) -> None:
    strategy = build_strategy(config(tmp_path, strategy={"name": "fedavgm", "server_momentum": 0.0}))
    assert isinstance(inner(strategy), FedAvgM) and inner(strategy).server_learning_rate == 1.0
    assert train_round(strategy, 1, [0.0, 0.0], ROUND_1) == [4.0, 5.0]
    assert train_round(FedAvg(min_train_nodes=2), 1, [0.0, 0.0], ROUND_1) == [4.0, 5.0]


def test_fedavgm_adds_the_momentum_of_earlier_rounds(tmp_path: Path) -> None:
    strategy = build_strategy(config(tmp_path, strategy={"name": "fedavgm", "server_momentum": 0.9}))
    # Round 1: pseudo-gradient g0 - avg = [-4, -5] is the first momentum (Flower starts it there, not at 0),
    # so the step is the plain average: [4, 5].
    assert train_round(strategy, 1, [0.0, 0.0], ROUND_1) == [4.0, 5.0]
    # Round 2 from [4, 5]: both sites send [6, 5]; pseudo-gradient [-2, 0]; momentum 0.9 * [-4, -5] + [-2, 0]
    # = [-5.6, -4.5]; new = [4, 5] - [-5.6, -4.5] = [9.6, 9.5] (FedAvg would stop at [6, 5]).
    second = train_round(strategy, 2, [4.0, 5.0], [([6.0, 5.0], 1, 2), ([6.0, 5.0], 3, 2)])
    assert second == pytest.approx([9.6, 9.5], rel=1e-6)


def test_under_secagg_fedavgm_steps_from_the_unmasked_mean_alone(tmp_path: Path) -> None:
    strategy = build_strategy(
        config(tmp_path, strategy={"name": "fedavgm", "server_momentum": 0.9}, secagg={"enabled": True})
    )
    # The secure round hands the strategy only the mean it unmasked: the same averages as in the test above
    # give the same steps, [4, 5] then [9.6, 9.5].
    for server_round, start, mean in ((1, [0.0, 0.0], [4.0, 5.0]), (2, [4.0, 5.0], [6.0, 5.0])):
        list(strategy.configure_train(server_round, arrays(start), ConfigRecord(), TwoSites()))
        stepped = step_from_mean(
            strategy, arrays(mean), server_round=server_round, like=reply("a", [], examples=1, steps=1)
        )
    assert stepped["w"].numpy().tolist() == pytest.approx([9.6, 9.5], rel=1e-6)
    # Plain FedAvg keeps the mean as it is.
    fedavg = FedAvg(min_train_nodes=2)
    list(fedavg.configure_train(1, arrays([0.0, 0.0]), ConfigRecord(), TwoSites()))
    mean = arrays([0.1, 1e-7])
    assert (
        step_from_mean(fedavg, mean, server_round=1, like=reply("a", [], examples=1, steps=1))["w"].numpy().tolist()
        == mean["w"].numpy().tolist()
    )


def test_the_server_learning_rate_defaults_per_strategy(tmp_path: Path) -> None:
    rates = {
        name: config(tmp_path, strategy={"name": name}).strategy.server_step_size
        for name in ("fedavgm", "fedadam", "fedyogi")
    }
    assert rates == {"fedavgm": 1.0, "fedadam": 0.03, "fedyogi": 0.03}
    chosen = config(tmp_path, strategy={"name": "fedavgm", "server_learning_rate": 0.5})
    assert inner(build_strategy(chosen)).server_learning_rate == 0.5  # type: ignore[attr-defined]


def test_normalized_averaging_with_equal_steps_is_weighted_fedavg(tmp_path: Path) -> None:
    strategy = build_strategy(config(tmp_path, strategy={"normalized_averaging": True}))
    assert isinstance(inner(strategy), NormalizedAveraging)
    assert train_round(strategy, 1, [0.0, 0.0], ROUND_1) == [4.0, 5.0]


def test_normalized_averaging_divides_each_update_by_its_steps(tmp_path: Path) -> None:
    strategy = build_strategy(config(tmp_path, strategy={"normalized_averaging": True}))
    # From [1, 1]: site a (1 example, 1 step) moves by [1, 2], site b (3 examples, 4 steps) by [4, 0].
    # p = [1/4, 3/4]; tau_eff = 1/4 * 1 + 3/4 * 4 = 3.25; per-step directions [1, 2] and [1, 0], averaged
    # [1, 0.5]; new = [1, 1] + 3.25 * [1, 0.5] = [4.25, 2.625]. (FedAvg: [1, 1] + [1/4 + 3, 1/2] = [4.25, 1.5].)
    replies = [([2.0, 3.0], 1, 1), ([5.0, 1.0], 3, 4)]
    assert train_round(strategy, 1, [1.0, 1.0], replies) == [4.25, 2.625]
    assert inner(strategy).effective_steps == 3.25  # type: ignore[attr-defined]


def test_normalized_averaging_leaves_the_received_replies_as_they_were() -> None:
    strategy = NormalizedAveraging(FedAvg(min_train_nodes=2))
    list(strategy.configure_train(1, arrays([1.0, 1.0]), ConfigRecord(), TwoSites()))
    replies = [reply("a", [2.0, 3.0], examples=1, steps=1), reply("b", [5.0, 1.0], examples=3, steps=4)]
    strategy.aggregate_train(1, replies)
    # The round loop reads the replies after aggregating (upload sizes): the rewrite works on copies.
    assert [r.content[ARRAYS]["w"].numpy().tolist() for r in replies] == [[2.0, 3.0], [5.0, 1.0]]


def test_server_optimizers_step_from_the_normalized_average(tmp_path: Path) -> None:
    strategy = build_strategy(config(tmp_path, strategy={"name": "fedavgm", "normalized_averaging": True}))
    # Round 1 of FedAvgM steps by the whole first pseudo-gradient: the normalized average [4.25, 2.625].
    assert train_round(strategy, 1, [1.0, 1.0], [([2.0, 3.0], 1, 1), ([5.0, 1.0], 3, 4)]) == [4.25, 2.625]


def test_a_reply_without_its_step_count_is_refused_by_name() -> None:
    strategy = NormalizedAveraging(FedAvg(min_train_nodes=2))
    list(strategy.configure_train(1, arrays([0.0, 0.0]), ConfigRecord(), TwoSites()))
    replies = [reply("a", [1.0, 2.0], examples=1, steps=2), reply("b", [5.0, 6.0], examples=3, steps=None)]
    with pytest.raises(NormalizedAveragingError, match=r"site b: .*train_steps"):
        strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("normalized", [False, True])
def test_fedavgm_momentum_survives_a_coordinator_restart(tmp_path: Path, normalized: bool) -> None:
    settings = config(
        tmp_path, strategy={"name": "fedavgm", "server_momentum": 0.9, "normalized_averaging": normalized}
    )
    before = build_strategy(settings)
    assert train_round(before, 1, [0.0, 0.0], ROUND_1) == [4.0, 5.0]
    # Through the run directory's checkpoint file, as the round loop saves and resumes it.
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.checkpoints.mkdir(parents=True)
    run_dir.save_checkpoint("latest", {"strategy_state": strategy_state(before)})
    saved = run_dir.load_checkpoint("latest")
    assert saved is not None and saved["strategy_state"]["momentum_vector"] is not None
    after = build_strategy(settings)
    restore_strategy_state(after, saved["strategy_state"])
    # The restarted coordinator continues from the checkpointed [4, 5] with the momentum: [9.6, 9.5] as above.
    second = [([6.0, 5.0], 1, 2), ([6.0, 5.0], 3, 2)]
    assert train_round(after, 2, [4.0, 5.0], second) == pytest.approx([9.6, 9.5], rel=1e-6)


def test_fedavgm_momentum_must_be_below_1(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server_momentum"):
        config(tmp_path, strategy={"name": "fedavgm", "server_momentum": 1.0})


def test_normalized_averaging_is_refused_with_secure_aggregation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.normalized_averaging") as error:
        config(tmp_path, strategy={"normalized_averaging": True}, secagg={"enabled": True})
    assert "secagg.enabled" in str(error.value) and "train.local_steps" in str(error.value)


def test_normalized_averaging_is_refused_with_client_dp(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"client_dp\.clipping_norm") as error:
        config(tmp_path, strategy={"normalized_averaging": True}, client_dp={"enabled": True})
    assert "train.local_steps" in str(error.value)


def test_server_momentum_is_refused_with_client_dp(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FedAvgM's momentum"):
        config(tmp_path, strategy={"name": "fedavgm"}, client_dp={"enabled": True})
