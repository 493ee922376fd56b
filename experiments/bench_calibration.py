"""Federated temperature scaling: ECE of a PneumoniaMNIST federation's global model before and after.

1. Split PneumoniaMNIST (chest X-ray, pneumonia vs normal) into 3 sites, stratified by class; each site evaluates
   on its third of the official validation + test images (experiments/medmnist_sites.py).
2. Simulate the federation (FedAvg, fedmed's default classification network) with the model card on
   (evaluation.model_card, the default): at the end every site returns the summed NLL of its validation cases at
   41 temperatures, per half (two seeded folds), and the server takes the argmin; then every site returns
   reliability bins before and after scaling, each half scaled with the temperature fitted on the other half of
   every site (cross-fitted: no case scores a temperature it helped fit). No case leaves a site.
3. Print, per site and pooled, the cases assessed and the ECE (15 bins) before and after (mean ± sd over seeds; each
   seed draws its own split and initialization), and the temperatures.

Target (issue 26): pooled ECE after scaling ≤ 0.03. Needs ../shared/data/medmnist (or FEDMED_SHARED_DATA); skips
with a message when it is absent.

    python experiments/bench_calibration.py [--rounds 10] [--local-epochs 1] [--train-per-site 600] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from medmnist_sites import split_npz

from fedmed.api import RunConfig, SiteEntry, TaskConfig, TrainConfig, set_flower_verbosity, simulate

REPO_ROOT = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b", "hospital-c")
TASK = {"kind": "classification", "spatial_dims": 2, "num_classes": 2, "image_size": [28, 28], "in_channels": 1}
MODEL_CARD = "model_card.json"  # fedmed.runs.model_card.MODEL_CARD_FILE, read as the JSON a user opens
POOLED = "all sites"
TARGET_ECE = 0.03

Run = dict[str, Any]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--train-per-site", type=int, default=600, help="training images kept per site")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    data = Path(os.environ.get("FEDMED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "medmnist"
    source = data / "pneumoniamnist.npz"
    if not source.is_file():
        print(f"skipped: {source} not found (set FEDMED_SHARED_DATA to the shared data folder)")
        return
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    runs = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        for seed in args.seeds:
            runs.append(federate(source, scratch=Path(scratch_dir) / f"seed-{seed}", seed=seed, args=args))
            print(f"done: seed {seed} ({runs[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print_table(runs, args=args)


def federate(source: Path, *, scratch: Path, seed: int, args: Any) -> Run:
    """One federation (its own split and initialization per seed): its model card, mean AUC and wall time."""
    sites = split_npz(source, out=scratch / "sites", names=SITES, seed=seed, train_per_site=args.train_per_site)
    config = RunConfig(
        name="calibration-bench",
        seed=seed,
        output_dir=scratch / "runs",
        task=TaskConfig(**TASK),
        train=TrainConfig(
            rounds=args.rounds, local_epochs=args.local_epochs, batch_size=32, learning_rate=1e-3, device="cpu"
        ),
        sites=[SiteEntry(name=name, path=path) for name, path in sites.items()],
        evaluation={"cross_site": False},
    )
    started = time.perf_counter()
    run = simulate(config)
    seconds = time.perf_counter() - started
    card = json.loads((run.run_dir / MODEL_CARD).read_text())
    auc = [row["auc"] for row in run.metrics if row["phase"] == "evaluate" and row["round"] == args.rounds]
    return {"card": card, "auc": float(np.mean(auc)), "seconds": seconds}


def print_table(runs: list[Run], *, args: Any) -> None:
    temperatures = ", ".join(_number(run["card"].get("temperature"), digits=3) for run in runs)
    seeds = " ".join(str(seed) for seed in args.seeds)
    print(
        f"\nFederated temperature scaling: pneumoniamnist split into {len(SITES)} sites ({args.train_per_site} "
        f"training images each), FedAvg, {args.rounds} rounds x {args.local_epochs} local epoch(s), seeds {seeds} "
        f"(mean ± sd over seeds), CPU, {np.mean([run['seconds'] for run in runs]):.0f} s per run. Global model's mean "
        f"AUC {_spread([run['auc'] for run in runs])}. Temperature fitted from the sites' NLL sums on their validation "
        f"cases: T = {temperatures}; ECE (15 bins) on the same cases, each half scaled with the temperature fitted on "
        "the other half."
    )
    header = f"{'site':<14}{'cases':>8}{'ECE before':>18}{'ECE after':>18}"
    print(header)
    print("-" * len(header))
    for site in runs[0]["card"].get("calibration", {}):
        entries = [run["card"]["calibration"].get(site, {}) for run in runs]
        label = f"**{site}**" if site == POOLED else site
        cells = [_spread([entry.get(key) for entry in entries]) for key in ("ece_before", "ece_after")]
        print(f"{label:<14}{entries[0].get('cases', 0):>8}{cells[0]:>18}{cells[1]:>18}")
    after = [run["card"].get("calibration", {}).get(POOLED, {}).get("ece_after") for run in runs]
    met = all(isinstance(value, float) and value <= TARGET_ECE for value in after)
    print(f"target: pooled ECE after scaling <= {TARGET_ECE} for every seed: {'met' if met else 'not met'}")


def _number(value: Any, *, digits: int = 4) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def _spread(values: list[Any]) -> str:
    numbers = [float(value) for value in values if isinstance(value, (int, float))]
    if not numbers:
        return "n/a"
    mean = float(np.mean(numbers))
    return f"{mean:.4f}" if len(numbers) == 1 else f"{mean:.4f} ± {float(np.std(numbers, ddof=1)):.4f}"


if __name__ == "__main__":
    main()
