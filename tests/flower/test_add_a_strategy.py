"""docs/how-to/add-a-strategy.md, followed to the letter: its strategy file (taken from the page) is written
and imported, which registers "median", and a real in-process simulation with strategy.name = "median"
trains with it. A name nobody registered stops a run before anything is written."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedmed.config import RunConfig, run_config_from_dict
from fedmed.core.errors import ConfigError
from fedmed.flower.records import Layout
from fedmed.flower.server.strategies import STRATEGIES
from fedmed.flower.wire import ARRAYS
from fedmed.workflows.simulate import simulate

pytestmark = pytest.mark.federation

HOW_TO = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "add-a-strategy.md"
ROUNDS = 2


def strategy_file_from_the_page() -> str:
    """The page's strategy file: its Python block that registers a strategy."""
    blocks = re.findall(r"```python\n(.*?)```", HOW_TO.read_text(), flags=re.DOTALL)
    (source,) = [block for block in blocks if "@STRATEGIES.register(" in block]
    return source


@pytest.fixture
def median(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The page's median.py, written to a file and imported (what its one import line does in the package)."""
    # Registered into a copy of the registry's table: other tests never see "median".
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))
    path = tmp_path / "median.py"
    path.write_text(strategy_file_from_the_page())
    spec = importlib.util.spec_from_file_location("how_to_median", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_federation(tmp_path: Path, **strategy: Any) -> RunConfig:
    """Three synthetic 2-D segmentation sites, a small U-Net, two short rounds."""
    sites = [
        {"name": "site-a"},
        {"name": "site-b", "intensity_scale": 2.0, "intensity_offset": 10.0, "noise_std": 0.03},
        {"name": "site-c", "gamma": 1.3, "downsample": 2},
    ]
    size = [32, 32]
    raw = {
        "name": "add-a-strategy",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": size},
        "model": {"channels": [8, 16]},
        "train": {"rounds": ROUNDS, "local_epochs": 1, "batch_size": 4, "learning_rate": 0.003},
        "strategy": strategy,
        "evaluation": {"cross_site": False},
        "synth": {
            "task": "segmentation",
            "spatial_dims": 2,
            "image_size": size,
            "train_cases": 4,
            "val_cases": 3,
            "seed": 1,
            "sites": sites,
        },
    }
    return run_config_from_dict(raw, base=tmp_path)


def test_the_how_to_strategy_runs_a_federation(
    median: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "median" in STRATEGIES.names()
    calls: list[tuple[list[ArrayRecord], ArrayRecord]] = []
    aggregate: Callable[..., Any] = median.CoordinateMedian.aggregate_train

    def spy(self: Any, server_round: int, replies: Any) -> Any:
        replies = list(replies)
        sent = [reply.content[ARRAYS] for reply in replies]
        arrays, metrics = aggregate(self, server_round, replies)
        calls.append((sent, arrays))
        return arrays, metrics

    monkeypatch.setattr(median.CoordinateMedian, "aggregate_train", spy)

    result = simulate(tiny_federation(tmp_path, name="median"))

    assert result.config.strategy.name == "median"
    assert len(calls) == ROUNDS, "the median strategy aggregated every round"
    last_replies, returned = calls[-1]
    assert len(last_replies) == 3
    # The run's global model is what the strategy returned in the last round ...
    checkpoint = result.run_dir.load_checkpoint("latest")
    assert checkpoint is not None
    shared = checkpoint["shared_state"]
    kept = Layout.of(shared, shared.keys()).pack(shared)
    assert sorted(kept.keys()) == sorted(returned.keys())
    for key in returned:
        np.testing.assert_array_equal(kept[key].numpy(), returned[key].numpy())
    # ... which is the coordinate-wise median of the three sites' models, not their (weighted) mean.
    differs_from_mean = False
    for key in returned:
        stacked = np.stack([reply[key].numpy() for reply in last_replies])
        np.testing.assert_array_equal(returned[key].numpy(), np.median(stacked, axis=0).astype(stacked.dtype))
        if np.issubdtype(stacked.dtype, np.floating):
            differs_from_mean |= not np.allclose(returned[key].numpy(), stacked.mean(axis=0))
    assert differs_from_mean


def test_an_unregistered_strategy_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    config = tiny_federation(tmp_path, name="medain")
    with pytest.raises(ConfigError, match=r"strategy\.name: unknown strategy 'medain'; choose one of: ") as error:
        simulate(config)
    assert all(name in str(error.value) for name in ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi"))
    # (simulate's writability probe may leave output_dir itself, empty)
    assert not config.output_dir.exists() or not any(config.output_dir.iterdir()), "no data, no run directory"
