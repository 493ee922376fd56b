"""Utility under DP-SGD: the demo segmentation federation at ε = 1, 3, 8 (δ = 1e-5) against non-private.

Same data, model, rounds, epochs and seed as `fedmed demo`; each site calibrates one noise
multiplier for the whole run from its own ledger. Prints Dice per site, the mean and the worst site.

    python experiments/bench_dp_utility.py [--epsilons 1 3 8] [--accountant prv]
    python experiments/bench_dp_utility.py --train-cases 64 --rounds 10 --local-epochs 2   # larger sites
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from importlib.resources import files
from pathlib import Path

from fedmed.config import load_run_config
from fedmed.flower.runtime.environment import set_flower_verbosity
from fedmed.workflows.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--accountant", choices=["prv", "rdp"], default="prv")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--train-cases", type=int, help="training cases at every site (default: the demo's)")
    parser.add_argument("--rounds", type=int, help="rounds (default: the demo's)")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round (default: the demo's)")
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for epsilon in [None, *args.epsilons]:
            config = load_run_config(Path(str(files("fedmed.resources").joinpath("demo.toml"))))
            config.output_dir = Path(scratch)
            config.baselines.local_only = config.baselines.pooled = False
            if args.train_cases:
                for site in config.synth.sites:
                    site.train_cases = args.train_cases
            config.train.rounds = args.rounds or config.train.rounds
            config.train.local_epochs = args.local_epochs or config.train.local_epochs
            if epsilon is not None:
                config.dp_sgd.enabled = True
                config.dp_sgd.epsilon = epsilon
                config.dp_sgd.accountant = args.accountant
                config.dp_sgd.max_grad_norm = args.max_grad_norm
            run = simulate(config)
            sites = run.summary["sites"]
            dice = {site: row["federated"]["dice"] for site, row in sites.items()}
            spent = {site: row["epsilon"] for site, row in run.summary.get("privacy", {}).items()}
            noise = {site: row["noise_multiplier"] for site, row in run.summary.get("privacy", {}).items()}
            results["non-private" if epsilon is None else f"ε = {epsilon:g}"] = (dice, spent, noise)
            print(f"done: {'non-private' if epsilon is None else epsilon}", flush=True)
    names = sorted(next(iter(results.values()))[0])
    cases = f"{args.train_cases} training cases per site" if args.train_cases else "the demo's 6/6/3 training cases"
    print(
        f"\nDP-SGD utility: demo federation (2D segmentation, 3 hospitals, {cases}, {config.train.rounds} rounds x "
        f"{config.train.local_epochs} local epochs), δ = 1e-5, {args.accountant.upper()} accountant, clip "
        f"{args.max_grad_norm}; Dice of the global model"
    )
    print(f"{'':<14}" + "".join(f"{name:>12}" for name in names) + f"{'mean':>9}{'worst':>9}{'ε spent':>10}{'σ':>8}")
    for label, (dice, spent, noise) in results.items():
        values = [dice[name] for name in names]
        spent_text = f"{max(spent.values()):.2f}" if spent else "-"
        noise_text = f"{max(noise.values()):.2f}" if noise else "-"
        print(
            f"{label:<14}"
            + "".join(f"{value:>12.3f}" for value in values)
            + f"{sum(values) / len(values):>9.3f}{min(values):>9.3f}{spent_text:>10}{noise_text:>8}"
        )


if __name__ == "__main__":
    main()
