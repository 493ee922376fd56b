"""Is every site better off for joining the federation? One command, every arm of arms.toml on every dataset.

Datasets (`--dataset`; one whose files are missing from ../shared/data is skipped, saying why):

- `synthetic`: the synthetic drift federation (experiments/drift/synthetic.toml: 3 sites, 2D), site z-score;
- `ixi`: 12 IXI T1 volumes, 3 sites behind simulated scanners, brain mask (experiments/drift/ixi.toml), site
  z-score;
- `hippocampus`: MSD Task04, 200 crops dealt onto 3 simulated scanners at 32^3 (hippocampus.toml);
- `brats`: BraTS 2018, 10 cases split by acquisition source, CBICA and the merged TCIA centres (brats.toml);
- `ixi-brats`: `ixi`'s three sites and a small out-of-domain one: BraTS 2018's T1 volumes (another scanner and
  population, skull-stripped) with the brain mask = T1 > 0, 5 training and 5 validation cases, on IXI's grid.

Arms (arms.toml): fedavg, defaults (fedmed's defaults, the end-of-run fine-tune included), fedprox, fedbn,
finetune_tuning_split, ditto, fedbn_finetune, fedbn_finetune_tuning_split. For every site
of every arm: `global`, the federated global model's final Dice at the site; `delivered`, the model the site is
handed (the better of global and personalized on the site's tuning split; global where the run does not report
one); and the baselines, trained once per dataset and seed (per intensity handling): `local-only` (the site alone) and
`pooled` (all sites' training cases in one place), each for rounds x local epochs epochs. Targets, per arm:

1. every site's delivered Dice >= its local-only Dice - 0.005;
2. mean delivered >= 0.98 x mean pooled;
3. mean global >= 0.97 x mean pooled.

Prints a markdown table per dataset (experiments/benchmark_tables.py stamps it into the docs) and writes the numbers to
<output>/<dataset>-every-site.json. An arm whose config does not validate (or that fails) is shown as
"error: ..." and the others go on.

    python experiments/personalization/bench_every_site.py                         # every dataset, every arm
    python experiments/personalization/bench_every_site.py --dataset synthetic --quick --arms fedavg fedbn finetune
    python experiments/personalization/bench_every_site.py --dataset hippocampus --rounds 40 --arms defaults
    python experiments/personalization/bench_every_site.py --dataset ixi --seeds 0 1 2   # + a table over the seeds
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fedmed.api import Case, FedmedError, cases_from_folder_pairs, read_toml, set_flower_verbosity

# Shared helpers live in scripts, not in an installed package: the drift runner's (base configs, arms, drifted
# sites) and bench_real_scans.py's split of BraTS by acquisition source.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "drift"))

from bench_real_scans import brats_sites
from run_drift import (
    DEFAULT_SHARED_DATA,
    base_config,
    baseline_label,
    drifted_sites,
    read_dataset_toml,
    run_arm,
    set_schedule,
)

HERE = Path(__file__).resolve().parent
DATASETS = ("synthetic", "ixi", "ixi-brats", "hippocampus", "brats")
SHARED = {
    "ixi": ("ixi-hh-t1-12",),
    "ixi-brats": ("ixi-hh-t1-12", "brats2018-10"),
    "hippocampus": ("msd-hippocampus",),
    "brats": ("brats2018-10",),
}
HIPPOCAMPUS_LABELS = {0: "background", 1: "anterior", 2: "posterior"}
LOCAL_ONLY_MARGIN = 0.005  # target 1: delivered >= local-only - this, at every site
DELIVERED_OF_POOLED = 0.98  # target 2: mean delivered >= this x mean pooled
GLOBAL_OF_POOLED = 0.97  # target 3: mean global >= this x mean pooled
ERROR_CELL = 160  # characters of an error message in the table (the JSON has all of it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    parser.add_argument("--arms", nargs="+", help="arms from arms.toml (default: all)")
    parser.add_argument("--rounds", type=int, help="override train.rounds of every dataset")
    parser.add_argument("--local-epochs", type=int, help="override train.local_epochs of every dataset")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="run every dataset once per seed (training only; the sites stay)"
    )
    parser.add_argument("--quick", action="store_true", help="each dataset's [quick] changes: a smoke test")
    parser.add_argument("--output", type=Path, default=Path("runs") / "every-site")
    parser.add_argument(
        "--shared-data",
        type=Path,
        default=Path(os.environ.get("FEDMED_SHARED_DATA", DEFAULT_SHARED_DATA)),
        help="real data folder (default: $FEDMED_SHARED_DATA, else ../shared/data)",
    )
    args = parser.parse_args()
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    arms = read_toml(HERE / "arms.toml")
    chosen = args.arms or list(arms)
    if unknown := sorted(set(chosen) - set(arms)):
        parser.error(f"unknown arm(s) {unknown}; arms.toml has {list(arms)}")
    args.output = args.output.resolve()
    args.output.mkdir(parents=True, exist_ok=True)
    for dataset in DATASETS if args.dataset == "all" else [args.dataset]:
        needed = [args.shared_data / name for name in SHARED.get(dataset, ())]
        missing = [folder for folder in needed if not folder.is_dir()]
        if missing:
            print(f"skipping {dataset}: {missing[0]} not found (pass --shared-data)\n", flush=True)
            continue
        started = time.perf_counter()
        try:
            base = dataset_config(dataset, output=args.output, shared_data=args.shared_data, quick=args.quick)
        except FedmedError as error:  # data that do not validate: the other datasets still run
            print(f"skipping {dataset}: {' '.join(str(error).split())}\n", flush=True)
            continue
        set_schedule(base, rounds=args.rounds, local_epochs=args.local_epochs)
        reports = []
        for seed in args.seeds or [base.get("seed", 0)]:
            base["seed"] = seed
            results = run_arms(dataset, base=base, arms={arm: arms[arm] for arm in chosen}, output=args.output)
            report = evaluate(dataset, base=base, results=results, quick=args.quick)
            report["personal"] = [arm for arm in chosen if trains_personal_model(arms[arm])]
            report["seconds"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            suffix = f"-seed{seed}" if args.seeds else ""
            (args.output / f"{dataset}-every-site{suffix}.json").write_text(json.dumps(report, indent=1))
            print(format_markdown(report) + "\n", flush=True)
            reports.append(report)
        if len(reports) > 1:
            print(format_across_seeds(reports) + "\n", flush=True)


# --- datasets --------------------------------------------------------------------------------------------------


def dataset_config(dataset: str, *, output: Path, shared_data: Path, quick: bool) -> dict[str, Any]:
    """The dataset's base run config (raw, before an arm's changes), its sites written under `output`/data."""
    if dataset in ("synthetic", "ixi"):
        raw = base_config(dataset, output=output, shared_data=shared_data, quick=quick)
        raw["name"] = f"every-site-{dataset}"
        # The drift benchmark's raw scanner intensities leave FedAvg at Dice 0 at two sites; here every arm starts
        # from the normalization that benchmark found best (site z-score), so the arms differ in training only.
        raw["task"]["intensity"] = "site_zscore"
        return raw
    if dataset == "ixi-brats":
        raw = dataset_config("ixi", output=output, shared_data=shared_data, quick=quick)
        raw["name"] = "every-site-ixi-brats"
        raw["sites"] += drifted_sites(
            brats_brain_masks(shared_data / "brats2018-10", out_dir=output / "data" / "brats-t1-masks"),
            scanners=[{"name": "brats-t1"}],  # its own scanner already: no simulated drift
            out_dir=output / "data" / "ixi-brats-sites",
            task=raw["task"],
            val_fraction=0.5,
        )
        return raw
    raw = read_dataset_toml(HERE / f"{dataset}.toml", quick=quick)
    raw["output_dir"] = str(output)
    if dataset == "hippocampus":
        root = shared_data / SHARED[dataset][0]
        split = raw.pop("split")
        cases = cases_from_folder_pairs(root / "imagesTr", root / "labelsTr")[: split["max_cases"]]
        raw["sites"] = drifted_sites(
            cases,
            scanners=raw.pop("scanners"),
            out_dir=output / "data" / "hippocampus-sites",
            task=raw["task"],
            val_fraction=split["val_fraction"],
            label_names=HIPPOCAMPUS_LABELS,
        )
    else:  # brats: manifests pointing at the shared files, read through fedmed's scan pipeline (task.spacing)
        # All 10 cases even with --quick: with fewer, a site has one training case and no tuning split to spare.
        folders = brats_sites(shared_data, output / "data", quick=False)
        raw["sites"] = [{"name": name, "path": str(path)} for name, path in folders.items()]
    return raw


def brats_brain_masks(root: Path, *, out_dir: Path) -> list[Any]:
    """BraTS' T1 volumes (skull-stripped) paired with their brain masks, T1 > 0, written once under `out_dir`."""
    import nibabel as nib
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    cases = []
    for folder in sorted(root.glob("case_*")):
        image, mask = folder / "T1.nii.gz", out_dir / f"{folder.name}_brain.nii.gz"
        if not mask.exists():
            volume = nib.load(image)
            brain = (np.asarray(volume.dataobj) > 0).astype(np.uint8)
            nib.save(nib.Nifti1Image(brain, volume.affine), mask)
        cases.append(Case(image=image.resolve(), label=mask.resolve()))
    return cases


