"""Scale: peak memory and seconds per round with 10, 50 and 100 simulated sites (2D segmentation).

Each federation runs in a fresh child process. Peak memory is the largest resident set of the whole
process tree (the child plus, for Ray, its GCS, raylet and worker processes), sampled every 0.2 s
from /proc, so shared library pages count once per process: an upper bound.

    python experiments/bench_scale.py [--sites 10 50 100] [--engines inprocess ray] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def federation_config(num_sites: int, *, engine: str, rounds: int, output_dir: Path):
    # Here, not at the top: the parent process only measures the children's memory.
    from fedmed.api import load_config

    drifts = [
        {
            "name": f"site-{index:03d}",
            "intensity_scale": 1.0 + (index % 7) * 0.2,
            "gamma": 0.8 + (index % 5) * 0.1,
            "noise_std": (index % 3) * 0.02,
        }
        for index in range(num_sites)
    ]
    raw = {
        "name": f"scale-{num_sites}-{engine}",
        "output_dir": str(output_dir),
        "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [64, 64]},
        "model": {"channels": [16, 32, 64]},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 4},
        "engine": {"name": engine},
        "synth": {
            "task": "segmentation",
            "spatial_dims": 2,
            "image_size": [64, 64],
            "train_cases": 8,
            "val_cases": 4,
            "sites": drifts,
        },
    }
    return load_config(raw, base=output_dir)


def child(num_sites: int, engine: str, rounds: int, output_dir: Path) -> None:
    """Run one federation and print its per-round times as JSON (the parent measures memory)."""
    from fedmed.api import set_flower_verbosity, simulate

    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    started = time.perf_counter()
    result = simulate(federation_config(num_sites, engine=engine, rounds=rounds, output_dir=output_dir))
    rounds_seen = result.rounds
    print(
        json.dumps(
            {
                "total_s": time.perf_counter() - started,
                "round_s": [r["seconds"] for r in rounds_seen],
                "sites_trained": len(rounds_seen[-1]["sites_trained"]),
            }
        )
    )


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            pages = int((entry / "statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = pages * PAGE
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


def measure(num_sites: int, engine: str, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", str(num_sites), engine, str(rounds), scratch],
            stdout=subprocess.PIPE,
            text=True,
        )
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.wait(0.2):
                peak = max(peak, tree_rss(process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output, _ = process.communicate()
        stop.set()
        sampler.join()
        if process.returncode != 0:
            raise RuntimeError(f"{engine} with {num_sites} sites failed (exit {process.returncode})")
        result = json.loads(output.strip().splitlines()[-1])
        return {"sites": num_sites, "engine": engine, "peak_gb": peak / 1e9, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--engines", nargs="+", default=["inprocess", "ray"], choices=["inprocess", "ray"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sites, engine, rounds, output_dir = args.child
        child(int(sites), engine, int(rounds), Path(output_dir))
        return

    rows = [measure(n, engine, args.rounds) for engine in args.engines for n in args.sites]
    print(
        f"\nScale: 2D segmentation 64x64, UNet (16,32,64), 8 training + 4 validation cases per site, "
        f"{args.rounds} rounds, 1 local epoch, evaluation every round"
    )
    print(f"{'engine':<11}{'sites':>6}{'s/round (median)':>18}{'first round s':>15}{'peak RSS GB':>13}{'total s':>9}")
    for row in rows:
        times = sorted(row["round_s"])
        print(
            f"{row['engine']:<11}{row['sites']:>6}{times[len(times) // 2]:>18.2f}{row['round_s'][0]:>15.2f}"
            f"{row['peak_gb']:>13.2f}{row['total_s']:>9.1f}"
        )


if __name__ == "__main__":
    main()
