"""Federated learning under strong scanner drift: FedAvg, FedProx, FedBN, FedBN + per-site normalization and
FedBN + Nyúl harmonization (arms.toml), against local-only and pooled training on the same data.

Two federations: synthetic lesion segmentation (synthetic.toml) and brain-mask segmentation on real T1 MRI
(ixi.toml; 12 IXI subjects from ../shared/data split into 3 sites, each behind a simulated scanner).
Prints Dice per site, the mean and the worst site for every arm, and the issue's two targets.

    python experiments/drift/run_drift.py                          # both (IXI only when ../shared/data exists)
    python experiments/drift/run_drift.py --dataset synthetic --arms fedavg "fedbn+site-norm"
    python experiments/drift/run_drift.py --quick                  # each dataset's [quick] changes: checks the script

The helpers below (base configs, arms, drifted sites) are shared with experiments/personalization/.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from fedmed.api import (
    RunConfig,
    SiteDrift,
    cases_from_folder_pairs,
    load_config,
    read_toml,
    set_flower_verbosity,
    simulate,
    split_into_sites,
)

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED_DATA = HERE.parents[2] / "shared" / "data"
WORST_SITE_MARGIN = 0.05  # FedBN + normalization worst site >= FedAvg worst site + this
POOLED_FRACTION = 0.97  # best federated mean >= this x pooled mean
COLUMNS = ("federated", "delivered", "personalized", "local_only", "pooled")  # Dice per site, from the summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["synthetic", "ixi", "all"], default="all")
    parser.add_argument("--arms", nargs="+", help="arms from arms.toml (default: all)")
    parser.add_argument("--output", type=Path, default=Path("runs") / "drift")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--rounds", type=int, help="override train.rounds of the base configs")
    parser.add_argument("--local-epochs", type=int, help="override train.local_epochs of the base configs")
    parser.add_argument("--quick", action="store_true", help="apply each dataset's [quick] changes (a smoke test)")
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    arms = read_toml(HERE / "arms.toml")
    chosen = args.arms or list(arms)
    unknown = sorted(set(chosen) - set(arms))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; arms.toml has {list(arms)}")
    datasets = ["synthetic", "ixi"] if args.dataset == "all" else [args.dataset]
    for dataset in datasets:
        if missing := missing_data(dataset, shared_data=args.shared_data):
            print(f"skipping {dataset}: {missing} not found (pass --shared-data)")
            continue
        base = base_config(dataset, output=args.output, shared_data=args.shared_data, quick=args.quick)
        set_schedule(base, rounds=args.rounds, local_epochs=args.local_epochs)
        results, with_baselines = {}, set()
        for arm in chosen:
            # Local-only and pooled depend only on the data as normalized and on the network: train them once each.
            key = baseline_label(base, arms[arm])
            results[arm] = run_arm(
                base, arm=arm, changes=arms[arm], output=args.output, baselines=key not in with_baselines
            )
            with_baselines.add(key)
        (args.output / f"{dataset}-results.json").write_text(json.dumps(results, indent=1))
        print(format_table(dataset, results))


# --- helpers shared with experiments/personalization/ ----------------------------------------------------------

DRIFT_DATA = {"ixi": "ixi-hh-t1-12"}  # datasets of this folder that read ../shared/data, and the folder they read


def missing_data(dataset: str, *, shared_data: Path) -> Path | None:
    """The shared-data folder a drift dataset needs when it is absent; None when it is there (or none is needed)."""
    folder = DRIFT_DATA.get(dataset)
    return shared_data / folder if folder and not (shared_data / folder).is_dir() else None


def read_dataset_toml(path: Path, *, quick: bool) -> dict[str, Any]:
    """A dataset's base config; its [quick] table, the changes for a smoke test, applied when asked (the table is
    not a run-config section, so it is removed either way)."""
    raw = read_toml(path)
    quick_changes = raw.pop("quick", {})
    return with_changes(raw, quick_changes) if quick else raw


def with_changes(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with an arm's (or [quick]'s) changes: a table updates that section key by key, so an arm
    names only what it changes; a plain value replaces the key."""
    changed = json.loads(json.dumps(raw))
    for section, values in changes.items():
        if isinstance(values, dict) and isinstance(changed.get(section), dict):
            changed[section].update(values)
        else:
            changed[section] = values
    return changed


def set_schedule(raw: dict[str, Any], *, rounds: int | None, local_epochs: int | None) -> None:
    """Command-line rounds and local epochs win over the dataset's."""
    raw["train"]["rounds"] = rounds or raw["train"]["rounds"]
    raw["train"]["local_epochs"] = local_epochs or raw["train"]["local_epochs"]


def base_config(dataset: str, *, output: Path, shared_data: Path, quick: bool = False) -> dict[str, Any]:
    """The base run config of a drift dataset (synthetic.toml, ixi.toml), its sites written under `output`."""
    raw = read_dataset_toml(HERE / f"{dataset}.toml", quick=quick)
    raw["output_dir"] = str(output)
    if dataset == "ixi":
        raw["sites"] = drifted_sites(
            ixi_cases(shared_data / "ixi-hh-t1-12"),
            scanners=raw.pop("scanners"),
            out_dir=output / "data" / "ixi-sites",
            task=raw["task"],
            val_fraction=0.25,
        )
    return raw


def ixi_cases(root: Path) -> list[Any]:
    return cases_from_folder_pairs(
        root / "t1",
        root / "labels",
        image_glob="*_T1.nii.gz",
        label_for_image=lambda name: name.replace("_T1.nii.gz", "_T1_DLMUSE.nii.gz"),
    )