# --- running the arms ------------------------------------------------------------------------------------------


def run_arms(
    dataset: str, *, base: dict[str, Any], arms: dict[str, dict[str, Any]], output: Path
) -> dict[str, dict[str, Any]]:
    """Every arm in turn; the first arm that runs with a given intensity handling also trains the baselines."""
    results: dict[str, dict[str, Any]] = {}
    with_baselines: set[str] = set()
    for arm, changes in arms.items():
        key = baseline_label(base, changes)
        started = time.perf_counter()
        try:
            result = run_arm(base, arm=arm, changes=changes, output=output, baselines=key not in with_baselines)
        except FedmedError as error:  # a config (or data) error names the problem: this arm only
            result = {"error": " ".join(str(error).split()), "seconds": round(time.perf_counter() - started, 1)}
        except Exception as error:
            # A crash in one arm (a method still being written) must not cost the hours the others took; the
            # traceback goes to stderr for whoever fixes it.
            traceback.print_exc()
            message = " ".join(f"{type(error).__name__}: {error}".split())
            result = {"error": message, "seconds": round(time.perf_counter() - started, 1)}
        else:
            result["trained_baselines"] = key not in with_baselines
            with_baselines.add(key)
        results[arm] = result
        print(f"[{dataset}] {arm}: {describe_progress(result)}", flush=True)
    return results


