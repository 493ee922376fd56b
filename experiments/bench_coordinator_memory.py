"""Coordinator memory: the ServerApp process's peak resident memory while it aggregates 5, 10 and 20 sites' updates of
a 54 M-parameter 3D UNet (MONAI, widths 80-1024, 217 MB of float32 per update), each site taking one local step.

The federation runs on Flower's Ray engine, so the sites train in a Ray actor process and the ServerApp in the
driver: the driver's peak resident set (ru_maxrss) is the coordinator's, Ray's own driver state included. One actor
trains at a time (cpus_per_site = the machine's CPUs), so replies arrive one after another, as from sites that
finish at different times. Each federation runs in a fresh child process; one round, float32 updates, norm_bound.

The target (issue 28): peak <= 1.5 GB + 4 x the model's bytes, and flat in the number of sites.

    python experiments/bench_coordinator_memory.py [--sites 5 10 20] [--size 32] [--out runs/bench-coordinator-memory]

Results are appended to OUT/results.jsonl as each federation ends, with the commit they ran; a rerun with the same
OUT skips the federations it holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from code_version import commit

WIDE_UNET = [80, 160, 320, 640, 1024]


def federation_config(num_sites: int, *, size: int, output_dir: Path):
    from fedmed.api import load_config

    shape = [size, size, size]
    raw = {
        "name": f"coordinator-memory-{num_sites}",
        "output_dir": str(output_dir),
        "task": {"kind": "segmentation", "spatial_dims": 3, "image_size": shape},
        "model": {"name": "unet", "channels": WIDE_UNET},
        "train": {"rounds": 1, "local_steps": 1, "batch_size": 1, "learning_rate": 1e-4},
        "engine": {"name": "ray", "cpus_per_site": os.cpu_count() or 1},
        "strategy": {"round_timeout_s": 7200},
        "evaluation": {"cross_site": False, "model_card": False, "finetune_epochs": 0},
        "synth": {
            "task": "segmentation",
            "spatial_dims": 3,
            "image_size": shape,
            "train_cases": 1,
            "val_cases": 1,
            "sites": [{"name": f"site-{index:02d}"} for index in range(num_sites)],
        },
    }
    return load_config(raw, base=output_dir)


def child(num_sites: int, size: int, output_dir: Path) -> None:
    """Run one federation and print the driver's peak RSS and the round's record as JSON."""
    from fedmed.api import set_flower_verbosity, simulate

    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    started = time.perf_counter()
    result = simulate(federation_config(num_sites, size=size, output_dir=output_dir))
    (row,) = result.rounds
    print(
        json.dumps(
            {
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # kB on Linux
                "model_bytes": max(row["download_bytes"].values()),
                "sites_trained": len(row["sites_trained"]),
                "upload_bytes_per_site": row["upload_bytes_per_site"],
                "robust_s": row.get("robust_s"),
                "total_s": time.perf_counter() - started,
            }
        )
    )


def measure(num_sites: int, *, size: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        completed = subprocess.run(
            [sys.executable, __file__, "--child", str(num_sites), str(size), scratch],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise RuntimeError(f"the federation of {num_sites} sites failed (exit {completed.returncode})")
        return {"sites": num_sites, **json.loads(completed.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--size", type=int, default=32, help="edge of the synthetic volumes, in voxels")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-coordinator-memory"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sites, size, output_dir = args.child
        child(int(sites), int(size), Path(output_dir))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "results.jsonl"
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    rows = []
    for sites in args.sites:
        row = next((r for r in done if r["sites"] == sites and r["size"] == args.size), None)
        if row is None:
            row = {**measure(sites, size=args.size), "size": args.size, "commit": commit()}
            with cache.open("a") as file:
                file.write(json.dumps(row) + "\n")
        rows.append(row)
    model = rows[0]["model_bytes"]
    target = 1.5e9 + 4 * model
    print(
        f"Coordinator memory: 3D UNet {WIDE_UNET} ({model / 1e6:.0f} MB per float32 update), {args.size}³ volumes, one "
        f"round, one local step per site, Ray engine. Target: peak ≤ 1.5 GB + 4 × model = {target / 1e9:.2f} GB.\n"
    )
    print(
        "| sites | ServerApp peak RSS (GB) | vs the fewest sites | upload per site (MB) | robust layer (s) | commit |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        ratio = row["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]
        print(
            f"| {row['sites']} | {row['peak_rss_bytes'] / 1e9:.2f} | {ratio:.2f}× "
            f"| {row['upload_bytes_per_site'] / 1e6:.1f} | {row['robust_s']:.2f} | {row['commit']} |"
        )


if __name__ == "__main__":
    main()
