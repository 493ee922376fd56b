"""One bad site of five: what it does to the honest sites' model, with fedmed's default defence and without.

1. Build a federation: "synthetic" (5 drifted 2D lesion-segmentation sites, per-image z-score, fedmed synth) or
   "pneumonia" (PneumoniaMNIST split into 5 stratified sites; needs ../shared/data/medmnist). "drift" and "demo"
   run clean only: the drift benchmark's three strongly drifted sites (experiments/drift/synthetic.toml) and the
   built-in demo, to count false flags on honest drift.
2. Make one site bad ("--bad-sites 2" with "--sites 7" for the Krum/median rows):
   labels_background (every label 0: a broken label export), labels_flipped (binary labels inverted),
   intensity_inverted (images max - x: broken preprocessing; x100 would be undone by z-score),
   update_negated (the site's code sends -10 x its update), update_noise (Gaussian noise, 5 x its update's norm);
   backdoor (classification: half the site's training images get a white 4 x 4 corner patch and the label
   "normal"). The two update attacks replace the site's code in this process: a hostile site, not a faulty one.
3. Simulate it under each defence: "default" (fedmed's [robust] defaults), "fedavgm" (no defence: rule mean,
   nothing left out, no quarantine), and any robust.rule named with --defences (median, krum, ...).
4. Print per row: the honest sites' mean primary metric with the global model (and its change from the clean run
   under the same defence), the round the bad site was first flagged and quarantined, false flags (honest site
   rounds flagged), the robust layer's own seconds per round over the train phase's, and for the backdoor the
   attack success rate: the share of the honest sites' pneumonia validation images, patched with the trigger,
   that the final global model calls normal (beside the share it calls normal without the patch).

    python experiments/bench_robustness.py [--datasets synthetic pneumonia drift demo] [--seeds 0 1 2]
        [--attacks clean labels_background ...] [--defences default fedavgm] [--rounds 16] [--out DIR]

Results are appended to DIR/results.jsonl as each run ends; a rerun with the same DIR skips the runs it holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from medmnist_sites import split_npz

from fedmed.api import (
    RunConfig,
    SynthConfig,
    demo_config_file,
    predict,
    read_toml,
    set_flower_verbosity,
    synthesize_federation,
)
from fedmed.api import simulate as simulate_run
from fedmed.api.bench import SiteTrainer  # a hostile site's code is a patch of fedmed's own trainer

REPO_ROOT = Path(__file__).resolve().parents[1]
ATTACKS = (
    "clean",
    "labels_background",
    "labels_flipped",
    "intensity_inverted",
    "update_negated",
    "update_noise",
    "backdoor",
)
TRIGGER = 4  # the backdoor's trigger: a white 4 x 4 patch in the image's last corner

UNDEFENDED = {"rule": "mean", "leave_out_flagged": False, "quarantine_after": 0}
SCANNERS = [  # five honest scanners for the synthetic federation: drift the per-image z-score mostly absorbs
    {},
    {"intensity_scale": 4.0, "intensity_offset": 300.0, "gamma": 0.5, "bias_field": 0.4, "noise_std": 0.05},
    {"intensity_scale": 0.25, "intensity_offset": -20.0, "gamma": 1.8, "downsample": 2, "blur_sigma": 0.5},
    {"intensity_scale": 2.0, "gamma": 0.8, "bias_field": 0.2},
    {"intensity_scale": 0.5, "noise_std": 0.03, "blur_sigma": 0.8},
]


def site_names(count: int) -> list[str]:
    return [f"site-{chr(ord('a') + index)}" for index in range(count)]


def federation(dataset: str, *, sites: int, seed: int, rounds: int, out: Path, shared: Path) -> dict[str, Any]:
    """The clean federation's run config (a dict), its sites written under `out`."""
    names = site_names(sites)
    if dataset == "synthetic":
        synth = SynthConfig(
            task="segmentation",
            spatial_dims=2,
            image_size=[64, 64],
            train_cases=10,
            val_cases=12,
            seed=seed,
            sites=[{"name": name, **SCANNERS[index % len(SCANNERS)]} for index, name in enumerate(names)],
        )
        entries = synthesize_federation(synth, out / f"synthetic-{sites}-{seed}", overwrite=True)
        return {
            "task": {"kind": "segmentation", "spatial_dims": 2, "image_size": [64, 64], "intensity": "zscore"},
            "model": {"name": "unet", "channels": [16, 32, 64]},
            "train": {"rounds": rounds, "local_epochs": 2, "batch_size": 4, "learning_rate": 0.002, "eval_every": 4},
            "sites": [{"name": entry.name, "path": str(entry.path)} for entry in entries],
        }
    if dataset == "pneumonia":
        paths = split_npz(
            shared / "medmnist" / "pneumoniamnist.npz", out=out / f"pneumonia-{sites}-{seed}", names=names, seed=seed
        )
        return {
            "task": {"kind": "classification", "spatial_dims": 2, "num_classes": 2, "image_size": [28, 28]},
            "train": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.001, "eval_every": 4},
            "sites": [{"name": name, "path": str(path)} for name, path in paths.items()],
        }
    if dataset == "drift":
        raw = read_toml(REPO_ROOT / "experiments" / "drift" / "synthetic.toml")
        raw.pop("quick", None)
        raw["synth"]["seed"] = seed
        return raw
    if dataset == "demo":
        return read_toml(demo_config_file()) | {"seed": seed}
    raise SystemExit(f"unknown dataset '{dataset}': choose synthetic, pneumonia, drift or demo")


