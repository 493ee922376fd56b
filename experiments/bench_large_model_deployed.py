"""One deployed round of a 54 M-parameter 3D UNet (MONAI, widths 80-1024, 217 MB of float32 per update): updates
as float32 vs 8-bit, over loopback and over a 10 MB/s link per site.

A real federation on this machine (the SuperLink behind the nginx front proxy, three SuperNodes, all with TLS,
separate processes on 127.0.0.1) trains one round, one local step per site on a 32³ synthetic volume. For the
slow link each site's connections go through a paced relay (fedmed.deploy.slow_link) at the rate in both
directions, so the global model comes down at that rate too: only the update is compressed.

The target (issue 28): at 10 MB/s per site, the 8-bit round takes ≤ 0.35× the float32 round's wall time.

    python experiments/bench_large_model_deployed.py [--rates 0 10] [--out runs/bench-large-model-deployed]

A rate of 0 is loopback, unpaced. Results are appended to OUT/results.jsonl as each round ends, with the commit
they ran; a rerun with the same OUT skips the rounds it holds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import tomli_w
from code_version import commit

from fedmed.api import SiteDrift, SynthConfig, synthesize_federation
from fedmed.api.bench import LocalFederation

WIDE_UNET = [80, 160, 320, 640, 1024]
SITES = ("a", "b", "c")
ENCODINGS = {"float32": {}, "8-bit": {"bits": 8}}


def run_config(name: str, compression: dict) -> dict:
    return {
        "name": name,
        "seed": 0,
        "task": {"kind": "segmentation", "spatial_dims": 3, "image_size": [32, 32, 32]},
        "model": {"name": "unet", "channels": WIDE_UNET},
        "train": {"rounds": 1, "local_steps": 1, "batch_size": 1, "learning_rate": 1e-4},
        "strategy": {"round_timeout_s": 1800},
        "evaluation": {"cross_site": False, "model_card": False, "finetune_epochs": 0},
        "compression": compression,
    }


def measure(rate_mb: float, encodings: list[str], scratch: Path) -> list[dict]:
    synth = SynthConfig(
        task="segmentation",
        spatial_dims=3,
        image_size=[32, 32, 32],
        train_cases=1,
        val_cases=1,
        seed=1,
        sites=[SiteDrift(name=site) for site in SITES],
    )
    sites = synthesize_federation(synth, scratch / "data")
    federation = LocalFederation(scratch, site_data={site.name: site.path for site in sites})
    federation.provision()
    rate = rate_mb * 1e6 or None
    if rate:
        for site in SITES:
            federation.slow_link(site, upload_rate=rate, download_rate=rate)
    rows = []
    try:
        federation.start()
        for encoding in encodings:
            path = scratch / f"{encoding}.toml"
            path.write_text(tomli_w.dumps(run_config(f"large-{encoding}", ENCODINGS[encoding])))
            started = time.perf_counter()
            completed = federation.run(path, "--wait", check=False)
            wall = time.perf_counter() - started
            if "finished:completed" not in completed.stdout:
                raise RuntimeError(f"the {encoding} run failed:\n{completed.stdout}\n{completed.stderr}")
            run_dir = Path(completed.stdout.split("run directory: ")[1].split()[0])
            (row,) = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
            rows.append(
                {
                    "rate_mb_s": rate_mb,
                    "encoding": encoding,
                    "round_s": row["seconds"],
                    "train_phase_s": row["train_phase_s"],
                    "run_wall_s": wall,
                    "upload_bytes_per_site": row["upload_bytes_per_site"],
                    "proxy_replies_per_site": max(s["replies"] for s in row["proxy_bytes"].values()),
                    "proxy_to_site_per_site": max(s["to_site"] for s in row["proxy_bytes"].values()),
                    "sites_trained": len(row["sites_trained"]),
                }
            )
    finally:
        federation.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 10.0], help="MB/s per site; 0: unpaced")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-large-model-deployed"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "results.jsonl"
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    rows = []
    for rate in args.rates:
        held = {r["encoding"]: r for r in done if r["rate_mb_s"] == rate}
        missing = [encoding for encoding in ENCODINGS if encoding not in held]
        if missing:
            with tempfile.TemporaryDirectory() as scratch:
                for row in measure(rate, missing, Path(scratch)):
                    held[row["encoding"]] = row = {**row, "commit": commit()}
                    with cache.open("a") as file:
                        file.write(json.dumps(row) + "\n")
        rows += [held[encoding] for encoding in ENCODINGS]
    print(
        f"One deployed round of a 3D UNet {WIDE_UNET} (54.3 M parameters), 3 sites, one local step each on a 32³ "
        "volume; proxy, TLS and SuperNodes on loopback. Target: at 10 MB/s per site, 8-bit ≤ 0.35× float32.\n"
    )
    print(
        "| link per site | update | round (s) | vs float32 | training phase (s) | update per site (MB) "
        "| at the proxy: reply / sent to site (MB) | commit |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        base = next(r for r in rows if r["rate_mb_s"] == row["rate_mb_s"] and r["encoding"] == "float32")
        link = f"{row['rate_mb_s']:g} MB/s" if row["rate_mb_s"] else "loopback"
        print(
            f"| {link} | {row['encoding']} | {row['round_s']:.1f} | {row['round_s'] / base['round_s']:.2f}× "
            f"| {row['train_phase_s']:.1f} | {row['upload_bytes_per_site'] / 1e6:.1f} "
            f"| {row['proxy_replies_per_site'] / 1e6:.1f} / {row['proxy_to_site_per_site'] / 1e6:.1f} "
            f"| {row['commit']} |"
        )


if __name__ == "__main__":
    main()
