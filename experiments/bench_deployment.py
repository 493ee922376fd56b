"""Deployment: per-round time over Flower's own floor, and the ClientApp cold start.

A real federation on this machine (SuperLink with TLS and node authentication behind the nginx front
proxy with mutual TLS, three SuperNodes, fedmed's executors; all separate processes on 127.0.0.1)
runs, one after the other:
  1. an echo app with the same message pattern and payload size as a fedmed round (Flower's floor),
  2. a fedmed run with warm ClientApp starts (fork from a process with torch and MONAI loaded),
  3. the same run with cold starts (a fresh interpreter per message, as Flower's own executor does),
and the in-process engine runs it too. The site compute per round (slowest site's training plus
slowest site's evaluation, as the sites run in parallel) comes from the run's own metrics.

    python experiments/bench_deployment.py [--rounds 3] [--warm-only]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmed.api import (
    ModelConfig,
    SiteDrift,
    SiteEntry,
    SynthConfig,
    TaskConfig,
    build_model,
    load_config,
    load_server_config,
    set_flower_verbosity,
    simulate,
    synthesize_federation,
)
from fedmed.api.bench import CLIENT_APP_PRELOAD, LocalFederation, preload_client_app, start_flower_run, wait_for

FLOOR_APP = Path(__file__).resolve().parent / "flower_floor_app"
TASK = {"kind": "segmentation", "spatial_dims": 2, "image_size": [64, 64]}
MODEL = {"channels": [16, 32, 64]}


def run_config(name: str, rounds: int) -> dict:
    return {
        "name": name,
        "seed": 0,
        "task": TASK,
        "model": MODEL,
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 4, "learning_rate": 0.002},
        "strategy": {"round_timeout_s": 300},
    }


def round_seconds(path: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in path.read_text().splitlines() if line.strip()]


def site_compute(run_dir: Path) -> list[float]:
    """Per round: slowest site's training + slowest site's evaluation (sites work in parallel)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round: dict[int, dict[str, float]] = {}
    for row in rows:
        slot = per_round.setdefault(row["round"], {"train": 0.0, "evaluate": 0.0})
        seconds = row.get("train_seconds", row.get("eval_seconds", 0.0))
        slot[row["phase"]] = max(slot[row["phase"]], seconds)
    return [slot["train"] + slot["evaluate"] for _, slot in sorted(per_round.items())]


def ready_times(federation: LocalFederation, offsets: dict[str, int]) -> list[float]:
    found = []
    for site in federation.sites:
        text = federation.site_log(site).read_text()[offsets[site] :]
        found += [float(value) for value in re.findall(r"ClientApp ready ([\d.]+) s", text)]
    return found


def log_offsets(federation: LocalFederation) -> dict[str, int]:
    return {site: len(federation.site_log(site).read_text()) for site in federation.sites}