def trains_personal_model(changes: dict[str, Any]) -> bool:
    """Whether the arm's sites train a model of their own: Ditto, or a fine-tune (the default one when unset)."""
    evaluation = changes.get("evaluation", {})
    return evaluation.get("ditto_lambda", 0) > 0 or evaluation.get("finetune_epochs") != 0


def describe_progress(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    extra = " (with the baselines)" if result["trained_baselines"] else ""
    return f"global mean {mean(result['federated']):.3f}, {result['seconds']:.0f} s{extra}"


# --- targets ---------------------------------------------------------------------------------------------------


def mean(dice: dict[str, float]) -> float:
    return sum(dice.values()) / len(dice) if dice else math.nan


def evaluate(dataset: str, *, base: dict[str, Any], results: dict[str, dict[str, Any]], quick: bool) -> dict[str, Any]:
    """Per arm: global and delivered Dice per site and the three targets, against the baselines trained on the data
    as that arm normalizes it."""
    baselines = {
        result["baselines"]: {"local_only": result["local_only"], "pooled": result["pooled"]}
        for result in results.values()
        if result.get("pooled")
    }
    arms: dict[str, Any] = {}
    for arm, result in results.items():
        if "error" in result:
            arms[arm] = {"error": result["error"], "seconds": result["seconds"]}
            continue
        glob = result["federated"]
        # An arm that trains no personal model reports no choice: its sites are handed the global model.
        delivered = {site: result.get("delivered", {}).get(site, dice) for site, dice in glob.items()}
        arms[arm] = {
            "global": glob,
            "delivered": delivered,
            "delivered_reported": sorted(result.get("delivered", {})),
            "personalized": result.get("personalized", {}),
            "baselines": result["baselines"],
            "trained_baselines": result["trained_baselines"],
            "seconds": result["seconds"],
            "run_dir": result["run_dir"],
            "targets": targets(glob, delivered=delivered, baseline=baselines.get(result["baselines"])),
        }
    train = base["train"]
    return {
        "dataset": dataset,
        "seed": base["seed"],
        "quick": quick,
        "rounds": train["rounds"],
        "local_epochs": train["local_epochs"],
        "sites": sorted(next((arm["global"] for arm in arms.values() if "global" in arm), {})),
        "arms": arms,
        "baselines": baselines,
        "local_steps": train.get("local_steps"),
        "steps": steps_note(results, train=train),
    }


def targets(
    glob: dict[str, float], *, delivered: dict[str, float], baseline: dict[str, dict[str, float]] | None
) -> dict[str, dict[str, Any]]:
    if baseline is None:
        return {}
    local, pooled = baseline["local_only"], baseline["pooled"]
    misses = {
        site: {"delivered": dice, "local_only": local[site]}
        for site, dice in delivered.items()
        if dice < local[site] - LOCAL_ONLY_MARGIN
    }
    margins = {site: dice - local[site] for site, dice in delivered.items()}
    pooled_mean = mean(pooled)
    return {
        "every_site_vs_local_only": {"met": not misses, "misses": misses, "margins": margins},
        "delivered_vs_pooled": {
            "met": mean(delivered) >= DELIVERED_OF_POOLED * pooled_mean,
            "mean": mean(delivered),
            "pooled": pooled_mean,
            "ratio": mean(delivered) / pooled_mean,
        },
        "global_vs_pooled": {
            "met": mean(glob) >= GLOBAL_OF_POOLED * pooled_mean,
            "mean": mean(glob),
            "pooled": pooled_mean,
            "ratio": mean(glob) / pooled_mean,
        },
    }


def steps_note(results: dict[str, dict[str, Any]], *, train: dict[str, Any]) -> dict[str, Any] | None:
    """Gradient steps of the federation (summed over sites, from its metrics) against those of the pooled model.
    Epoch mode: equal samples, but each site's last partial batch is a step of its own, so the counts differ a
    little; step budget (train.local_steps): pooled takes rounds x local_steps x sites, the federation's total."""
    for arm, result in results.items():
        if result.get("train_steps") and result.get("train_cases"):
            if train.get("local_steps"):
                pooled = train["rounds"] * train["local_steps"] * len(result["train_cases"])
            else:
                cases = sum(result["train_cases"].values())
                epochs = train["rounds"] * train["local_epochs"]
                pooled = epochs * math.ceil(cases / min(train["batch_size"], cases))
            return {"arm": arm, "federation": sum(result["train_steps"].values()), "pooled": pooled}
    return None


# --- the markdown ----------------------------------------------------------------------------------------------


def format_markdown(report: dict[str, Any]) -> str:
    sites, arms = report["sites"], report["arms"]
    quick = " (--quick: a smoke test, not a result)" if report["quick"] else ""
    lines = [
        f"### Every site: {report['dataset']}{quick}",
        "",
        f"{report['rounds']} rounds x {report['local_epochs']} local epoch(s). Dice per site on its validation "
        "cases: global = the federated global model; delivered = the model the site is handed (the better of "
        "global and personalized on its tuning split, or by cross-validation over its training cases); local-only "
        "and pooled: baselines for rounds x local epochs epochs."
        + (
            f" Personalizing arms ({', '.join(report['personal'])}): each site's own model trains without its "
            "tuning split (evaluation.tuning_fraction of its training cases), on which the choice is made, unless "
            "that split would hold fewer than evaluation.cross_validate_below cases: then folds over all of them "
            "choose, and the fine-tune is refitted on all; the federation and the baselines train on all of them."
            if report["personal"]
            else ""
        ),
        "",
        "| " + " | ".join(["arm", "model", *sites, "mean", "worst", "wall s"]) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in [*sites, "mean", "worst", "wall s"]) + " |",
    ]
    fallback = False
    for arm, row in arms.items():
        if "error" in row:
            message = row["error"].replace("|", "/")
            message = message if len(message) <= ERROR_CELL else message[: ERROR_CELL - 3] + "..."
            lines.append(
                "| " + " | ".join([arm, f"error: {message}", *("" for _ in sites), "", "", f"{row['seconds']}"]) + " |"
            )
            continue
        wall = f"{row['seconds']}" + (" (+ baselines)" if row["trained_baselines"] else "")
        lines.append(_row(arm, "global", row["global"], sites=sites, wall=wall))
        missing = set(sites) - set(row["delivered_reported"])
        fallback |= bool(missing)
        lines.append(_row("", "delivered" + ("*" if missing else ""), row["delivered"], sites=sites, wall=""))
    several = len(report["baselines"]) > 1
    for label, baseline in report["baselines"].items():
        suffix = f" ({label})" if several else ""
        lines.append(_row(f"local-only{suffix}", "", baseline["local_only"], sites=sites, wall=""))
        lines.append(_row(f"pooled{suffix}", "", baseline["pooled"], sites=sites, wall=""))
    if fallback:
        lines += [
            "",
            "\\* the run reports no delivered choice (no personal model trained): the site is handed the global model "
            "(under FedBN with its own normalization layers), whose Dice is shown.",
        ]
    lines += ["", *_targets_table(arms), ""]
    lines += _schedule_note(report)
    return "\n".join(lines)


