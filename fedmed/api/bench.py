"""Components that fedmed's benchmarks (`experiments/`) measure or compose on purpose.

A benchmark of the training loop, the DP-SGD step, a scan site's datasets, sliding-window inference, the
SecAgg+ core or a deployed federation must time exactly that component, not `fedmed.api.simulate` around
it. This module names them, so that `experiments/` imports only `fedmed` and `fedmed.api` (import-linter
checks it) and the packages below stay free to move. Less stable than `fedmed.api`: each name follows the
internal component it is, and its documentation is that component's own.

Training: `train_local` (one site's local training, plain or DP-SGD), `DpSgdStep`, `check_private_model`,
`select_device`, `site_seed` (the per-site, per-round seed every engine uses), `fixed_by_trainable` (what
dp_sgd.trainable leaves fixed).
Scans: `open_scan_site` (a site's lazily preprocessed datasets), `scan_preprocessing` (a case's load,
reorient, resample and normalize), `write_nifti`.
Inference: `sliding_window_inferer`, `predict_volume`, `to_original_grid`.
Privacy: `calibrate_noise_multiplier`; SecAgg+: `SecAggClient`, `SecAggServer`, `SecAggSettings`, `mask_stream`.
Attacks: `SiteTrainer` (one site's rounds; a benchmark's hostile site is a patch of its `train`).
Sites: `SiteSession`, `SiteSpec` (one site's data and models as a run sees them: score a checkpoint as it would).
Engines and deployment: `run_engine`, `LocalFederation` (a federation of real processes on 127.0.0.1),
`wait_for`, `start_flower_run`, `preload_client_app` and `CLIENT_APP_PRELOAD`.
"""

from __future__ import annotations

from pathlib import Path

from fedmed.config import RunConfig
from fedmed.data.io import write_nifti
from fedmed.data.scan_site import open_scan_site
from fedmed.data.scans import preprocessing as scan_preprocessing
from fedmed.deploy.flower_cli import start_run as start_flower_run
from fedmed.deploy.local import LocalFederation, wait_for
from fedmed.flower.runtime.executor import preload as preload_client_app
from fedmed.models import fixed_by_trainable
from fedmed.privacy.accounting import calibrate_noise_multiplier
from fedmed.runs import RunDirectory
from fedmed.secagg import SecAggClient, SecAggServer, SecAggSettings
from fedmed.secagg.masking import mask_stream
from fedmed.site.session import SiteSession, SiteSpec, site_seed
from fedmed.site.trainer import SiteTrainer
from fedmed.tasks import DpSgdStep, check_private_model, select_device, train_local
from fedmed.tasks.volumes import predict_volume, sliding_window_inferer, to_original_grid
from fedmed.workflows import simulate as simulation

__all__ = [
    "CLIENT_APP_PRELOAD",
    "DpSgdStep",
    "LocalFederation",
    "SecAggClient",
    "SecAggServer",
    "SecAggSettings",
    "SiteSession",
    "SiteSpec",
    "SiteTrainer",
    "calibrate_noise_multiplier",
    "check_private_model",
    "fixed_by_trainable",
    "mask_stream",
    "open_scan_site",
    "predict_volume",
    "preload_client_app",
    "run_engine",
    "scan_preprocessing",
    "select_device",
    "site_seed",
    "sliding_window_inferer",
    "start_flower_run",
    "to_original_grid",
    "train_local",
    "wait_for",
    "write_nifti",
]

# What a ClientApp's cold start imports, as `python -c` code: a fresh interpreter running it measures the
# start-up that a warm (forked) ClientApp saves.
CLIENT_APP_PRELOAD = f"from {preload_client_app.__module__} import preload; preload()"


def run_engine(config: RunConfig, *, name: str) -> Path:
    """Run a federation with its engine alone: no checks, baselines or outputs beyond the ServerApp's own.

    What `fedmed.api.simulate` runs between its checks and its baselines, for measuring the engine against
    a plain training loop.

    Args:
        config: A run config whose sites are listed (see `fedmed.api.materialize_sites`); its
            `engine.name` picks the in-process engine or Flower's Ray engine.
        name: The run's name: its directory is a new `<output_dir>/<name>-<time>`.

    Returns:
        The run directory (checkpoints/final.pt holds the final model).
    """
    run_dir = RunDirectory.create(config.output_dir, name)
    simulation.run_engine(config, run_dir=run_dir)
    return run_dir.path
