"""Can a clinician trust a prediction? Uncertainty against Dice, the out-of-distribution flag, and what TTA costs.

A hippocampus federation is trained with the real-scans recipe (experiments/bench_real_scans.py: MSD Task04
dealt onto 3 simulated scanners) on the first cases; the last `--held-back` cases never reach any site. Then:

1. `fedmed predict --uncertainty tta` on the held-back cases: Spearman's rank correlation between each case's
   uncertainty score and its Dice (mean of anterior and posterior) against its label. Target ≤ -0.5.
2. The out-of-distribution score of those held-back cases (in distribution) against crops of the spleen CT,
   crops of BraTS FLAIR brains and the held-back cases with Gaussian noise, from ../shared/data. AUROC per
   kind and over all; the share of in-distribution cases the model card's threshold flags. Target AUROC ≥ 0.95
   with ≤ 5 % flagged.
3. Wall time of TTA prediction over plain prediction, same cases, same process, the two alternated `--repeats`
   times (median of each), so load from elsewhere on the machine falls on both alike: target ≤ 1 + passes × 1.1.

    python experiments/bench_trust.py                   # 120 training cases, 8 rounds (about 15 min on 2 cores)
    python experiments/bench_trust.py --quick           # tiny: checks the script
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from bench_real_scans import HIPPOCAMPUS, hippocampus_config, scanners  # a sibling script: run from here

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEARMAN_TARGET = -0.5
AUROC_TARGET = 0.95
FLAGGED_TARGET = 0.05
NOISE_FRACTION = 0.5  # Gaussian noise std as a fraction of the image's own intensity std
CROP_MM = (40, 56, 40)  # about a hippocampus crop's extent


def train(data: Path, work: Path, *, cases: int, rounds: int, quick: bool) -> tuple[Path, list[Any]]:
    from fedmed.api import cases_from_folder_pairs, simulate, split_into_sites

    root = data / "msd-hippocampus"
    every = cases_from_folder_pairs(root / "imagesTr", root / "labelsTr")
    training, held_back = every[:cases], every[cases:]
    sites = split_into_sites(
        training,
        drifts=scanners(),
        out_dir=work / "sites",
        image_size=None,
        binarize_labels=False,
        val_fraction=0.2,
        seed=0,
        label_names={0: "background", 1: "anterior", 2: "posterior"},
        overwrite=True,
    )
    setting = dict(HIPPOCAMPUS["quick" if quick else "full"], rounds=rounds, cases=cases)
    config = hippocampus_config(sites, setting=setting, output_dir=work / "runs")
    config.baselines.local_only = config.baselines.pooled = False
    return simulate(config).run_dir, held_back


def dice(prediction: Path, label: Path) -> float:
    predicted, truth = (np.asarray(nib.load(str(path)).dataobj).round().astype(int) for path in (prediction, label))
    scores = []
    for value in (1, 2):
        a, b = predicted == value, truth == value
        scores.append(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))
    return float(np.mean(scores))


def spearman(x: list[float], y: list[float]) -> float:
    rank_x, rank_y = (np.argsort(np.argsort(values)).astype(float) for values in (x, y))
    return float(np.corrcoef(rank_x, rank_y)[0, 1])


def auroc(inside: list[float], outside: list[float]) -> float:
    """P(an out-of-distribution case scores above an in-distribution one), ties counting half."""
    a, b = np.asarray(inside)[:, None], np.asarray(outside)[None, :]
    return float(((b > a).sum() + 0.5 * (b == a).sum()) / (a.size * b.size))


def crops(source: Path, out_dir: Path, *, count: int, seed: int, prefix: str) -> list[Path]:
    """`count` crops of about CROP_MM from random places inside the volume's non-zero region, with their affine."""
    image = nib.load(str(source))
    array = np.asarray(image.dataobj, dtype=np.float32)
    spacing = np.abs(np.diag(image.affine)[:3])
    size = [max(8, min(round(float(mm / s)), n)) for mm, s, n in zip(CROP_MM, spacing, array.shape, strict=True)]
    inside = np.argwhere(array > np.percentile(array, 50))
    rng = np.random.default_rng(seed)
    written = []
    for number in range(count):
        centre = inside[rng.integers(len(inside))]
        start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, array.shape, strict=True)]
        block = array[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))]
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.asarray(start) + image.affine[:3, 3]
        path = out_dir / f"{prefix}_{number}.nii.gz"
        nib.save(nib.Nifti1Image(block, affine), str(path))
        written.append(path)
    return written