def _targets_table(arms: dict[str, Any]) -> list[str]:
    """Per arm, whether it met each of the three targets (markdown table rows, with the header)."""
    lines = [
        f"| arm | every site: delivered ≥ local-only − {LOCAL_ONLY_MARGIN} | mean delivered ≥ {DELIVERED_OF_POOLED} × "
        f"pooled | mean global ≥ {GLOBAL_OF_POOLED} × pooled |",
        "| --- | --- | --- | --- |",
    ]
    for arm, row in arms.items():
        if "error" in row:
            lines.append(f"| {arm} | error | error | error |")
        elif not row["targets"]:
            lines.append(f"| {arm} | no baselines | no baselines | no baselines |")
        else:
            found = row["targets"]
            lines.append(
                f"| {arm} | {_local_cell(found['every_site_vs_local_only'])} | "
                f"{_pooled_cell(found['delivered_vs_pooled'], fraction=DELIVERED_OF_POOLED)} | "
                f"{_pooled_cell(found['global_vs_pooled'], fraction=GLOBAL_OF_POOLED)} |"
            )
    return lines


def _schedule_note(report: dict[str, Any]) -> list[str]:
    """How the pooled baseline's training compares with the federation's, and the dataset's wall time."""
    steps = report["steps"]
    counted = (
        f" (here: the federation took {steps['federation']} steps summed over the sites in {steps['arm']}, "
        f"pooled training about {steps['pooled']})"
        if steps
        else ""
    )
    if report["local_steps"]:
        schedule = (
            "Step budget: pooled trains rounds x local_steps x sites steps on the union of the sites' training "
            "cases, the federation's total"
        )
    else:
        schedule = (
            f"Pooled trains rounds x local epochs = {report['rounds'] * report['local_epochs']} epoch(s) on the union "
            'of the sites\' training cases: the same samples as the federation. "Same gradient steps" holds only '
            "approximately in epoch mode: each site's last partial batch is a step of its own"
        )
    return [
        schedule + counted + ".",
        f"Wall time for the dataset: {report['seconds'] / 60:.1f} min (data preparation, every arm, the baselines).",
    ]


