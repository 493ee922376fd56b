"""fedmed: federated learning for hospital sites (Flower + MONAI + Opacus).

The Python API is `fedmed.api`, and every name of it is importable from here: `import fedmed;
fedmed.simulate(fedmed.demo_config())`.

The layers, top to bottom (each imports only those below it; CI checks this with import-linter):
cli | api, workflows, deploy, flower, site, privacy | secagg, tasks, data | models | runs, config, core.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedmed.flower.runtime.environment import keep_flower_quiet

if TYPE_CHECKING:
    from fedmed.api import *  # noqa: F403 - for type checkers and editors; at run time __getattr__ loads them

__version__ = "0.1.0"

# Sites never phone home: Flower reads these when flwr is first imported, so they are set as soon as
# fedmed is, before fedmed.flower or fedmed.secagg load Flower.
keep_flower_quiet()

# fedmed.api's names (its __all__; tests/workflows/test_api.py checks the two agree). They are loaded on first
# use, not here: fedmed.api imports torch, MONAI and Flower (seconds), and the `fedmed` command, which imports
# this package on every start, needs none of them for --help or its light commands.
_API = frozenset(
    {
        "Case",
        "CaseOutcome",
        "ClientDpConfig",
        "ConfigError",
        "DpSgdConfig",
        "FedmedError",
        "InferenceConfig",
        "ModelConfig",
        "NormalizationConfig",
        "Prediction",
        "RunConfig",
        "RunResults",
        "SecAggConfig",
        "ServerConfig",
        "SiteData",
        "SiteDrift",
        "SiteEntry",
        "SynthConfig",
        "Task",
        "TaskConfig",
        "TrainConfig",
        "build_model",
        "cases_from_folder_pairs",
        "cases_from_subfolders",
        "demo_config",
        "demo_config_file",
        "export",
        "get_task",
        "load_config",
        "load_server_config",
        "load_site",
        "materialize_sites",
        "open_run",
        "predict",
        "read_toml",
        "resume",
        "set_flower_verbosity",
        "simulate",
        "site_data",
        "split_into_sites",
        "synthesize_federation",
        "write_manifest",
    }
)
__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'fedmed' has no attribute {name!r}")
    value = getattr(importlib.import_module("fedmed.api"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
