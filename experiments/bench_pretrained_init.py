"""Pretrained start against random initialization: a BreastMNIST federation fine-tuned from PneumoniaMNIST weights.

1. Pre-train fedmed's default classification network (densenet-small, group norm) centrally on
   PneumoniaMNIST (chest X-ray, 2428 training images) with fedmed's own training loop; save its state dict.
2. Split BreastMNIST (breast ultrasound, 546 training images) into 3 sites, stratified by class; each site
   evaluates on its third of the official validation + test images (234 in all).
3. Simulate the same federation (FedAvg, same rounds, epochs, seed) from random weights, from the pretrained
   weights (model.init; the classification head re-initialized with model.init_exclude), and from the
   pretrained weights with the early blocks frozen (model.freeze: not trained, not sent). Each seed draws
   its own split and random init; the pre-trained weights are the same for every seed.

Prints the global model's AUC (mean over the sites, then over the seeds) after round 1, the middle round and
the last round, accuracy and the worst site at the end, the upload per site per round and the wall time of a
run. Needs ../shared/data/medmnist (or FEDMED_SHARED_DATA); skips with a message when it is absent.

    python experiments/bench_pretrained_init.py [--rounds 10] [--pretrain-epochs 3] [--seeds 0 1 2]
        [--train-per-site N]   # few labels per site: where a pretrained start is expected to matter most
        [--pretrain-on breastmnist --finetune-on pneumoniamnist]   # the other direction
"""

from __future__ import annotations

import argparse
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

from fedmed.api import (
    ModelConfig,
    RunConfig,
    SiteEntry,
    TaskConfig,
    TrainConfig,
    build_model,
    get_task,
    load_site,
    set_flower_verbosity,
    simulate,
)
from fedmed.api.bench import select_device, train_local

REPO_ROOT = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b", "hospital-c")
TASK = {"kind": "classification", "spatial_dims": 2, "num_classes": 2, "image_size": [28, 28], "in_channels": 1}
FREEZE = ["features.conv0", "features.norm0", "features.denseblock1"]
HEAD = ["class_layers"]
MEDMNIST = ("pneumoniamnist", "breastmnist")
PRETRAIN_SEED = 1000  # another init than the federations' random starts