def format_across_seeds(reports: list[dict[str, Any]]) -> str:
    """Per arm, over the seeds: the mean of each table's mean, and in how many seeds each target was met (the
    per-site target with its worst margin over sites and seeds)."""
    seeds = [report["seed"] for report in reports]
    lines = [
        f"### Every site: {reports[0]['dataset']}, seeds {', '.join(map(str, seeds))}",
        "",
        f"| arm | mean global | mean delivered | every site ≥ local-only − {LOCAL_ONLY_MARGIN} (worst margin) | "
        f"delivered ≥ {DELIVERED_OF_POOLED} × pooled | global ≥ {GLOBAL_OF_POOLED} × pooled |",
        "| --- | ---: | ---: | --- | --- | --- |",
    ]
    for arm in reports[0]["arms"]:
        rows = [report["arms"].get(arm, {}) for report in reports]
        found = [row["targets"] for row in rows if row.get("targets")]
        if len(found) < len(rows):
            lines.append(f"| {arm} | error or no baselines in {len(rows) - len(found)} seed(s) | | | | |")
            continue
        worst = min(min(targets["every_site_vs_local_only"]["margins"].values()) for targets in found)

        def met(key: str, found: list[dict[str, Any]] = found) -> str:
            return f"{sum(targets[key]['met'] for targets in found)} of {len(found)}"

        lines.append(
            f"| {arm} | {statistics.mean(mean(row['global']) for row in rows):.3f} | "
            f"{statistics.mean(mean(row['delivered']) for row in rows):.3f} | "
            f"{met('every_site_vs_local_only')} ({worst:+.3f}) | {met('delivered_vs_pooled')} | "
            f"{met('global_vs_pooled')} |"
        )
    baselines = [baseline for report in reports for baseline in report["baselines"].values()]
    pooled = statistics.mean(mean(baseline["pooled"]) for baseline in baselines)
    lines += ["", f"Mean pooled Dice over the seeds: {pooled:.3f}.", "", *_site_margins(reports)]
    return "\n".join(lines)


