"""Server strategies by name: one file per aggregation rule, each registering its builder in STRATEGIES.

Adding a strategy is one new file here that registers a builder (`@STRATEGIES.register("name")`) and one
line below that imports it (importing a file registers its strategies); a run then selects it with
`strategy.name = "name"`. See docs/how-to/add-a-strategy.md.
"""

from __future__ import annotations

from .build import build_strategy
from .fedavg import build_fedavg  # noqa: F401 - registers "fedavg"
from .fedavgm import build_fedavgm  # noqa: F401 - registers "fedavgm"
from .fedopt import build_fedadam, build_fedyogi  # noqa: F401 - registers "fedadam" and "fedyogi"
from .fedprox import build_fedprox  # noqa: F401 - registers "fedprox"
from .registry import STRATEGIES, StrategyBuilder, check_strategy_name, common_arguments, quorum
from .state import STATEFUL_ATTRIBUTES, restore_strategy_state, strategy_state

__all__ = [
    "STATEFUL_ATTRIBUTES",
    "STRATEGIES",
    "StrategyBuilder",
    "build_strategy",
    "check_strategy_name",
    "common_arguments",
    "quorum",
    "restore_strategy_state",
    "strategy_state",
]
