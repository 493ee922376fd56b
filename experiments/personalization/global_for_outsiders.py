"""What FedBN's global model is worth to a hospital outside the federation.

Under FedBN the normalization layers never leave the sites, so the global model a new hospital applies (`fedmed
predict` without `--site`, an exported bundle) carries the coordinator's untrained ones. This scores each run's final
checkpoint as such a hospital would: its own normalization layers, no site's, on each site's validation cases
normalized with that site's own statistics (site z-score, fitted afresh). Give it the run directories of
bench_every_site.py's arms, e.g. `defaults` against `fedbn`:

    python experiments/personalization/global_for_outsiders.py runs/every-site/every-site-ixi-brats-{defaults,fedbn}-*
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from fedmed.api import load_config
from fedmed.api.bench import SiteSession, SiteSpec


def outsider_scores(run: Path) -> dict[str, float]:
    config = load_config(run / "config.toml")
    outsider = config.model_copy(update={"strategy": config.strategy.model_copy(update={"fedbn": False})})
    state = torch.load(run / "checkpoints" / "final.pt", weights_only=False)["state_dict"]
    scores = {}
    for site in config.sites:
        with tempfile.TemporaryDirectory() as state_dir:
            session = SiteSession(SiteSpec(name=site.name, data_path=site.path, state_dir=Path(state_dir)), outsider)
            session.describe_intensities()
            scores[site.name] = float(session.evaluate(state)["dice"])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.ERROR)
    print("| run | fedbn | seed | " + "mean Dice, the global model as an outsider applies it |")
    print("| --- | --- | ---: | ---: |")
    for run in args.runs:
        config = load_config(run / "config.toml")
        scores = outsider_scores(run)
        print(f"| {run.name} | {config.strategy.fedbn} | {config.seed} | {statistics.mean(scores.values()):.3f} |")


if __name__ == "__main__":
    main()