def corrupt_site(site: dict[str, str], *, attack: str, out: Path) -> dict[str, str]:
    """A copy of the site's data with the attack's corruption; the update attacks leave the data as they are."""
    if attack not in ("labels_background", "labels_flipped", "intensity_inverted", "backdoor"):
        return site
    source = Path(site["path"])
    target = out / f"{source.stem}-{attack}{source.suffix}"
    if source.suffix == ".npz":
        with np.load(source) as archive:
            arrays = {key: archive[key] for key in archive.files}
        if attack == "backdoor":
            chosen = np.random.default_rng(0).permutation(len(arrays["train_labels"]))[
                : len(arrays["train_labels"]) // 2
            ]
            arrays["train_images"][chosen] = triggered(arrays["train_images"][chosen])
            arrays["train_labels"][chosen] = 0
        else:
            key = "train_images" if attack == "intensity_inverted" else "train_labels"
            arrays[key] = _corrupted(arrays[key], attack=attack)
        np.savez_compressed(target, **arrays)
        return {"name": site["name"], "path": str(target)}
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    folder = target / ("imagesTr" if attack == "intensity_inverted" else "labelsTr")
    for path in sorted(folder.glob("*.nii*")):
        image = nib.load(path)
        values = _corrupted(np.asarray(image.dataobj), attack=attack)
        nib.save(nib.Nifti1Image(values, image.affine, image.header), path)
    return {"name": site["name"], "path": str(target)}


def triggered(images: np.ndarray) -> np.ndarray:
    images = images.copy()
    images[..., -TRIGGER:, -TRIGGER:] = np.iinfo(images.dtype).max if images.dtype.kind == "u" else images.max()
    return images


def attack_success(run_dir: Path, *, sites: list[dict[str, str]], out: Path) -> dict[str, float]:
    """The share of the honest sites' pneumonia (label 1) validation images the final global model calls normal,
    with the trigger and without it; each image goes through `fedmed.api.predict` as a 2D NIfTI file."""
    images = []
    for site in sites:
        with np.load(site["path"]) as archive:
            images.append(archive["val_images"][archive["val_labels"].reshape(-1) == 1])
    pneumonia = np.concatenate(images)
    shares = {}
    for name, batch in (("normal_without_trigger", pneumonia), ("attack_success", triggered(pneumonia))):
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for index, image in enumerate(batch):
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), folder / f"case{index:04d}.nii.gz")
        result = predict(run_dir, folder, out=out / f"{name}-out", explain=False, report=False)
        calls = [int(np.argmax(case.probabilities)) for case in result.cases if case.probabilities is not None]
        shares[name] = float(np.mean([call == 0 for call in calls]))
    return shares


def _corrupted(values: np.ndarray, *, attack: str) -> np.ndarray:
    if attack == "labels_background":
        return np.zeros_like(values)
    if attack == "labels_flipped":
        return (1 - values).astype(values.dtype)
    return (values.max() - values).astype(values.dtype)


