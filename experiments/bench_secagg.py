"""SecAgg+ cost: round time over a plain round, in-process and deployed, and bytes each site sends.

The same ~1M-parameter 2D segmentation UNet trains for a few rounds with 3 and 5 sites, plain and
with secure aggregation; a round's time is its training phase (sampling, the protocol's exchanges,
training, aggregation), median over the rounds after the first. Deployment runs a real federation
on this machine (TLS SuperLink, one SuperNode per site, separate processes on 127.0.0.1).
Bytes are the payload of each site's replies in a round (arrays, keys, shares, masked vector),
without Flower's framing, against the float32 model size.

    python experiments/bench_secagg.py [--rounds 4] [--sites 3 5] [--skip-deployment]

Targets: secure round <= 1.5x the plain round; bytes per site <= 1.5x the float32 model.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import tempfile
from pathlib import Path

from fedmed.api import (
    ModelConfig,
    SiteDrift,
    SynthConfig,
    TaskConfig,
    build_model,
    load_config,
    set_flower_verbosity,
    simulate,
    synthesize_federation,
)
from fedmed.api.bench import LocalFederation

TASK = {"kind": "segmentation", "spatial_dims": 2, "image_size": [64, 64]}
MODEL = {"channels": [36, 72, 144, 288]}


def run_config(name: str, *, rounds: int, secure: bool) -> dict:
    return {
        "name": name,
        "seed": 0,
        "task": TASK,
        "model": MODEL,
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 4, "learning_rate": 0.002, "eval_every": rounds},
        "strategy": {"round_timeout_s": 600},
        "secagg": {"enabled": secure},
    }


def measured(rounds_jsonl: Path) -> dict[str, float]:
    return measured_rounds([json.loads(line) for line in rounds_jsonl.read_text().splitlines() if line.strip()])


def measured_rounds(rounds: list[dict]) -> dict[str, float]:
    rows = rounds[1:]
    return {
        "round_s": statistics.median(row["train_phase_s"] for row in rows),
        "bytes": statistics.median(row["upload_bytes_per_site"] for row in rows),
    }


def inprocess(sites: list, root: Path, *, rounds: int, secure: bool) -> dict[str, float]:
    raw = run_config(f"inprocess-{len(sites)}-{'secure' if secure else 'plain'}", rounds=rounds, secure=secure)
    raw.update(output_dir=str(root / "inprocess"), sites=[{"name": s.name, "path": str(s.path)} for s in sites])
    return measured_rounds(simulate(load_config(raw, base=root)).rounds)


def deployed(sites: list, root: Path, *, rounds: int) -> dict[bool, dict[str, float]]:
    federation = LocalFederation(root / "deployment", site_data={site.name: site.path for site in sites})
    federation.provision()
    results = {}
    try:
        federation.start()
        for secure in (False, True):
            name = f"deployed-{len(sites)}-{'secure' if secure else 'plain'}"
            output = federation.run(
                federation.write_run_config(run_config(name, rounds=rounds, secure=secure)), "--wait"
            ).stdout
            run_dir = Path(re.search(r"run directory: (\S+)", output).group(1))
            results[secure] = measured(run_dir / "rounds.jsonl")
    finally:
        federation.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--skip-deployment", action="store_true")
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    parameters = sum(p.numel() for p in build_model(TaskConfig(**TASK), ModelConfig(**MODEL)).parameters())
    model_bytes = parameters * 4
    rows = []
    for count in args.sites:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            drifts = [
                SiteDrift(name=chr(ord("a") + index), intensity_scale=1.0 + 0.3 * index) for index in range(count)
            ]
            sites = synthesize_federation(
                SynthConfig(
                    task="segmentation", spatial_dims=2, image_size=[64, 64], train_cases=8, val_cases=2, sites=drifts
                ),
                root / "data",
            )
            plain = inprocess(sites, root, rounds=args.rounds, secure=False)
            secure = inprocess(sites, root, rounds=args.rounds, secure=True)
            rows.append(("in-process", count, plain, secure))
            if not args.skip_deployment:
                results = deployed(sites, root, rounds=args.rounds)
                rows.append(("deployed (TLS, processes)", count, results[False], results[True]))

    print(
        f"\nSecAgg+ over a plain round: 2D segmentation UNet, {parameters} parameters "
        f"({model_bytes / 2**20:.2f} MiB float32), 8 training images per site, 1 local epoch, "
        f"{args.rounds} rounds (medians after the first)"
    )
    print(
        f"{'engine':<28}{'sites':>6}{'plain s':>9}{'secure s':>10}{'time x':>8}"
        f"{'plain MiB':>11}{'secure MiB':>12}{'bytes x model':>15}"
    )
    for engine, count, plain, secure in rows:
        print(
            f"{engine:<28}{count:>6}{plain['round_s']:>9.2f}{secure['round_s']:>10.2f}"
            f"{secure['round_s'] / plain['round_s']:>7.2f}x{plain['bytes'] / 2**20:>11.3f}"
            f"{secure['bytes'] / 2**20:>12.3f}{secure['bytes'] / model_bytes:>14.3f}x"
        )


if __name__ == "__main__":
    main()