def noisy(sources: list[Path], out_dir: Path, *, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    written = []
    for source in sources:
        image = nib.load(str(source))
        array = np.asarray(image.dataobj, dtype=np.float32)
        array = array + rng.normal(0.0, NOISE_FRACTION * array.std(), array.shape).astype(np.float32)
        path = out_dir / f"noisy_{source.name}"
        nib.save(nib.Nifti1Image(array, image.affine), str(path))
        written.append(path)
    return written


def predict(run_dir: Path, images: list[Path], out: Path, *, uncertainty: str) -> tuple[Any, float]:
    from fedmed.api import predict as apply

    started = time.perf_counter()
    result = apply(run_dir, images, out=out, uncertainty=uncertainty, report=False)
    return result, time.perf_counter() - started


def tta_cost(run_dir: Path, images: list[Path], work: Path, *, repeats: int) -> tuple[float, float]:
    """Median seconds of plain and of TTA prediction of `images`, measured alternately."""
    plain, tta = [], []
    for repeat in range(repeats):
        plain.append(predict(run_dir, images, work / f"cost-plain-{repeat}", uncertainty="none")[1])
        tta.append(predict(run_dir, images, work / f"cost-tta-{repeat}", uncertainty="tta")[1])
    return float(np.median(plain)), float(np.median(tta))


def out_of_distribution_sets(data: Path, work: Path, *, held_back: list[Path], quick: bool) -> dict[str, list[Path]]:
    folder = work / "ood"
    folder.mkdir(parents=True, exist_ok=True)
    count = 3 if quick else 10
    brats = sorted((data / "brats2018-10").glob("case_*/FLAIR.nii.gz"))[:count]
    return {
        "spleen CT": crops(
            data / "msd-spleen-ct-1" / "imagesTr" / "spleen_8.nii.gz", folder, count=count, seed=0, prefix="ct"
        ),
        "BraTS FLAIR": [crops(path, folder, count=1, seed=i, prefix=f"flair{i}")[0] for i, path in enumerate(brats)],
        "noisy hippocampus": noisy(held_back[:count], folder, seed=0),
    }


def run(data: Path, work: Path, *, cases: int, rounds: int, held_back_count: int, quick: bool, repeats: int) -> str:
    run_dir, held_back_cases = train(data, work, cases=cases, rounds=rounds, quick=quick)
    held_back = held_back_cases[:held_back_count]
    images = [case.image for case in held_back]
    plain, _ = predict(run_dir, images, work / "plain", uncertainty="none")
    tta, _ = predict(run_dir, images, work / "tta", uncertainty="tta")
    plain_s, tta_s = tta_cost(run_dir, images, work, repeats=repeats)
    labels = {case.image.name.removesuffix(".nii.gz"): case.label for case in held_back}
    scores = [
        (outcome.uncertainty, dice(Path(outcome.output), labels[outcome.case])) for outcome in tta.cases if outcome.ok
    ]
    rho = spearman([u for u, _ in scores], [d for _, d in scores])
    inside = [outcome.ood_score for outcome in plain.cases]
    flagged = sum(bool(outcome.ood_flagged) for outcome in plain.cases) / len(plain.cases)
    outside: dict[str, list[float]] = {}
    for kind, paths in out_of_distribution_sets(data, work, held_back=images, quick=quick).items():
        result, _ = predict(run_dir, paths, work / kind.replace(" ", "-"), uncertainty="none")
        outside[kind] = [outcome.ood_score for outcome in result.cases if outcome.ok]
    every_outside = [score for values in outside.values() for score in values]
    passes = 5  # the hippocampus recipe trains without flips: 3 shifts and 2 gains (fedmed.tasks.uncertainty)
    ratio = tta_s / plain_s
    if any(score is None for score in inside + every_outside):
        raise SystemExit(f"{run_dir}: no out-of-distribution scores: the run left no model card")
    lines = [
        f"### Trust: hippocampus, {cases} training cases on 3 simulated scanners, {rounds} rounds, "
        f"{len(images)} held-back cases",
        "",
        f"Mean Dice of the held-back cases (TTA): {np.mean([d for _, d in scores]):.3f}",
        "",
        "| figure | value | target | met |",
        "| --- | ---: | ---: | :---: |",
        f"| Spearman(per-case uncertainty, Dice), TTA | {rho:.3f} | ≤ {SPEARMAN_TARGET} | "
        f"{_yes(rho <= SPEARMAN_TARGET)} |",
    ]
    for kind, values in outside.items():
        value = auroc(inside, values)
        lines.append(
            f"| OOD AUROC, held-back vs {kind} ({len(values)}) | {value:.3f} | ≥ {AUROC_TARGET} | "
            f"{_yes(value >= AUROC_TARGET)} |"
        )
    overall = auroc(inside, every_outside)
    lines += [
        f"| OOD AUROC, all | {overall:.3f} | ≥ {AUROC_TARGET} | {_yes(overall >= AUROC_TARGET)} |",
        f"| in-distribution cases flagged | {flagged:.1%} | ≤ {FLAGGED_TARGET:.0%} | "
        f"{_yes(flagged <= FLAGGED_TARGET)} |",
        f"| TTA time / plain ({passes} augmented passes) | {ratio:.2f} | ≤ {1 + passes * 1.1:.1f} | "
        f"{_yes(ratio <= 1 + passes * 1.1)} |",
        "",
        f"Plain prediction {plain_s:.1f} s, TTA {tta_s:.1f} s for {len(images)} cases (medians of {repeats}); "
        f"run directory {run_dir}",
    ]
    return "\n".join(lines)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script")
    parser.add_argument("--cases", type=int, help="training cases dealt onto the sites (default 120; quick 24)")
    parser.add_argument("--rounds", type=int, help="federated rounds (default 8; quick 2)")
    parser.add_argument("--held-back", type=int, default=40, help="held-back cases predicted (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="plain and TTA timings, alternated (default 3)")
    parser.add_argument("--data", type=Path, help="real data folder (default: ../shared/data or $FEDMED_SHARED_DATA)")
    parser.add_argument("--work-dir", type=Path, help="where sites, runs and predictions go (default: temporary)")
    args = parser.parse_args()
    data = args.data or Path(os.environ.get("FEDMED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not data.is_dir():
        print(f"real data not found at {data}: nothing to benchmark (set --data or FEDMED_SHARED_DATA)")
        return
    from fedmed.api import set_flower_verbosity

    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    cases = args.cases or (24 if args.quick else 120)
    rounds = args.rounds or (2 if args.quick else 8)
    held_back = min(args.held_back, 8) if args.quick else args.held_back
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-trust-") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        table = run(
            data, work, cases=cases, rounds=rounds, held_back_count=held_back, quick=args.quick, repeats=args.repeats
        )
        print(table, flush=True)


if __name__ == "__main__":
    main()