def _site_margins(reports: list[dict[str, Any]]) -> list[str]:
    """Per arm and site: delivered − local-only in each seed, and in how many seeds it is ≥ −LOCAL_ONLY_MARGIN."""
    sites = reports[0]["sites"]
    lines = [
        f"Delivered − local-only per site, seeds {', '.join(str(report['seed']) for report in reports)} "
        f"(seeds within −{LOCAL_ONLY_MARGIN}):",
        "",
        "| arm | " + " | ".join(sites) + " |",
        "| --- | " + " | ".join("---:" for _ in sites) + " |",
    ]
    for arm in reports[0]["arms"]:
        found = [report["arms"].get(arm, {}).get("targets") for report in reports]
        if not all(found):
            continue
        cells = []
        for site in sites:
            margins = [targets["every_site_vs_local_only"]["margins"][site] for targets in found]
            met = sum(margin >= -LOCAL_ONLY_MARGIN for margin in margins)
            cells.append(" / ".join(f"{margin:+.3f}" for margin in margins) + f" ({met} of {len(margins)})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _row(arm: str, model: str, dice: dict[str, float], *, sites: list[str], wall: str) -> str:
    values = [dice[site] for site in sites]
    cells = " | ".join(f"{value:.3f}" for value in values)
    return f"| {arm} | {model} | {cells} | {sum(values) / len(values):.3f} | {min(values):.3f} | {wall} |"


def _local_cell(found: dict[str, Any]) -> str:
    if found["met"]:
        site, margin = min(found["margins"].items(), key=lambda item: item[1])
        return f"met (closest: {site} {margin:+.3f})"
    misses = ", ".join(
        f"{site} {miss['delivered']:.3f} vs {miss['local_only']:.3f}" for site, miss in found["misses"].items()
    )
    return f"**MISSED** at {misses}"


def _pooled_cell(found: dict[str, Any], *, fraction: float) -> str:
    verdict = "met" if found["met"] else "**MISSED**"
    return f"{verdict}: {found['mean']:.3f} = {found['ratio']:.3f} × {found['pooled']:.3f} (≥ {fraction})"


if __name__ == "__main__":
    main()