def drifted_sites(
    cases: list[Any],
    *,
    scanners: list[dict[str, Any]],
    out_dir: Path,
    task: dict[str, Any],
    val_fraction: float,
    label_names: dict[int, str] | None = None,
) -> list[dict[str, str]]:
    """Deal real cases onto one site per simulated scanner (a [[scanners]] table: SiteDrift fields), resampled to
    the task's grid; the [[sites]] entries of a run config."""
    sites = split_into_sites(
        cases,
        drifts=[SiteDrift(**scanner) for scanner in scanners],
        out_dir=out_dir,
        image_size=task["image_size"],
        binarize_labels=task.get("binarize_labels", False),
        val_fraction=val_fraction,
        seed=0,
        label_names=label_names,
        overwrite=True,  # a rerun into the same --output (or --quick, fewer cases) deals the cases again
    )
    return [{"name": site.name, "path": str(site.path)} for site in sites]


def baseline_label(base: dict[str, Any], changes: dict[str, Any]) -> str:
    intensity = changes.get("task", {}).get("intensity", base["task"].get("intensity", "zscore"))
    norm = changes.get("model", {}).get("norm", base["model"].get("norm"))
    return intensity + (f", {norm} norm" if norm else "")


def arm_config(base: dict[str, Any], *, arm: str, changes: dict[str, Any], output: Path, baselines: bool) -> RunConfig:
    """The validated run config of one arm (raises ConfigError when the arm's changes do not validate)."""
    raw = with_changes(base, changes)
    raw["name"] = f"{base['name']}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', arm).strip('-')}"
    raw["baselines"] = {"local_only": baselines, "pooled": baselines}
    return load_config(raw, base=output, label=f"arm {arm!r}")


def run_arm(
    base: dict[str, Any], *, arm: str, changes: dict[str, Any], output: Path, baselines: bool
) -> dict[str, Any]:
    """Simulate one arm; Dice per site of each column the summary has (COLUMNS), its wall time and run directory,
    and each site's training cases (round 1) and optimizer steps (all rounds)."""
    config = arm_config(base, arm=arm, changes=changes, output=output, baselines=baselines)
    started = time.perf_counter()
    result = simulate(config)
    summary = result.summary
    trained = [row for row in result.metrics if row["phase"] == "train"]
    steps: dict[str, int] = {}
    for row in trained:
        steps[row["site"]] = steps.get(row["site"], 0) + row.get("train_steps", 0)
    return {
        "baselines": baseline_label(base, changes),
        "seconds": round(time.perf_counter() - started, 1),
        "run_dir": str(result.run_dir),
        "train_cases": {row["site"]: row["num-examples"] for row in trained if row["round"] == 1},
        "train_steps": steps,
        **{
            column: {site: row[column]["dice"] for site, row in summary["sites"].items() if row.get(column)}
            for column in COLUMNS
        },
    }


def format_table(dataset: str, results: dict[str, dict[str, Any]]) -> str:
    sites = sorted(next(iter(results.values()))["federated"])
    header = f"{'':<40}" + "".join(f"{site:>9}" for site in sites) + f"{'mean':>9}{'worst':>9}"
    lines = [f"Dice under scanner drift: {dataset}", header, "-" * len(header)]

    def row(label: str, dice: dict[str, float]) -> str:
        values = [dice[site] for site in sites]
        cells = "".join(f"{value:>9.3f}" for value in values)
        return f"{label:<40}{cells}{sum(values) / len(values):>9.3f}{min(values):>9.3f}"

    for arm, result in results.items():
        lines.append(row(arm, result["federated"]))
    for result in results.values():
        if not result["pooled"]:
            continue
        lines.append(row(f"local-only ({result['baselines']})", result["local_only"]))
        lines.append(row(f"pooled ({result['baselines']})", result["pooled"]))
    lines += _targets(results)
    return "\n".join(lines)


def _targets(results: dict[str, dict[str, Any]]) -> list[str]:
    def mean(dice: dict[str, float]) -> float:
        return sum(dice.values()) / len(dice)

    lines = []
    if "fedavg" in results and "fedbn+site-norm" in results:
        fedavg, fedbn = (
            min(results["fedavg"]["federated"].values()),
            min(results["fedbn+site-norm"]["federated"].values()),
        )
        verdict = "met" if fedbn >= fedavg + WORST_SITE_MARGIN else "MISSED"
        lines.append(
            f"target worst site: fedbn+site-norm {fedbn:.3f} vs fedavg {fedavg:.3f} + {WORST_SITE_MARGIN}: {verdict}"
        )
    best_arm = max(results, key=lambda arm: mean(results[arm]["federated"]))
    best = mean(results[best_arm]["federated"])
    pooled_by_label = {result["baselines"]: mean(result["pooled"]) for result in results.values() if result["pooled"]}
    # Two readings of "pooled": trained on the data as the best arm normalizes it, and the best pooled model of all.
    for what, pooled in (
        ("pooled with the same normalization", pooled_by_label[results[best_arm]["baselines"]]),
        ("best pooled", max(pooled_by_label.values())),
    ):
        verdict = "met" if best >= POOLED_FRACTION * pooled else "MISSED"
        lines.append(
            f"target pooled: best federated mean {best:.3f} ({best_arm}) = {best / pooled:.3f} x {what} "
            f"{pooled:.3f} (>= {POOLED_FRACTION}): {verdict}"
        )
    return lines


if __name__ == "__main__":
    main()
