"""The built-in demo (fedmed/resources/demo.toml): three hospitals whose scanners differ, segmenting lesions.

`fedmed demo` and `fedmed.api.demo_config` load it here, so both run the same federation.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from fedmed.config import RunConfig, load_run_config

# 3–6 cases per hospital cannot teach a model privately: the private run fine-tunes a pre-trained one, in
# few rounds of one full-batch step so that the 3-case site stays below [dp_sgd] max_effective_noise.
DEMO_PRIVATE = [
    "pretrain.enabled=true",
    "dp_sgd.enabled=true",
    "dp_sgd.epsilon=8",
    "dp_sgd.max_epochs_per_round=1",
    "train.rounds=4",
    "train.eval_every=1",
    "baselines.local_only=false",
]


def demo_config_file() -> Path:
    """The packaged demo config; copy it to start your own simulation config."""
    return Path(str(files("fedmed.resources").joinpath("demo.toml")))


def demo_config(
    *, output_dir: Path, engine: str | None = None, private: bool = False, overrides: Sequence[str] = ()
) -> RunConfig:
    """The demo's run config writing under `output_dir`; `engine` and `private` as `fedmed demo` takes them,
    then `overrides` (section.key=value, as --set)."""
    chosen = [*([f"engine.name={engine}"] if engine else []), *(DEMO_PRIVATE if private else []), *overrides]
    config = load_run_config(demo_config_file(), overrides=chosen)
    config.output_dir = Path(output_dir).resolve()  # the packaged config's own folder is site-packages
    return config
