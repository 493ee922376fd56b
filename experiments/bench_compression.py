"""What [compression] saves on the wire and what it costs the model: bytes per site per round, utility, codec time.

One simulated run per dataset, seed and arm; the global model is what is measured (no end-of-run fine-tune, no
baselines). Datasets (skipped, saying why, when their files are missing from ../shared/data):

- `ixi`: 12 IXI T1 volumes, 3 sites behind simulated scanners, brain mask (experiments/drift/ixi.toml, site z-score);
- `hippocampus`: MSD Task04, 200 crops on 3 simulated scanners at 32^3 (experiments/personalization/hippocampus.toml);
- `pneumonia`: PneumoniaMNIST in 3 class-stratified sites (bench_robustness.py's federation, 12 rounds).

Arms: `float32` (no compression); `16-bit`, `8-bit` and `top-1%+8-bit` (compression.bits, compression.top_k;
per-chunk scales, rounding to nearest and error feedback: the defaults); `secagg-32-bit` (SecAgg+ as it always
was) and `secagg-16-bit` (SecAgg+ with 16-bit masked vectors: every site weighing one, error feedback on its
quantization). Under SecAgg+ the coordinator cannot leave a flagged site out of the mean, so `secagg-16-bit` is
compared with `secagg-32-bit`, not with plain aggregation. The `16-bit` arm is as good as lossless (1/32767 of a
chunk's largest value): its change from float32 shows how far any perturbation at all moves a run, the noise
floor the other arms' changes are read against.

Per dataset and arm the table gives: upload bytes per site per round over float32's, both as they crossed the wire
(rounds.jsonl's upload_bytes); the global model's mean primary metric over the sites (mean over seeds) and its
change from its reference arm, paired by seed (mean and worst); and the sites' encoding plus the coordinator's
decoding time over the sites' local training time. Targets: 8-bit bytes <= 0.27x and utility within 0.005; top-1%
+ 8-bit bytes <= 0.03x and utility within 0.02; SecAgg+ 16-bit bytes <= 0.55x and utility within 0.005.

    python experiments/bench_compression.py [--datasets ixi hippocampus pneumonia] [--seeds 0 1 2] [--arms ...]
        [--rounds N] [--out runs/bench-compression]

Results are appended to OUT/results.jsonl as each run ends; a rerun with the same OUT skips the runs it holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from fedmed.api import RunConfig, set_flower_verbosity
from fedmed.api import simulate as simulate_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "personalization"))
sys.path.insert(0, str(HERE / "drift"))

from bench_every_site import dataset_config  # noqa: E402
from bench_robustness import federation  # noqa: E402

DATASETS = ("ixi", "hippocampus", "pneumonia")
SHARED = {"ixi": "ixi-hh-t1-12", "hippocampus": "msd-hippocampus", "pneumonia": "medmnist/pneumoniamnist.npz"}
ARMS: dict[str, dict[str, Any]] = {  # each arm's run-config sections
    "float32": {},
    "16-bit": {"compression": {"bits": 16}},
    "8-bit": {"compression": {"bits": 8}},
    "top-1%+8-bit": {"compression": {"bits": 8, "top_k": 0.01}},
    "secagg-32-bit": {"secagg": {"enabled": True}},
    "secagg-16-bit": {"secagg": {"enabled": True}, "compression": {"bits": 16}},
}
# Under SecAgg+ the coordinator cannot leave a flagged site out (it sees no single update), so a SecAgg+ arm is
# compared with SecAgg+ over the usual 32-bit field, not with plain aggregation.
REFERENCE = {"secagg-16-bit": "secagg-32-bit"}
# bytes / float32's and the utility change allowed
TARGETS = {"8-bit": (0.27, 0.005), "top-1%+8-bit": (0.03, 0.02), "secagg-16-bit": (0.55, 0.005)}
PNEUMONIA_ROUNDS = 12


def base_config(dataset: str, *, seed: int, out: Path, shared: Path) -> dict[str, Any]:
    if dataset == "pneumonia":
        raw = federation("pneumonia", sites=3, seed=seed, rounds=PNEUMONIA_ROUNDS, out=out / "data", shared=shared)
    else:
        raw = dataset_config(dataset, output=out / "data", shared_data=shared, quick=False)
        raw.pop("output_dir", None)
    return raw


def run_one(key: dict[str, Any], *, out: Path, shared: Path) -> dict[str, Any]:
    raw = base_config(key["dataset"], seed=key["seed"], out=out, shared=shared)
    rounds = f"-r{key['rounds']}" if key["rounds"] else ""
    if key["rounds"]:
        raw["train"]["rounds"] = key["rounds"]
    raw |= {
        "name": f"{key['dataset']}-{key['arm'].replace('%', 'pct').replace('+', '-')}-s{key['seed']}{rounds}",
        "seed": key["seed"],
        "output_dir": str(out / "runs"),
        "baselines": {"local_only": False, "pooled": False},
        "evaluation": {**raw.get("evaluation", {}), "finetune_epochs": 0},
        **ARMS[key["arm"]],
    }
    config = RunConfig.model_validate(raw)
    started = time.perf_counter()
    results = simulate_run(config)
    scores = {site: row["federated"] for site, row in results.scores.items()}
    metric = "dice" if config.task.kind == "segmentation" else "auc"
    trained = [row for row in results.metrics if row["phase"] == "train"]
    uploads = [count for row in results.rounds for count in row["upload_bytes"].values()]
    return {
        **key,
        "metric": metric,
        "utility": statistics.fmean(score[metric] for score in scores.values()),
        "upload_bytes": statistics.median(uploads),
        "codec_s": sum(row.get("compress_seconds", 0.0) for row in trained)
        + sum(row.get("decode_s", 0.0) for row in results.rounds),
        "train_s": sum(row["train_seconds"] for row in trained),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data | arm | bytes / float32 | utility (mean over seeds) | change: mean, worst seed | "
        "encode+decode / training | seeds | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for dataset in DATASETS:
        runs = [row for row in rows if row["dataset"] == dataset]
        by_arm = {arm: {row["seed"]: row for row in runs if row["arm"] == arm} for arm in ARMS}
        float32 = by_arm["float32"]
        if not float32:
            continue
        for arm in ARMS:
            reference = by_arm[REFERENCE.get(arm, "float32")]
            arm_runs = [row for row in by_arm[arm].values() if row["seed"] in reference and row["seed"] in float32]
            if not arm_runs:
                continue
            ratio = statistics.median(row["upload_bytes"] / float32[row["seed"]]["upload_bytes"] for row in arm_runs)
            changes = [row["utility"] - reference[row["seed"]]["utility"] for row in arm_runs]
            codec = sum(row["codec_s"] for row in arm_runs) / sum(row["train_s"] for row in arm_runs)
            metric = arm_runs[0]["metric"]
            verdict = ""
            if arm in TARGETS:
                bytes_target, utility_target = TARGETS[arm]
                met = ratio <= bytes_target and min(changes) >= -utility_target
                verdict = f"<= {bytes_target}x, within {utility_target}: {'met' if met else 'missed'}"
            change = "—" if arm == "float32" else f"{statistics.fmean(changes):+.4f}, {min(changes):+.4f}"
            if arm in REFERENCE:
                change += f" (from {REFERENCE[arm]})"
            lines.append(
                f"| {dataset} ({metric}{_rounds(arm_runs[0])}) | {arm} | {ratio:.4f} | "
                f"{statistics.fmean(row['utility'] for row in arm_runs):.4f} | {change} | {codec:.4f} | "
                f"{len(arm_runs)} | {verdict} |"
            )
    return "\n".join(lines)


def _rounds(row: dict[str, Any]) -> str:
    return f", {row['rounds']} rounds" if row.get("rounds") else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, help="train every dataset for this many rounds instead of its own")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-compression"))
    parser.add_argument("--shared-data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING)
    set_flower_verbosity(False)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "results.jsonl"
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    references = [REFERENCE[arm] for arm in args.arms if arm in REFERENCE]  # every change is from its reference
    for dataset in args.datasets:
        if not (args.shared_data / SHARED[dataset]).exists():
            print(f"skipping {dataset}: {args.shared_data / SHARED[dataset]} is missing", file=sys.stderr)
            continue
        arms = [arm for arm in ARMS if arm in ("float32", *references, *args.arms)]  # in ARMS order: references first
        for seed in args.seeds:
            for arm in arms:
                key = {"dataset": dataset, "seed": seed, "arm": arm, "rounds": args.rounds}
                if any(all(row.get(k) == v for k, v in key.items()) for row in done):
                    continue
                row = run_one(key, out=args.out, shared=args.shared_data)
                done.append(row)
                with cache.open("a") as file:
                    file.write(json.dumps(row) + "\n")
                print(
                    f"{dataset} seed {seed} {arm}: {row['utility']:.4f} {row['metric']}, "
                    f"{row['upload_bytes']:.0f} B/site/round, {row['wall_s']:.0f} s",
                    flush=True,
                )
    wanted = [
        row
        for row in done
        if row["dataset"] in args.datasets
        and row["seed"] in args.seeds
        and row.get("rounds") == args.rounds
        and row["arm"] in ["float32", *references, *args.arms]
    ]
    print()  # the progress lines above are no caption of the table
    print(table(wanted))


if __name__ == "__main__":
    main()
