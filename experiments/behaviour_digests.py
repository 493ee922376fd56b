"""Digests of what a run computes, to show a refactor changed no behaviour.

Runs `fedmed simulate` (the CLI, so the same script works on any commit) on small variants of the demo
covering each code path a refactor could disturb (FedAvgM, FedProx + FedBN, DP-SGD, client-level DP, SecAgg+,
Ditto + fine-tuning, classification, enhancement), then prints one SHA-256 per run of the final model's
tensors and one of its metrics with every wall-clock field dropped. Two commits that print the same table
trained the same models to the same scores.

    python experiments/behaviour_digests.py            # prints a markdown table
    python experiments/behaviour_digests.py --json F   # also writes the digests to F
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SMALL = ["train.rounds=2", "train.local_epochs=1", "synth.train_cases=4", "synth.val_cases=4", "train.eval_every=1"]
VARIANTS: dict[str, list[str]] = {
    "fedavgm": [],
    "fedprox+fedbn": ["strategy.name=fedprox", "strategy.proximal_mu=0.01", "strategy.fedbn=true"],
    "fedadam": ["strategy.name=fedadam"],
    "dp_sgd": ["dp_sgd.enabled=true", "dp_sgd.steps=epochs", "dp_sgd.epsilon=8", "dp_sgd.max_effective_noise=2"],
    "client_dp": ["client_dp.enabled=true", "strategy.name=fedavg"],
    "secagg": ["secagg.enabled=true"],
    "ditto+finetune": [
        "evaluation.ditto_lambda=0.1",
        "evaluation.finetune_epochs=2",
        "evaluation.tuning_fraction=0.25",
    ],
    "classification": ["task.kind=classification", "synth.task=classification", "model.name=densenet-small"],
    "denoise": ["config=experiments/configs/enhancement-denoise-2d.toml"],
}
# Wall-clock fields differ between any two runs; everything else must not.
CLOCK_FIELDS = ("time", "seconds", "_s")


def _without_clock(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if not any(c in k for c in CLOCK_FIELDS)}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def model_digest(final_pt: Path) -> str:
    state = torch.load(final_pt, map_location="cpu", weights_only=False)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def metrics_digest(run_dir: Path) -> str:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    text = json.dumps(_without_clock({"rows": rows, "summary": summary}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_variant(name: str, overrides: list[str], workdir: Path) -> tuple[str, str]:
    repo = Path(__file__).resolve().parents[1]
    config = repo / "fedmed" / "resources" / "demo.toml"
    if overrides and overrides[0].startswith("config="):
        config, overrides = repo / overrides[0].removeprefix("config="), overrides[1:]
    out = workdir / name
    sets = [*SMALL, *overrides, f"output_dir={out}", "baselines.pooled=false"]
    command = [sys.executable, "-m", "fedmed.cli.main", "simulate", str(config)]
    for item in sets:
        command += ["--set", item]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name}: fedmed simulate failed\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    (run_dir,) = [p for p in out.iterdir() if (p / "checkpoints").is_dir()]
    return model_digest(run_dir / "checkpoints" / "final.pt"), metrics_digest(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the digests here")
    parser.add_argument("--only", nargs="*", help="run only these variants")
    args = parser.parse_args()
    digests: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            model, metrics = run_variant(name, overrides, Path(tmp))
            digests[name] = {"model": model, "metrics": metrics}
            print(f"| {name} | {model} | {metrics} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(digests, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
