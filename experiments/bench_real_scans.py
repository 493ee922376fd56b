"""Real scans, scan geometry: federated (FedAvg) against local-only and pooled training, Dice in original space.

Data come from ../shared/data (or $FEDMED_SHARED_DATA; see its README for sources and licences); the
benchmark prints a message and exits when they are absent.

1. Hippocampus (MSD Task04, 200 T1 crops from one centre at 1 mm): the cases are dealt onto 3 sites
   with simulated scanners (`split_into_sites`, fixed seed: gain/offset/gamma/noise, bias field and blur),
   kept at native size, trained on patches that cover most of a crop, validated on whole crops.
   Reported: mean Dice of the two classes (anterior, posterior) per site on the site's own validation
   cases, the federated/pooled ratio and whether each target is met:
   federated mean Dice >= 0.85, >= 0.98 x pooled, and every site's federated Dice >= its local-only one.
2. BraTS 2018 (10 cases, FLAIR + T1 at 1 mm, 240 x 240 x 155): sites by where the cases were acquired
   (CBICA: 7 cases; TCIA: the 3 cases of TCIA02/04/08), resampled to a coarser spacing and cropped to the
   brain, sliding-window validation on the whole volume; whole-tumour Dice per site.

Every model is scored on the source files' grid: predictions are inverted (resampling, reorientation,
crop) before Dice. Wall time is the whole simulation: federation plus both baselines.

    python experiments/bench_real_scans.py --quick          # tiny settings, a few minutes
    python experiments/bench_real_scans.py                  # both benchmarks, full settings
    python experiments/bench_real_scans.py --only hippocampus --rounds 40 --learning-rate 0.002
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DICE_TARGET = 0.85
POOLED_RATIO_TARGET = 0.98

# Hippocampus crops are at most 43 x 59 x 47 voxels; patches of [32, 48, 32] cover most of a crop. Validation
# slides a window of the training patch's size (inference.roi_size unset): one larger window holding the whole
# crop is 4x fewer forward passes, but its zero padding shifts the instance-norm statistics away from those of
# training, and the same final model scored 0.820 mean Dice with a [48, 64, 48] window against 0.861 with [32, 48, 32].
HIPPOCAMPUS = {
    "full": {
        "cases": 200,
        "rounds": 15,
        "local_epochs": 1,
        "batch_size": 2,
        "learning_rate": 0.002,
        "channels": [16, 32, 64, 128],
        "num_res_units": 0,
        "patch": [32, 48, 32],
    },
    "quick": {
        "cases": 24,
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 2,
        "learning_rate": 0.003,
        "channels": [8, 16, 32],
        "num_res_units": 0,
        "patch": [32, 32, 32],
    },
}
BRATS = {
    "full": {"spacing": [2.0, 2.0, 2.0], "rounds": 10, "patch": [48, 48, 48], "samples_per_volume": 4},
    "quick": {"spacing": [4.0, 4.0, 4.0], "rounds": 1, "patch": [32, 32, 32], "samples_per_volume": 1},
}


def scanners() -> list[Any]:
    # fedmed is imported where it is used in this script: without the data, it prints a message and exits at once.
    from fedmed.api import SiteDrift

    return [
        SiteDrift(name="hippo-a"),
        SiteDrift(name="hippo-b", intensity_scale=1.8, intensity_offset=100.0, gamma=0.8, noise_std=0.02),
        SiteDrift(name="hippo-c", bias_field=0.25, blur_sigma=0.8),
    ]


def hippocampus_config(sites: list[Any], *, setting: dict[str, Any], output_dir: Path) -> Any:
    from fedmed.api import load_config

    raw = {
        "name": "hippocampus",
        "seed": 0,
        "output_dir": str(output_dir),
        "task": {
            "kind": "segmentation",
            "spatial_dims": 3,
            "num_classes": 3,
            "spacing": [1.0, 1.0, 1.0],
            "regions": {"hippocampus": [1, 2]},
        },
        "model": {"channels": setting["channels"], "num_res_units": setting["num_res_units"]},
        "train": {
            "rounds": setting["rounds"],
            "local_epochs": setting["local_epochs"],
            "batch_size": setting["batch_size"],
            "learning_rate": setting["learning_rate"],
            "patch_size": setting["patch"],
            # Scored once, at the end: per-round evaluation of 40 cases would cost more than a round.
            "eval_every": setting["rounds"],
            # No flips: anterior and posterior are told apart by where they lie along the A-P axis, and a
            # flip swaps that (with flips, pooled Dice was 0.50 after 6 epochs; without, 0.81).
            "augmentation": {"flips": False},
        },
        "evaluation": {"cross_site": False},
        "baselines": {"local_only": True, "pooled": True},
        "sites": [{"name": site.name, "path": str(site.path)} for site in sites],
    }
    return load_config(raw, base=output_dir)


def run_hippocampus(data: Path, work: Path, *, setting: dict[str, Any]) -> str:
    from fedmed.api import cases_from_folder_pairs, simulate, split_into_sites

    root = data / "msd-hippocampus"
    cases = cases_from_folder_pairs(root / "imagesTr", root / "labelsTr")[: setting["cases"]]
    sites = split_into_sites(
        cases,
        drifts=scanners(),
        out_dir=work / "hippocampus-sites",
        image_size=None,
        binarize_labels=False,
        val_fraction=0.2,
        seed=0,
        label_names={0: "background", 1: "anterior", 2: "posterior"},
        overwrite=True,  # a reused --work-dir deals the cases again
    )
    config = hippocampus_config(sites, setting=setting, output_dir=work / "runs")
    started = time.perf_counter()
    result = simulate(config)
    wall = time.perf_counter() - started
    federation_s = sum(row.get("seconds", 0.0) for row in result.rounds)
    rows: dict[str, Any] = result.summary["sites"]
    lines = [
        f"### Hippocampus: {len(cases)} cases, 3 simulated scanners, native 1 mm, patch {setting['patch']}",
        "",
        f"UNet {setting['channels']} (res units {setting['num_res_units']}), {setting['rounds']} rounds x "
        f"{setting['local_epochs']} local epoch(s), batch {setting['batch_size']}, Adam lr "
        f"{setting['learning_rate']}; local-only and pooled train for the same epochs. Mean Dice of anterior and "
        "posterior on each site's validation cases, original space.",
        "",
        "| site | val cases | federated | local-only | pooled | federated / pooled | federated ≥ local-only |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    federated, local, pooled = [], [], []
    for name, row in rows.items():
        fed, loc, poo = row["federated"]["dice"], row["local_only"]["dice"], row["pooled"]["dice"]
        federated.append(fed)
        local.append(loc)
        pooled.append(poo)
        lines.append(
            f"| {name} | {row['federated']['num-examples']} | {fed:.3f} | {loc:.3f} | {poo:.3f} | {fed / poo:.3f} | "
            f"{'yes' if fed >= loc else 'no'} |"
        )
    mean_fed, mean_loc, mean_pooled = (sum(values) / len(values) for values in (federated, local, pooled))
    ratio = mean_fed / mean_pooled
    lines += [
        f"| mean | | {mean_fed:.3f} | {mean_loc:.3f} | {mean_pooled:.3f} | {ratio:.3f} | |",
        "",
        "Per class (federated): "
        + ", ".join(
            f"{name} anterior {row['federated']['dice_anterior']:.3f} / posterior "
            f"{row['federated']['dice_posterior']:.3f}"
            for name, row in rows.items()
        ),
        "",
        "| target | value | met |",
        "| --- | ---: | :---: |",
        f"| federated mean Dice ≥ {DICE_TARGET} | {mean_fed:.3f} | {_yes(mean_fed >= DICE_TARGET)} |",
        f"| federated ≥ {POOLED_RATIO_TARGET} × pooled | {ratio:.3f} | {_yes(ratio >= POOLED_RATIO_TARGET)} |",
        f"| every site ≥ its local-only | {sum(f >= lo for f, lo in zip(federated, local))}/{len(rows)} sites | "
        f"{_yes(all(f >= lo for f, lo in zip(federated, local)))} |",
        "",
        f"Wall time {wall / 60:.1f} min (federation {federation_s / 60:.1f} min, the rest baselines and setup); "
        f"run directory {result.run_dir}",
    ]
    return "\n".join(lines)


def brats_sites(data: Path, work: Path, *, quick: bool) -> dict[str, Path]:
    """One site folder per acquisition source (subject_id.txt names it: Brats18_<SOURCE>_<ID>); the three
    TCIA centres have one case each, too few for a site of their own, so they form one site."""
    from fedmed.api import cases_from_subfolders, write_manifest

    root = data / "brats2018-10"
    groups: dict[str, list[Any]] = {"cbica": [], "tcia": []}
    for case in cases_from_subfolders(root, modalities=["FLAIR", "T1"], label="GT_W", glob="case_*"):
        subject = (case.image.parent / "subject_id.txt").read_text().split("Subject_id:")[-1].strip()
        groups["cbica" if subject.split("_")[1] == "CBICA" else "tcia"].append(case)
    folders = {}
    for name, cases in groups.items():
        cases = cases[:2] if quick else cases
        n_val = 2 if len(cases) >= 6 else 1
        folder = work / "brats-sites" / name
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(
            folder,
            name=name,
            labels={0: "background", 1: "whole_tumour"},
            modality={0: "FLAIR", 1: "T1"},
            training=cases[n_val:],
            validation=cases[:n_val],
            tensor_image_size="3D",
        )
        folders[name] = folder
    return folders


def run_brats(data: Path, work: Path, *, setting: dict[str, Any]) -> str:
    from fedmed.api import load_config, simulate

    folders = brats_sites(data, work, quick=setting["rounds"] == 1)
    raw = {
        "name": "brats",
        "seed": 0,
        "output_dir": str(work / "runs"),
        "task": {"kind": "segmentation", "spatial_dims": 3, "spacing": setting["spacing"], "crop_foreground": True},
        "model": {"channels": [16, 32, 64]},
        "train": {
            "rounds": setting["rounds"],
            "local_epochs": 1,
            "batch_size": 2,
            "learning_rate": 0.003,
            "patch_size": setting["patch"],
            "samples_per_volume": setting["samples_per_volume"],
            "eval_every": setting["rounds"],
        },
        "inference": {"overlap": 0.25},
        "evaluation": {"cross_site": False},
        "baselines": {"local_only": True, "pooled": True},
        "sites": [{"name": name, "path": str(path)} for name, path in folders.items()],
    }
    config = load_config(raw, base=work)
    started = time.perf_counter()
    result = simulate(config)
    wall = time.perf_counter() - started
    lines = [
        f"### BraTS 2018 by source: FLAIR + T1 (in_channels {result.config.task.in_channels} from the data), "
        f"spacing {setting['spacing']} mm, patch {setting['patch']}",
        "",
        f"{setting['rounds']} rounds x 1 local epoch, {setting['samples_per_volume']} patches per case; whole-tumour "
        "Dice on the 240 x 240 x 155 source grid (sliding window on the resampled brain, inverted).",
        "",
        "| site | train / val cases | federated | local-only | pooled |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result.summary["sites"].items():
        counts = json.loads((folders[name] / "dataset.json").read_text())
        lines.append(
            f"| {name} | {counts['numTraining']} / {counts['numValidation']} | {row['federated']['dice']:.3f} | "
            f"{row['local_only']['dice']:.3f} | {row['pooled']['dice']:.3f} |"
        )
    lines += ["", f"Wall time {wall / 60:.1f} min; run directory {result.run_dir}"]
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings (a few minutes): checks the script")
    parser.add_argument("--only", choices=["hippocampus", "brats"], help="run one of the two benchmarks")
    parser.add_argument("--data", type=Path, help="real data folder (default: ../shared/data or $FEDMED_SHARED_DATA)")
    parser.add_argument("--work-dir", type=Path, help="where sites and runs are written (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, help="hippocampus: federated rounds")
    parser.add_argument("--local-epochs", type=int, help="hippocampus: local epochs per round")
    parser.add_argument("--batch-size", type=int, help="hippocampus: patches per step")
    parser.add_argument("--learning-rate", type=float, help="hippocampus: Adam learning rate")
    parser.add_argument("--channels", type=int, nargs="+", help="hippocampus: UNet channels per level")
    parser.add_argument("--num-res-units", type=int, help="hippocampus: residual units per UNet block")
    parser.add_argument("--patch", type=int, nargs=3, help="hippocampus: training patch in voxels")
    args = parser.parse_args()

    data = args.data or Path(os.environ.get("FEDMED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not data.is_dir():
        print(f"real data not found at {data}: nothing to benchmark (set --data or FEDMED_SHARED_DATA)")
        return
    from fedmed.api import set_flower_verbosity

    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    mode = "quick" if args.quick else "full"
    hippocampus = dict(HIPPOCAMPUS[mode])
    for key in ("rounds", "local_epochs", "batch_size", "learning_rate", "channels", "num_res_units", "patch"):
        if getattr(args, key) is not None:
            hippocampus[key] = getattr(args, key)
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-real-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        print(f"# Real scans ({mode}), data from {data}\n", flush=True)
        if args.only in (None, "hippocampus"):
            print(run_hippocampus(data, work / "hippocampus", setting=hippocampus) + "\n", flush=True)
        if args.only in (None, "brats"):
            print(run_brats(data, work / "brats", setting=BRATS[mode]) + "\n", flush=True)


if __name__ == "__main__":
    main()
