"""Scan geometry memory: peak RSS of one site's local training against its number of cases.

Target: a synthetic 3D site of 200 cases at 160³ trains with peak RSS ≤ 1.2 × that of a 20-case site
(same patch size and batch). Both sites are generated once into --work-dir (reused on later runs) with
`synthesize_federation`; each (site, cache) pair then runs in a fresh child process, so its peak RSS is
its own: `open_scan_site` (validates every case) and one epoch of `train_local` over every training case
(random patches, one per case), on the CPU, with `data.workers = 0` so every byte is in that process.
The peak is /proc/self/status VmHWM, read after opening the site and again over training (reset in
between through /proc/self/clear_refs), so a growth shows where it happens.

`--caches` takes `memory` (the default `data.max_cached_cases`), `memory:N` (a cap of N cases), `disk`
(a PersistentDataset in --work-dir, emptied before each run) and `none`. The ratio is each configuration's
peak over the smallest site's peak with the same cache.

    python experiments/bench_scan_memory.py [--quick] [--work-dir DIR] [--cases 20 200] [--caches memory disk none]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

TARGET_RATIO = 1.2
FULL = {"size": 160, "cases": [20, 200], "val_cases": 2, "patch": 64, "batch": 2}
QUICK = {"size": 64, "cases": [2, 12], "val_cases": 1, "patch": 32, "batch": 2}


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    # Not Linux: ru_maxrss is the only peak there is (kilobytes on Linux, bytes on macOS).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the next peak is the next phase's alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def site_name(cases: int) -> str:
    return f"cases-{cases}"


def generate_sites(work_dir: Path, *, size: int, cases: list[int], val_cases: int) -> dict[int, Path]:
    """One synthetic 3D segmentation site per case count; folders made from the same config are reused."""
    # Here, not at the top, like every fedmed import below: each measurement's child process imports only what
    # it measures with, so that its peak RSS is its own.
    from fedmed.api import SynthConfig, synthesize_federation

    sites = {}
    for count in cases:
        # One synth config per site, so each site is site 0 of seed 0: the first cases are the same files.
        config = SynthConfig(
            task="segmentation",
            spatial_dims=3,
            image_size=[size] * 3,
            train_cases=count,
            val_cases=val_cases,
            seed=0,
            sites=[{"name": site_name(count)}],
        )
        started = time.perf_counter()
        (entry,) = synthesize_federation(config, work_dir / f"sites-{size}")
        print(f"site {entry.name}: {entry.path} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        sites[count] = entry.path
    return sites


def run_config(*, cache: str, patch: int, batch: int, output_dir: Path):
    from fedmed.api import load_config

    mode, _, cap = cache.partition(":")
    data: dict[str, object] = {"cache": mode}
    if cap:
        data["max_cached_cases"] = int(cap)
    raw = {
        "name": "bench-scan-memory",
        "output_dir": str(output_dir),
        "task": {"kind": "segmentation", "spatial_dims": 3, "spacing": [1.0, 1.0, 1.0], "in_channels": 1},
        "train": {"patch_size": [patch] * 3, "batch_size": batch, "samples_per_volume": 1, "device": "cpu"},
        "data": data,
    }
    return load_config(raw, base=output_dir)


def child(site: Path, *, cache: str, patch: int, batch: int, cache_dir: Path) -> None:
    """Open one site and train one epoch over it; print what was measured as one JSON line."""
    import torch

    from fedmed.api import build_model, get_task
    from fedmed.api.bench import open_scan_site, select_device, train_local

    logging.getLogger("fedmed").setLevel(logging.WARNING)
    config = run_config(cache=cache, patch=patch, batch=batch, output_dir=cache_dir)
    torch.manual_seed(0)
    model = build_model(config.task, config.model)
    task = get_task(config.task)
    rss_start = status_mb("VmRSS")
    started = time.perf_counter()
    site = open_scan_site(site, config=config, cache_dir=cache_dir)
    open_s = time.perf_counter() - started
    peak_open = status_mb("VmHWM")
    separate = reset_peak()
    result = train_local(
        model,
        site.train,
        task=task,
        train=config.train,
        epochs=1,
        seed=0,
        device=select_device(config.train.device),
        workers=config.data.workers,
    )
    peak_train = status_mb("VmHWM")
    held = getattr(site.train.source, "_cache", None) or []
    print(
        json.dumps(
            {
                "rss_start_mb": rss_start,
                "peak_open_mb": peak_open,
                "peak_train_mb": peak_train if separate else float("nan"),
                "peak_mb": max(peak_open, peak_train),
                "rss_end_mb": status_mb("VmRSS"),
                "cached_cases": sum(item is not None for item in held),
                "train_cases": site.num_train,
                "steps": result.steps,
                "open_s": open_s,
                "train_s": result.seconds,
            }
        )
    )


def measure(site: Path, *, cache: str, patch: int, batch: int, cache_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", str(site), cache, str(patch), str(batch), str(cache_dir)]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{site.name} with cache {cache} failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], *, setup: dict) -> None:
    size, patch = setup["size"], setup["patch"]
    print(
        f"\nScan-geometry memory: synthetic 3D segmentation sites at {size}³ (1 mm, float32 image + uint8 label), "
        f"{setup['val_cases']} validation cases each, default UNet, patch {patch}³, batch {setup['batch']}, "
        f"one epoch on the CPU, data.workers = 0. Peak RSS per fresh process; ratio against the "
        f"{min(setup['cases'])}-case site with the same cache (target ≤ {TARGET_RATIO}).\n"
    )
    print(
        "| training cases | cache | cases held in RAM | RSS before open MB | peak open MB | peak training MB "
        "| peak MB | ratio | ≤ 1.2 | steps | open s | train s |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for row in rows:
        holds = "yes" if row["ratio"] <= TARGET_RATIO else "**no**"
        print(
            f"| {row['train_cases']} | {row['cache']} | {row['cached_cases']} | {row['rss_start_mb']:.0f} "
            f"| {row['peak_open_mb']:.0f} | {row['peak_train_mb']:.0f} | {row['peak_mb']:.0f} | {row['ratio']:.2f} "
            f"| {holds} | {row['steps']} | {row['open_s']:.0f} | {row['train_s']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64³ sites of 2 and 12 cases, patch 32³ (a minute or two)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fedmed-bench-scan"), help="sites and disk cache")
    parser.add_argument("--cases", type=int, nargs="+", help="training cases per site (default 20 200)")
    parser.add_argument("--caches", nargs="+", default=["memory", "disk", "none"], help="memory, memory:N, disk, none")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        site, cache, patch, batch, cache_dir = args.child
        child(Path(site), cache=cache, patch=int(patch), batch=int(batch), cache_dir=Path(cache_dir))
        return
    for cache in args.caches:
        if cache.partition(":")[0] not in ("memory", "disk", "none"):
            parser.error(f"--caches: unknown cache '{cache}'; use memory, memory:N, disk or none")

    logging.getLogger("fedmed").setLevel(logging.WARNING)
    setup = dict(QUICK if args.quick else FULL)
    if args.cases:
        setup["cases"] = sorted(args.cases)
    work_dir = args.work_dir.resolve()
    sites = generate_sites(work_dir, size=setup["size"], cases=setup["cases"], val_cases=setup["val_cases"])
    rows = []
    for cache in args.caches:
        baseline = None
        for count in setup["cases"]:  # smallest first: it is the baseline of the ratio
            # Emptied first: every run measures the same thing, a site's first epoch (it writes the disk cache).
            cache_dir = work_dir / "cache" / f"{site_name(count)}-{setup['size']}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            row = measure(sites[count], cache=cache, patch=setup["patch"], batch=setup["batch"], cache_dir=cache_dir)
            baseline = baseline or row["peak_mb"]
            rows.append({**row, "cache": cache, "ratio": row["peak_mb"] / baseline})
            print(f"{count} cases, cache {cache}: peak {row['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    print_table(rows, setup=setup)


if __name__ == "__main__":
    main()