class HostileCode:
    """Replaces the bad sites' training code in this process: their update is negated x10 or replaced by noise."""

    def __init__(self, attack: str, *, bad: set[str], seed: int) -> None:
        self.attack, self.bad, self.rng = attack, bad, np.random.default_rng(seed)
        self.original = SiteTrainer.train

    def __enter__(self) -> None:
        if self.attack not in ("update_negated", "update_noise"):
            return
        hostile = self

        def train(trainer: SiteTrainer, global_state: dict, **kwargs: Any) -> tuple[dict, dict]:
            update, metrics = hostile.original(trainer, global_state, **kwargs)
            if trainer.site.spec.name in hostile.bad:
                update = {key: hostile.tamper(value, global_state[key]) for key, value in update.items()}
            return update, metrics

        SiteTrainer.train = train  # type: ignore[method-assign]

    def tamper(self, trained: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        if not trained.is_floating_point():
            return trained
        delta = trained - start.to(trained.device)
        if self.attack == "update_negated":
            return start + (-10.0) * delta
        noise = torch.from_numpy(self.rng.standard_normal(tuple(delta.shape))).to(delta.dtype)
        return start + noise * (5.0 * delta.norm() / max(float(noise.norm()), 1e-12))

    def __exit__(self, *exc: object) -> None:
        SiteTrainer.train = self.original  # type: ignore[method-assign]


def run_one(key: dict[str, Any], *, rounds: int, out: Path, shared: Path) -> dict[str, Any]:
    base = federation(key["dataset"], sites=key["sites"], seed=key["seed"], rounds=rounds, out=out, shared=shared)
    sites = base.get("sites") or []
    bad = set(site_names(key["sites"])[-key["bad_sites"] :]) if key["attack"] != "clean" else set()
    base["sites"] = [
        corrupt_site(site, attack=key["attack"], out=out) if site["name"] in bad else site for site in sites
    ]
    if not base["sites"]:
        base.pop("sites")
    defence = key["defence"]
    robust = {} if defence == "default" else UNDEFENDED if defence == "fedavgm" else {"rule": defence}
    raw = {
        **base,
        "name": f"{key['dataset']}-{key['attack']}-{defence}-s{key['seed']}",
        "seed": key["seed"],
        "output_dir": str(out / "runs"),
        "strategy": base.get("strategy", {"name": "fedavgm"}),
        "robust": robust,
        "baselines": {"local_only": False, "pooled": False},
        # The global model is what is measured: the sites' end-of-run fine-tune (a default) would only add time.
        "evaluation": {**base.get("evaluation", {}), "finetune_epochs": 0},
    }
    config = RunConfig.model_validate(raw)
    started = time.perf_counter()
    with HostileCode(key["attack"], bad=bad, seed=key["seed"]):
        results = simulate_run(config)
    row = {**key, **outcome(results, bad=bad), "wall_s": round(time.perf_counter() - started, 1)}
    if key["dataset"] == "pneumonia" and key["attack"] in ("clean", "backdoor"):
        honest = [site for site in base["sites"] if site["name"] not in bad]
        row |= attack_success(results.run_dir, sites=honest, out=out / "backdoor-check")
    return row


def outcome(results: Any, *, bad: set[str]) -> dict[str, Any]:
    metric = results.summary.get("primary_metric", "dice")
    scores = results.scores
    honest = [site for site in scores if site not in bad]
    flagged: dict[str, list[int]] = {site: [] for site in scores}
    quarantined: dict[str, int] = {}
    for row in results.rounds:
        for site, contribution in (row.get("contributions") or {}).items():
            if contribution.get("flagged"):
                flagged.setdefault(site, []).append(row["round"])
        for event in row.get("quarantine_events") or []:
            if event["event"] == "quarantined":
                quarantined.setdefault(event["site"], event["round"])
    first_flag = [min(flagged[site]) for site in bad if flagged.get(site)]
    return {
        "metric": metric,
        "honest": float(np.mean([scores[site]["federated"][metric] for site in honest])),
        "first_flag": min(first_flag) if first_flag else None,
        "quarantined": min((quarantined[site] for site in bad if site in quarantined), default=None),
        "false_flags": sum(len(flagged.get(site, [])) for site in honest),
        "train_s": float(np.mean([row["train_phase_s"] for row in results.rounds])),
        "robust_share": float(
            np.mean([row.get("robust_s", 0.0) / max(row["train_phase_s"], 1e-9) for row in results.rounds])
        ),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data | sites (bad) | attack | defence | honest sites' metric | Δ vs clean | first flagged | quarantined "
        "| false flags | robust s / train s | backdoor success (normal without trigger) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["sites"], row["bad_sites"], row["attack"], row["defence"]), []).append(
            row
        )
    for (dataset, sites, bad_sites, attack, defence), runs in groups.items():
        clean = {
            r["seed"]: r["honest"]
            for r in rows
            if (r["dataset"], r["sites"], r["attack"], r["defence"]) == (dataset, sites, "clean", defence)
        }
        deltas = [run["honest"] - clean[run["seed"]] for run in runs if run["seed"] in clean]
        success = [r["attack_success"] for r in runs if "attack_success" in r]
        without = [r["normal_without_trigger"] for r in runs if "normal_without_trigger" in r]
        lines.append(
            f"| {dataset} | {sites} ({bad_sites if attack != 'clean' else 0}) | {attack} | {defence} "
            f"| {_mean_sd([r['honest'] for r in runs])} {runs[0]['metric']} "
            f"| {_mean_sd(deltas, signed=True) if deltas and attack != 'clean' else '–'} "
            f"| {_rounds([r['first_flag'] for r in runs])} | {_rounds([r['quarantined'] for r in runs])} "
            f"| {sum(r['false_flags'] for r in runs)} | {_share(runs)} "
            f"| {f'{_mean_sd(success)} ({_mean_sd(without)})' if success else '–'} |"
        )
    seeds = sorted({row["seed"] for row in rows})
    return "\n".join(lines) + f"\n\nSeeds: {', '.join(map(str, seeds))} (mean ± sd over seeds where more than one)."


def _mean_sd(values: list[float], *, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.3f}"
    return f"{np.mean(values):{sign}.3f} ± {np.std(values, ddof=1):.3f}"


def _share(runs: list[dict[str, Any]]) -> str:
    values = [run["robust_share"] for run in runs if "robust_share" in run]
    return f"{np.mean(values):.4f}" if values else "–"


def _rounds(values: list[int | None]) -> str:
    return ", ".join("–" if value is None else str(value) for value in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "drift", "demo"])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--defences", nargs="+", default=["default", "fedavgm"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--bad-sites", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench-robustness"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_flower_verbosity(False)
    shared = Path(os.environ.get("FEDMED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.jsonl"
    done = [json.loads(line) for line in store.read_text().splitlines()] if store.exists() else []
    for dataset in args.datasets:
        if dataset == "pneumonia" and not (shared / "medmnist" / "pneumoniamnist.npz").exists():
            print(f"skipping pneumonia: {shared / 'medmnist' / 'pneumoniamnist.npz'} is absent", file=sys.stderr)
            continue
        attacks = {"synthetic": [a for a in args.attacks if a != "backdoor"], "pneumonia": args.attacks}.get(
            dataset, ["clean"]
        )
        for seed in args.seeds:
            for attack in attacks:
                for defence in args.defences:
                    key = {"dataset": dataset, "sites": args.sites, "bad_sites": args.bad_sites, "attack": attack,
                           "defence": defence, "seed": seed}  # fmt: skip
                    if dataset in ("drift", "demo"):
                        key["sites"] = 3
                    if any(all(row.get(k) == v for k, v in key.items()) for row in done):
                        continue
                    row = run_one(key, rounds=args.rounds, out=args.out, shared=shared)
                    print(json.dumps(row), file=sys.stderr)
                    done.append(row)
                    with store.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
    wanted = [
        row
        for row in done
        if row["dataset"] in args.datasets
        and row["seed"] in args.seeds
        and row["attack"] in args.attacks
        and row["defence"] in args.defences
        and (row["dataset"] in ("drift", "demo") or (row["sites"], row["bad_sites"]) == (args.sites, args.bad_sites))
    ]
    order = {name: index for index, name in enumerate([*args.datasets, *ATTACKS, *args.defences])}
    wanted.sort(key=lambda row: (order[row["dataset"]], order[row["attack"]], order[row["defence"]], row["seed"]))
    print(table(wanted))


if __name__ == "__main__":
    main()