Run = dict[str, Any]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-on", default="pneumoniamnist", choices=MEDMNIST)
    parser.add_argument("--finetune-on", default="breastmnist", choices=MEDMNIST)
    parser.add_argument(
        "--train-per-site", type=int, default=None, help="keep this many training images per site (few labels)"
    )
    args = parser.parse_args()
    data = Path(os.environ.get("FEDMED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")) / "medmnist"
    if not all((data / f"{name}.npz").is_file() for name in MEDMNIST):
        print(f"skipped: MedMNIST files not found in {data} (set FEDMED_SHARED_DATA to the shared data folder)")
        return
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train = TrainConfig(
        rounds=args.rounds, local_epochs=args.local_epochs, batch_size=16, learning_rate=1e-3, device="cpu"
    )
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        weights, pretraining = pretrain(
            data / f"{args.pretrain_on}.npz", out=scratch / "pretrained.pt", epochs=args.pretrain_epochs
        )
        starts = {
            "random init": ModelConfig(),
            "pretrained (new head)": ModelConfig(init=weights, init_exclude=HEAD),
            "pretrained + frozen early blocks": ModelConfig(init=weights, init_exclude=HEAD, freeze=FREEZE),
        }
        results: dict[str, list[Run]] = {label: [] for label in starts}
        for seed in args.seeds:
            sites = split_npz(
                data / f"{args.finetune_on}.npz",
                out=scratch / f"sites-{seed}",
                names=SITES,
                seed=seed,
                train_per_site=args.train_per_site,
            )
            described = sites_summary(sites)
            for label, model in starts.items():
                config = RunConfig(
                    name="pretrained-bench",
                    seed=seed,
                    output_dir=scratch / "runs",
                    task=TaskConfig(**TASK),
                    model=model,
                    train=train,
                    sites=[SiteEntry(name=name, path=path) for name, path in sites.items()],
                    evaluation={"cross_site": False},
                )
                results[label].append(federate(config))
                seconds = results[label][-1]["seconds"]
                print(f"done: seed {seed}, {label} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print_table(results, pretraining=pretraining, sites=described, args=args)


def pretrain(source: Path, *, out: Path, epochs: int) -> tuple[Path, dict[str, Any]]:
    """Centralized training on the source data set with fedmed's own task, network and loop."""
    task_config = TaskConfig(**TASK)
    data = load_site(source, task=task_config)
    task, device = get_task(task_config), select_device("cpu")
    torch.manual_seed(PRETRAIN_SEED)
    model = build_model(task_config, ModelConfig())
    started = time.perf_counter()
    settings = TrainConfig(batch_size=32, learning_rate=1e-3, device="cpu")
    train_local(model, data.train, task=task, train=settings, epochs=epochs, seed=PRETRAIN_SEED, device=device)
    seconds = time.perf_counter() - started
    metrics = task.evaluate(model, data.val, device=device)
    torch.save(model.state_dict(), out)
    print(f"pre-trained on {source.name}: val AUC {metrics['auc']:.3f} in {seconds:.0f} s", file=sys.stderr)
    return out, {"images": data.num_train, "auc": metrics["auc"], "seconds": seconds, "source": source.stem}


def sites_summary(sites: dict[str, Path]) -> str:
    counts = []
    for path in sites.values():
        with np.load(path) as archive:
            counts.append((len(archive["train_labels"]), len(archive["val_labels"])))
    train = "/".join(str(count) for count, _ in counts)
    return f"{train} training, {'/'.join(str(count) for _, count in counts)} evaluation"


def federate(config: RunConfig) -> Run:
    """Simulate the federation; the global model's scores per round, its last round, upload and wall time."""
    started = time.perf_counter()
    run = simulate(config)
    seconds = time.perf_counter() - started
    by_round: dict[int, list[dict[str, Any]]] = {}
    for row in run.metrics:
        if row["phase"] == "evaluate":
            by_round.setdefault(int(row["round"]), []).append(row)
    last = by_round[max(by_round)]
    return {
        "auc": {number: float(np.mean([row["auc"] for row in rows])) for number, rows in by_round.items()},
        "accuracy": float(np.mean([row["accuracy"] for row in last])),
        "worst": min(row["auc"] for row in last),
        "upload_kib": max(row["upload_bytes_per_site"] for row in run.rounds) / 1024,
        "seconds": seconds,
    }


def print_table(results: dict[str, list[Run]], *, pretraining: dict[str, Any], sites: str, args: Any) -> None:
    rounds = sorted({1, max(1, args.rounds // 2), args.rounds})
    seeds = " ".join(str(seed) for seed in args.seeds)
    print(
        f"\nPretrained start vs random init: {args.finetune_on} split into 3 sites ({sites} images), FedAvg, "
        f"{args.rounds} rounds x {args.local_epochs} local epoch(s), seeds {seeds} (mean ± sd over seeds), CPU.\n"
        f"Pre-trained centrally on {pretraining['source']} ({pretraining['images']} images, {args.pretrain_epochs} "
        f"epochs, its val AUC {pretraining['auc']:.3f}, {pretraining['seconds']:.0f} s). Frozen: {', '.join(FREEZE)}."
    )
    header = (
        f"{'start':<34}"
        + "".join(f"{f'AUC r{number}':>16}" for number in rounds)
        + f"{'accuracy':>16}{'worst-site AUC':>16}{'upload/round':>14}{'wall s':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, runs in results.items():
        cells = [_spread([run["auc"][number] for run in runs]) for number in rounds]
        cells += [_spread([run["accuracy"] for run in runs]), _spread([run["worst"] for run in runs])]
        upload = max(run["upload_kib"] for run in runs)
        seconds = float(np.mean([run["seconds"] for run in runs]))
        print(f"{label:<34}" + "".join(f"{cell:>16}" for cell in cells) + f"{upload:>10.0f} KiB{seconds:>8.0f}")
    baseline = results["random init"]
    for label, runs in list(results.items())[1:]:
        gains = []
        for number in rounds:
            paired = [run["auc"][number] - base["auc"][number] for run, base in zip(runs, baseline, strict=True)]
            gains.append(f"r{number} {_spread(paired, sign=True)}")
        print(f"AUC gain of '{label}' over random init (paired by seed): {', '.join(gains)}")


def _spread(values: list[float], *, sign: bool = False) -> str:
    mean = float(np.mean(values))
    text = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return text if len(values) == 1 else f"{text} ± {float(np.std(values, ddof=1)):.3f}"


if __name__ == "__main__":
    main()