def cold_import_seconds(repeats: int) -> list[float]:
    """A fresh interpreter importing what a ClientApp needs (Flower's runtime, torch, MONAI, fedmed)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", CLIENT_APP_PRELOAD], check=True)
        times.append(time.perf_counter() - started)
    return times


def fork_seconds(repeats: int) -> list[float]:
    """From fork() in a warm process to the child running (what a warm start costs)."""
    preload_client_app()
    times = []
    for _ in range(repeats):
        read, write = os.pipe()
        started = time.perf_counter()
        child = os.fork()
        if child == 0:
            os.write(write, b"x")
            os._exit(0)
        os.read(read, 1)
        times.append(time.perf_counter() - started)
        os.waitpid(child, 0)
        os.close(read)
        os.close(write)
    return times


def deployed_runs(
    root: Path, sites: list[SiteEntry], *, rounds: int, parameters: int, warm_only: bool
) -> dict[str, Any]:
    """Flower's floor, then fedmed's run with warm (and cold) ClientApp starts, on a real federation here."""
    floor_digest = hashlib.sha256(
        __import__("flwr.cli.build", fromlist=["x"]).build_fab_from_disk(FLOOR_APP)
    ).hexdigest()
    federation = LocalFederation(root, site_data={site.name: site.path for site in sites})
    federation.provision()
    digests = [*load_server_config(federation.server_config).approved_apps, floor_digest]
    federation.edit_server(approved_apps=digests)
    for site in federation.sites:
        federation.edit_site(site, approved_apps=digests)
    try:
        federation.start()
        server = load_server_config(federation.server_config)
        floor_out = root / "floor.jsonl"
        floor_config = root / "floor.toml"
        floor_config.write_text(f'rounds = {rounds}\nparameters = {parameters}\nsites = 3\noutput = "{floor_out}"\n')
        start_flower_run(server, app=FLOOR_APP, run_config_file=floor_config)
        wait_for(
            lambda: floor_out.exists() and len(round_seconds(floor_out)) >= rounds,
            timeout=600,
            what="the floor app",
        )
        results: dict[str, Any] = {"floor": round_seconds(floor_out)}
        for mode in ("warm",) if warm_only else ("warm", "cold"):
            if mode == "cold":
                for site in federation.sites:
                    federation.stop(site)
                    federation.edit_site(site, daemon={"warm_start": False})
                    federation.start_site(site)
                federation.wait_for_sites(set(federation.sites))
            offsets = log_offsets(federation)
            config_file = federation.write_run_config(run_config(f"bench-{mode}", rounds))
            output = federation.run(config_file, "--wait").stdout
            run_dir = Path(re.search(r"run directory: (\S+)", output).group(1))
            results[mode] = {
                "rounds": round_seconds(run_dir / "rounds.jsonl"),
                "compute": site_compute(run_dir),
                "ready": ready_times(federation, offsets),
            }
    finally:
        federation.close()
    return results


def parameter_count() -> int:
    return sum(p.numel() for p in build_model(TaskConfig(**TASK), ModelConfig(**MODEL)).parameters())


def print_table(
    results: dict[str, Any], *, inprocess: list[float], startup: dict[str, list[float]], rounds: int, parameters: int
) -> None:
    cold_imports, forks = startup["cold"], startup["fork"]
    median = statistics.median
    floor, warm = results["floor"], results["warm"]
    cold = results.get("cold", {"rounds": [float("nan")], "ready": [float("nan")]})
    print(
        f"\nDeployment: 3 sites and the coordinator on one machine (TLS, node authentication, mTLS proxy), "
        f"2D segmentation 64x64, UNet 16-32-64 ({parameters} parameters), {rounds} rounds of 1 local epoch; "
        "medians"
    )
    print(f"{'':<62}{'s/round':>9}")
    print(f"{'Flower floor: echo app, same messages and payload':<62}{median(floor):>9.2f}")
    print(f"{'fedmed deployed, warm ClientApp start':<62}{median(warm['rounds']):>9.2f}")
    print(f"{'fedmed deployed, cold start (fresh interpreter per message)':<62}{median(cold['rounds']):>9.2f}")
    print(f"{'fedmed in-process engine, same run':<62}{median(inprocess):>9.2f}")
    print(f"{'site compute in the warm run (slowest train + slowest eval)':<62}{median(warm['compute']):>9.2f}")
    added = median(warm["rounds"]) - median(floor) - median(warm["compute"])
    print(f"{'fedmed added per round: warm - floor - compute':<62}{added:>9.2f}")
    print("\nClientApp start-up (s, median):")
    print(f"  fresh interpreter importing Flower's runtime, torch, MONAI, fedmed: {median(cold_imports):.2f}")
    print(f"  fork from the warm executor until the child runs:                   {median(forks):.4f}")
    print(
        f"  observed, process start to handler (includes Flower fetching the task): warm "
        f"{median(warm['ready']):.2f}, cold {median(cold['ready']):.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-only", action="store_true", help="skip the cold-start run (minutes of start-ups)")
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    parameters = parameter_count()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        drifts = [SiteDrift(name="a"), SiteDrift(name="b", intensity_scale=2.0), SiteDrift(name="c", gamma=1.3)]
        sites = synthesize_federation(
            SynthConfig(
                task="segmentation", spatial_dims=2, image_size=[64, 64], train_cases=6, val_cases=4, sites=drifts
            ),
            root / "data",
        )
        results = deployed_runs(root, sites, rounds=args.rounds, parameters=parameters, warm_only=args.warm_only)
        raw = run_config("bench-inprocess", args.rounds)
        raw.update(output_dir=str(root / "inprocess"), sites=[{"name": s.name, "path": str(s.path)} for s in sites])
        inprocess = [row["seconds"] for row in simulate(load_config(raw, base=root)).rounds]
    startup = {"cold": cold_import_seconds(3), "fork": fork_seconds(20)}
    print_table(results, inprocess=inprocess, startup=startup, rounds=args.rounds, parameters=parameters)


if __name__ == "__main__":
    main()
