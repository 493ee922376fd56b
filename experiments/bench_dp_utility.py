"""Utility under DP: each data set's federation without DP against the same federation with DP.

Data sets (`--data`, several at once or `all`; default `demo`):

- `demo`: the demo segmentation federation (2D, 3 hospitals, 6/6/3 training cases, 40 rounds x 4 local
  epochs, seed 0, as `fedmed demo`); DP-SGD at ε = 8, 3, 1. Dice of the global model.
- `synthetic64`: the same federation with 64 training cases per hospital, 10 rounds x 2 local epochs.
- `pneumoniamnist`: PneumoniaMNIST (2428 chest X-rays for training, 28x28) split into 3 sites stratified by
  class, each site scored on its third of the validation + test images; fedmed's default classification
  network (small DenseNet, group norm), 10 rounds x 1 epoch, batch 16, Adam 1e-3 (as
  bench_pretrained_init.py's random start); DP-SGD at ε = 8, 3, 1. AUC of the global model.
- `hippocampus`: MSD Task04 (200 T1 crops, labels anterior/posterior) split by index into 3 sites (each
  validates on its last 20 %), grid geometry: every crop resized to 32^3 (crops are about 35 x 50 x 35 at
  1 mm), 3D UNet [16, 32, 64], 20 rounds x 1 epoch, no flips; DP-SGD at ε = 8. Mean Dice of the two
  classes on the 32^3 grid.
- `clientdp50`: PneumoniaMNIST split into 50 sites (about 48 training images each), every site in every
  round, 20 rounds x 1 epoch; client-level DP (fixed clipping at 0.4; the sites clip their update, the server
  adds noise) at the smallest noise multiplier whose participant-level ε is at most 8. AUC of the global model.

`--dp KEY=VALUE` sets any [dp_sgd] field on the DP-SGD arms (values parsed as JSON where they parse, then
validated by the config model, so new fields need no change here); `--client-dp KEY=VALUE` likewise [client_dp].
`--dp-train KEY=VALUE` sets a [train] field on the DP-SGD arms only (e.g. optimizer=sgd); `--strategy KEY=VALUE` a
[strategy] field on every arm (e.g. name=fedavg: plain averaging instead of the default FedAvgM).
`--pretrain` starts every arm, the non-private one too, from `[pretrain]` (synthetic phantoms of the task).
`--public` (pneumoniamnist, hippocampus) holds out a public part no site holds: a third of PneumoniaMNIST, 80 of
the 200 hippocampus cases (the other 120 make the 3 sites). Every arm but "from scratch" starts from
`[pretrain] public` (`--public-epochs` epochs on it, no privacy); the arms are the public model alone (one round
at server learning rate 1e-12, so the global model stays the public one), non-private fine-tuning of every parameter,
DP-SGD from scratch at the first ε, and DP-SGD fine-tuning with `[dp_sgd] trainable` left at "auto" (adapters
from a pretrained start) at every ε; `--compare-trainable all head` adds those choices at the first ε.

Each DP-SGD site calibrates one noise multiplier for the whole run from its own ledger; ε, σ and δ in the
tables come from the run's summary (the sites' ledgers; client-level DP: the server's accountant). A site
refuses a run whose σ would pass its ceiling (privacy.max_noise_multiplier, 10): such an arm is shown as
refused. δ = min(1e-5, 1/n) with n the largest site's training set (all are far below 1e5, so 1e-5).
Every run evaluates the global model once, after the last round; no baselines, no cross-site evaluation.
Real data come from ../shared/data (or $FEDMED_SHARED_DATA); a data set whose files are missing is skipped.

    python experiments/bench_dp_utility.py [--data demo synthetic64 ...|all] [--epsilons 8 3 1] [--seeds 0 1]
    python experiments/bench_dp_utility.py --data all --quick          # every data set, tiny: checks the script
    python experiments/bench_dp_utility.py --data pneumoniamnist --dp max_grad_norm=0.5
    python experiments/bench_dp_utility.py --train-cases 64 --rounds 10 --local-epochs 2   # = --data synthetic64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from medmnist_sites import split_npz
from public_parts import npz_with_public_third

from fedmed.api import (
    ClientDpConfig,
    DpSgdConfig,
    FedmedError,
    RunConfig,
    SiteEntry,
    TaskConfig,
    TrainConfig,
    cases_from_folder_pairs,
    demo_config_file,
    load_config,
    set_flower_verbosity,
    simulate,
    write_manifest,
)
from fedmed.api.bench import calibrate_noise_multiplier

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("demo", "synthetic64", "pneumoniamnist", "hippocampus", "clientdp50")
MNIST_TASK = {"kind": "classification", "spatial_dims": 2, "num_classes": 2, "image_size": [28, 28], "in_channels": 1}
HIPPOCAMPUS_LABELS = {0: "background", 1: "anterior", 2: "posterior"}
MAX_PER_SITE_COLUMNS = 6  # more sites than this: best / median instead of one column per site


@dataclass
class Arm:
    label: str
    epsilon: float | None = None  # DP-SGD: the ε each site may spend
    client_noise: float | None = None  # client-level DP: the server's noise multiplier
    from_public: bool = True  # --public: start from [pretrain] public
    public_only: bool = False  # --public: the public model alone, not trained further
    trainable: str | None = None  # [dp_sgd] trainable; None: the default ("auto")


@dataclass
class Bench:
    name: str
    title: str
    config: RunConfig  # the non-private run
    metric: str
    arms: list[Arm]
    delta_n: int  # δ = min(1e-5, 1/n): DP-SGD, the largest site's training set; client-level DP, the sites
    notes: list[str] = field(default_factory=list)
    public: Path | None = None  # --public: the part no site holds, for [pretrain] public

    @property
    def delta(self) -> float:
        return min(1e-5, 1 / self.delta_n)


@dataclass
class Outcome:
    seconds: float
    metric: dict[str, float] = field(default_factory=dict)  # per site
    epsilon: dict[str, float] = field(default_factory=dict)  # per site (DP-SGD) or "all" (client-level)
    sigma: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # DP-SGD steps each site planned (summary["dp_plan"])
    delta: float | None = None
    cpu_seconds: float = 0.0
    refused: str | None = None


Builder = Callable[[argparse.Namespace, Path], Bench | str]  # a str: why the data set is skipped


# --- data sets -----------------------------------------------------------------------------------------------


def demo_bench(args: argparse.Namespace, scratch: Path) -> Bench:
    return synthetic_bench(args, scratch, name="demo", train_cases=args.train_cases, rounds=40, local_epochs=4)


def synthetic64_bench(args: argparse.Namespace, scratch: Path) -> Bench:
    train_cases = args.train_cases or (16 if args.quick else 64)
    return synthetic_bench(args, scratch, name="synthetic64", train_cases=train_cases, rounds=10, local_epochs=2)


def synthetic_bench(
    args: argparse.Namespace, scratch: Path, *, name: str, train_cases: int | None, rounds: int, local_epochs: int
) -> Bench:
    config = load_config(demo_config_file())
    assert config.synth is not None
    if train_cases:
        for site in config.synth.sites:
            site.train_cases = train_cases
    set_schedule(config, args, rounds=2 if args.quick else rounds, local_epochs=1 if args.quick else local_epochs)
    config.output_dir = scratch / "runs"
    sizes = {site.name: site.train_cases or config.synth.train_cases for site in config.synth.sites}
    cases = "/".join(str(size) for size in sizes.values())
    return Bench(
        name=name,
        title=f"{name}: synthetic 2D segmentation (the demo's 3 drifted hospitals, {cases} training cases)",
        config=config,
        metric="dice",
        arms=dp_sgd_arms(args.epsilons or [8.0, 3.0, 1.0]),
        delta_n=max(sizes.values()),
    )


def pneumoniamnist_bench(args: argparse.Namespace, scratch: Path) -> Bench | str:
    source = shared_data() / "medmnist" / "pneumoniamnist.npz"
    if not source.is_file():
        return f"{source} not found"
    names = ["hospital-a", "hospital-b", "hospital-c"]
    public = None
    if args.public:
        public, sites = npz_with_public_third(source, out=scratch / "pneumoniamnist", names=names, seed=0)
    else:
        sites = split_npz(
            source, out=scratch / "pneumoniamnist", names=names, seed=0, train_per_site=64 if args.quick else None
        )
    config = mnist_config(sites, name="dp-pneumoniamnist", scratch=scratch)
    set_schedule(config, args, rounds=2 if args.quick else 10, local_epochs=1)
    sizes = npz_train_sizes(sites)
    held_out = f", a public third ({npz_train_sizes({'public': public})['public']} images) held out" if public else ""
    return Bench(
        name="pneumoniamnist",
        title=f"pneumoniamnist: chest X-ray classification, 3 sites stratified by class ({describe_sizes(sizes)} "
        f"training images{held_out}), default network (small DenseNet, group norm), batch 16, Adam 1e-3",
        config=config,
        metric="auc",
        arms=bench_arms(args, default=[8.0, 3.0, 1.0]),
        delta_n=max(sizes.values()),
        public=public,
    )


def hippocampus_bench(args: argparse.Namespace, scratch: Path) -> Bench | str:
    root = shared_data() / "msd-hippocampus"
    if not (root / "imagesTr").is_dir():
        return f"{root} not found"
    cases = cases_from_folder_pairs(root / "imagesTr", root / "labelsTr")[: 24 if args.quick else None]
    public = None
    if args.public:
        held = 8 if args.quick else 80
        public = hippocampus_folder(scratch / "hippocampus" / "public", name="public", cases=cases[:held])
        cases = cases[held:]
    sites, sizes = [], {}
    for index, part in enumerate(np.array_split(np.arange(len(cases)), 3)):
        name = f"hippo-{'abc'[index]}"
        mine = [cases[int(number)] for number in part]
        folder = hippocampus_folder(scratch / "hippocampus" / name, name=name, cases=mine)
        sites.append({"name": name, "path": str(folder)})
        sizes[name] = len(mine) - max(1, round(0.2 * len(mine)))
    raw = {
        "name": "dp-hippocampus",
        "output_dir": str(scratch / "runs"),
        "task": {"kind": "segmentation", "spatial_dims": 3, "num_classes": 3, "image_size": [32, 32, 32]},
        "model": {"channels": [16, 32, 64]},
        # No flips: anterior and posterior lie along the A-P axis, which a flip swaps (bench_real_scans.py).
        "train": {"batch_size": 4, "learning_rate": 0.002, "augmentation": {"flips": False}},
        "sites": sites,
    }
    config = load_config(raw, base=scratch)
    set_schedule(config, args, rounds=2 if args.quick else 20, local_epochs=1)
    return Bench(
        name="hippocampus",
        title=f"hippocampus: MSD Task04 3D segmentation, {len(cases)} cases split by index into 3 sites "
        f"({describe_sizes(sizes)} training{', the first 80 cases held out as public' if public else ''}), grid "
        "geometry 32^3, UNet [16, 32, 64], batch 4, Adam 2e-3",
        config=config,
        metric="dice",
        arms=bench_arms(args, default=[8.0]),
        delta_n=max(sizes.values()),
        notes=["Dice: mean of anterior and posterior on the 32^3 grid (labels resized nearest-neighbour)"],
        public=public,
    )


def hippocampus_folder(folder: Path, *, name: str, cases: list) -> Path:
    """A site folder of hippocampus cases, its last 20 % for validation; the manifest points at the shared files
    (absolute paths): nothing is copied."""
    n_val = max(1, round(0.2 * len(cases)))
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(
        folder,
        name=name,
        labels=HIPPOCAMPUS_LABELS,
        modality="MRI",
        training=cases[:-n_val],
        validation=cases[-n_val:],
        tensor_image_size="3D",
    )
    return folder


def clientdp50_bench(args: argparse.Namespace, scratch: Path) -> Bench | str:
    source = shared_data() / "medmnist" / "pneumoniamnist.npz"
    if not source.is_file():
        return f"{source} not found"
    names = [f"site-{number:02d}" for number in range(50)]
    sites = split_npz(
        source, out=scratch / "clientdp50", names=names, seed=0, train_per_site=16 if args.quick else None
    )
    config = mnist_config(sites, name="clientdp50", scratch=scratch)
    set_schedule(config, args, rounds=2 if args.quick else 20, local_epochs=1)
    config.client_dp = config.client_dp.model_validate(
        {**config.client_dp.model_dump(), "clipping": "fixed", "clipping_norm": 0.4, **args.client_dp}
    )
    sizes = npz_train_sizes(sites)
    delta = min(1e-5, 1 / len(sites))  # participant-level: n is the number of sites
    rate = 1.0  # every site in every round (strategy.fraction_train = 1)
    arms = [Arm("non-private")]
    for target in args.epsilons or [8.0]:
        sigma = calibrate_noise_multiplier(
            target_epsilon=target,
            delta=delta,
            sample_rate=rate,
            planned_steps=config.train.rounds,
            prior_history=[],
            accountant=config.client_dp.accountant,
        )
        arms.append(Arm(f"client ε ≤ {target:g}", client_noise=sigma))
    return Bench(
        name="clientdp50",
        title=f"clientdp50: PneumoniaMNIST split into {len(sites)} sites stratified by class ({min(sizes.values())}"
        f"-{max(sizes.values())} training images each), all sites every round, small DenseNet, batch 16, Adam 1e-3; "
        f"client-level DP, {config.client_dp.clipping} clipping at {config.client_dp.clipping_norm:g}",
        config=config,
        metric="auc",
        arms=arms,
        delta_n=len(sites),
        notes=[
            "ε, σ, δ: participant-level (one site's whole participation), the server's RDP accountant; clip 0.4 is "
            "about a site's update norm after one epoch from the random start (0.38-0.41 measured)"
        ],
    )


BUILDERS: dict[str, Builder] = {
    "demo": demo_bench,
    "synthetic64": synthetic64_bench,
    "pneumoniamnist": pneumoniamnist_bench,
    "hippocampus": hippocampus_bench,
    "clientdp50": clientdp50_bench,
}


# --- helpers for the builders --------------------------------------------------------------------------------


def shared_data() -> Path:
    return Path(os.environ.get("FEDMED_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def dp_sgd_arms(epsilons: list[float]) -> list[Arm]:
    return [Arm("non-private")] + [Arm(f"ε = {epsilon:g}", epsilon=epsilon) for epsilon in epsilons]


def bench_arms(args: argparse.Namespace, *, default: list[float]) -> list[Arm]:
    epsilons = args.epsilons or default
    if not args.public:
        return dp_sgd_arms(epsilons)
    first = epsilons[0]
    return [
        Arm("public model alone", public_only=True),
        Arm("non-private fine-tuning"),
        Arm(f"ε = {first:g} from scratch", epsilon=first, from_public=False),
        *(Arm(f"ε = {epsilon:g}", epsilon=epsilon) for epsilon in epsilons),
        *(Arm(f"ε = {first:g}, {choice}", epsilon=first, trainable=choice) for choice in args.compare_trainable),
    ]


def set_schedule(config: RunConfig, args: argparse.Namespace, *, rounds: int, local_epochs: int) -> None:
    """Rounds and epochs (the command line wins), one evaluation after the last round, no extras."""
    config.train.rounds = args.rounds or rounds
    config.train.local_epochs = args.local_epochs or local_epochs
    config.train.eval_every = config.train.rounds
    config.baselines.local_only = config.baselines.pooled = False
    config.evaluation.cross_site = False


def mnist_config(sites: dict[str, Path], *, name: str, scratch: Path) -> RunConfig:
    return RunConfig(
        name=name,
        output_dir=scratch / "runs",
        task=TaskConfig(**MNIST_TASK),
        train={"batch_size": 16, "learning_rate": 1e-3},
        sites=[SiteEntry(name=site, path=path) for site, path in sites.items()],
    )


def npz_train_sizes(sites: dict[str, Path]) -> dict[str, int]:
    sizes = {}
    for name, path in sites.items():
        with np.load(path) as archive:
            sizes[name] = len(archive["train_labels"])
    return sizes


def describe_sizes(sizes: dict[str, int]) -> str:
    return "/".join(str(size) for size in sizes.values())


# --- running the arms ----------------------------------------------------------------------------------------


def arm_config(bench: Bench, arm: Arm, *, seed: int, args: argparse.Namespace) -> RunConfig:
    config = bench.config.model_copy(deep=True)
    config.seed = seed
    config.pretrain.enabled = args.pretrain  # every arm, non-private included: the same start
    if bench.public is not None and arm.from_public:
        config.pretrain = config.pretrain.model_validate({"public": bench.public, "epochs": args.public_epochs})
    if arm.public_only:  # one round whose server step moves nothing: the public model, scored at every site
        config.train = config.train.model_copy(update={"rounds": 1, "eval_every": 1})
        config.strategy = config.strategy.model_copy(update={"server_learning_rate": 1e-12})
    # The global model is scored: no end-of-run fine-tune (on by default; refused under DP-SGD).
    config.evaluation = config.evaluation.model_copy(update={"finetune_epochs": 0})
    config.strategy = config.strategy.model_validate({**config.strategy.model_dump(), **args.strategy})
    if arm.epsilon is not None:
        settings = {
            **config.dp_sgd.model_dump(),
            "enabled": True,
            "epsilon": arm.epsilon,
            "delta": bench.delta,
            "accountant": args.accountant,
            "max_grad_norm": args.max_grad_norm,
            **args.dp,  # e.g. fields another recipe adds to [dp_sgd]; pydantic coerces the strings
            **({"trainable": arm.trainable} if arm.trainable else {}),
        }
        config.dp_sgd = config.dp_sgd.model_validate(settings)
        config.train = config.train.model_validate({**config.train.model_dump(), **args.dp_train})
    if arm.client_noise is not None:
        settings = {
            **config.client_dp.model_dump(),
            "enabled": True,
            "noise_multiplier": arm.client_noise,
            "delta": bench.delta,
        }
        config.client_dp = config.client_dp.model_validate(settings)
    return config


def run_arm(bench: Bench, arm: Arm, *, seed: int, args: argparse.Namespace) -> Outcome:
    config = arm_config(bench, arm, seed=seed, args=args)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        run = simulate(config)
    except FedmedError as error:
        return Outcome(seconds=time.perf_counter() - started, refused=refusal(str(error)))
    outcome = Outcome(
        seconds=time.perf_counter() - started,
        cpu_seconds=time.process_time() - cpu_started,
        metric={site: row["federated"][bench.metric] for site, row in run.summary["sites"].items()},
    )
    for site, plan in (run.summary.get("dp_plan") or {}).get("sites", {}).items():
        if "planned_steps" in plan:
            outcome.steps[site] = plan["planned_steps"]
    for site, spent in run.summary.get("privacy", {}).items():
        outcome.epsilon[site], outcome.sigma[site] = spent["epsilon"], spent["noise_multiplier"]
        outcome.delta = spent.get("delta")
    if client := run.summary.get("client_privacy"):
        outcome.epsilon["all"], outcome.sigma["all"] = client["epsilon"], client["noise_multiplier"]
        outcome.delta = client["delta"]
    return outcome


def refusal(message: str) -> str:
    """The first sentence of the first site's reason ('round 1: 0 of 3 site(s) returned an update, quorum is 3.
    site a: <reason>; site b: ...' when the sites refuse a round; the run's own message when it stops first)."""
    reason = message.split(". ", 1)[-1] if message.startswith("round ") else message
    reason = reason.split("; ")[0].split(". ")[0]
    return "refused: " + (reason if len(reason) <= 200 else reason[:199] + "…")


def run_bench(bench: Bench, args: argparse.Namespace) -> dict[str, list[Outcome]]:
    results: dict[str, list[Outcome]] = {}
    for arm in bench.arms:
        if args.arms and arm.label not in args.arms:
            continue
        results[arm.label] = []
        for seed in args.seeds:
            outcome = run_arm(bench, arm, seed=seed, args=args)
            results[arm.label].append(outcome)
            status = outcome.refused or f"mean {bench.metric} {statistics.fmean(outcome.metric.values()):.3f}"
            print(
                f"done: {bench.name}, {arm.label}, seed {seed}: {status} ({outcome.seconds:.0f} s, "
                f"{outcome.cpu_seconds:.0f} CPU s)",
                file=sys.stderr,
                flush=True,
            )
            if outcome.refused:
                break  # the other seeds plan the same σ
    return results


# --- the table -----------------------------------------------------------------------------------------------


def print_table(bench: Bench, results: dict[str, list[Outcome]], args: argparse.Namespace) -> None:
    config = bench.config
    sites = config.site_names
    per_site = len(sites) <= MAX_PER_SITE_COLUMNS
    dp_sgd = any(arm.epsilon is not None for arm in bench.arms)
    recipe = ", ".join(f"{key}={value}" for key, value in args.dp.items()) if dp_sgd and args.dp else ""
    lines = [
        "",
        f"## {bench.title}",
        f"{config.train.rounds} rounds x {config.train.local_epochs} local epoch(s), seeds "
        f"{' '.join(map(str, args.seeds))}{' (mean over seeds; ± sd of the mean)' if len(args.seeds) > 1 else ''}; "
        f"{bench.metric.upper()} of the global model at each site",
        f"δ = {bench.delta:g} = min(1e-5, 1/n), n = {bench.delta_n} "
        f"({'the largest site' if dp_sgd else 'the number of participants'})"
        + (f"; DP-SGD: {args.accountant.upper()} accountant, clip {args.max_grad_norm:g}" if dp_sgd else "")
        + (f"; --dp {recipe}" if recipe else "")
        + (f"; DP arms' [train]: {args.dp_train}" if dp_sgd and args.dp_train else "")
        + (f"; every arm's [strategy]: {args.strategy}" if args.strategy else ""),
        *(["every arm starts from [pretrain] (synthetic phantoms, no privacy cost)"] if args.pretrain else []),
        *(
            [f"every arm but 'from scratch' starts from [pretrain] public ({args.public_epochs} epochs, no privacy)"]
            if bench.public is not None
            else []
        ),
        *bench.notes,
    ]
    columns = sites if per_site else ["best", "median"]
    steps = any(outcome.steps for outcomes in results.values() for outcome in outcomes)
    header = (
        f"{'':<16}"
        + "".join(f"{name:>12}" for name in columns)
        + f"{'mean':>14}{'worst':>8}{'wall s':>8}  {'ε spent':<22}{'σ':<22}{'δ':<8}"
        + ("DP-SGD steps" if steps else "")
    )
    lines += [header, "-" * len(header)]
    for label, outcomes in results.items():
        lines.append(f"{label:<16}" + row_cells(outcomes, sites=sites, per_site=per_site, steps=steps))
    print("\n".join(lines), flush=True)


def row_cells(outcomes: list[Outcome], *, sites: list[str], per_site: bool, steps: bool) -> str:
    if outcomes[0].refused:
        return f"  {outcomes[0].refused}"
    site_means = {site: statistics.fmean(outcome.metric[site] for outcome in outcomes) for site in sites}
    means = [statistics.fmean(outcome.metric.values()) for outcome in outcomes]
    worst = statistics.fmean(min(outcome.metric.values()) for outcome in outcomes)
    if per_site:
        cells = [site_means[site] for site in sites]
    else:
        cells = [max(site_means.values()), statistics.median(site_means.values())]
    mean = f"{statistics.fmean(means):.3f}" + (f"±{statistics.stdev(means):.3f}" if len(means) > 1 else "")
    seconds = statistics.fmean(outcome.seconds for outcome in outcomes)
    last = outcomes[-1]
    delta = f"{last.delta:g}" if last.delta is not None else "-"
    return (
        "".join(f"{value:>12.3f}" for value in cells)
        + f"{mean:>14}{worst:>8.3f}{seconds:>8.0f}  {spread(last.epsilon, sites):<22}{spread(last.sigma, sites):<22}"
        + f"{delta:<8}"
        + (spread(last.steps, sites, digits=0) if steps else "")
    )


def spread(values: dict[str, float] | dict[str, int], sites: list[str], *, digits: int = 2) -> str:
    """Per-site values in site order joined with '/' (3 sites), a range for many sites, '-' without DP."""
    if not values:
        return "-"
    numbers = [values[site] for site in sites if site in values] or list(values.values())
    if len(numbers) <= MAX_PER_SITE_COLUMNS:
        return "/".join(f"{value:.{digits}f}" for value in numbers)
    return f"{min(numbers):.{digits}f}-{max(numbers):.{digits}f}"


# --- command line --------------------------------------------------------------------------------------------


def key_values(pairs: list[str], *, flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; a value that parses as JSON (numbers, true/false, lists) is passed parsed, else as text."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} {pair!r}: write KEY=VALUE, e.g. {flag} max_grad_norm=0.5")
        try:
            settings[key.strip()] = json.loads(value)
        except ValueError:
            settings[key.strip()] = value
    return settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=[*DATASETS, "all"], default=["demo"])
    parser.add_argument("--epsilons", type=float, nargs="+", help="DP arms' ε (default: per data set)")
    parser.add_argument("--accountant", choices=["prv", "rdp"], default="prv", help="DP-SGD accountant")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD per-sample clipping norm")
    parser.add_argument(
        "--dp", action="append", default=[], metavar="KEY=VALUE", help="extra [dp_sgd] field on the DP-SGD arms"
    )
    parser.add_argument(
        "--dp-train", action="append", default=[], metavar="KEY=VALUE", help="[train] field on the DP-SGD arms only"
    )
    parser.add_argument(
        "--client-dp", action="append", default=[], metavar="KEY=VALUE", help="[client_dp] field (clientdp50)"
    )
    parser.add_argument(
        "--strategy", action="append", default=[], metavar="KEY=VALUE", help="[strategy] field on every arm"
    )
    parser.add_argument("--train-cases", type=int, help="demo / synthetic64: training cases at every site")
    parser.add_argument("--rounds", type=int, help="rounds (default: per data set)")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round (default: per data set)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (the data split stays fixed)")
    parser.add_argument(
        "--pretrain", action="store_true", help="every arm starts from [pretrain] (synthetic phantoms, no privacy cost)"
    )
    parser.add_argument(
        "--public", action="store_true", help="hold out a public part and fine-tune privately from it (see above)"
    )
    parser.add_argument("--public-epochs", type=int, default=10, help="--public: epochs of [pretrain] public")
    parser.add_argument(
        "--compare-trainable",
        nargs="+",
        default=[],
        choices=["all", "norm", "head", "adapters"],
        help="--public: also DP-SGD training these at the first ε",
    )
    parser.add_argument("--arms", nargs="+", default=[], help="run only the arms with these labels, e.g. 'ε = 8'")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one per benchmark run side by side)")
    parser.add_argument("--quick", action="store_true", help="every arm tiny (2 rounds, few cases): checks the script")
    args = parser.parse_args()
    args.data = list(DATASETS) if "all" in args.data else list(dict.fromkeys(args.data))
    args.dp = key_values(args.dp, flag="--dp")
    args.client_dp = key_values(args.client_dp, flag="--client-dp")
    args.dp_train = key_values(args.dp_train, flag="--dp-train")
    args.strategy = key_values(args.strategy, flag="--strategy")
    # Fail before the first run on a field [dp_sgd] / [client_dp] / [train] does not have or a value it refuses.
    try:
        DpSgdConfig.model_validate(args.dp)
        ClientDpConfig.model_validate(args.client_dp)
        TrainConfig.model_validate(args.dp_train)
    except ValueError as error:
        parser.error(str(error))
    return args


def main() -> None:
    args = parse_args()
    logging.getLogger("fedmed").setLevel(logging.WARNING)
    set_flower_verbosity(False)
    import torch

    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-dp-") as scratch_dir:
        for name in args.data:
            scratch = Path(scratch_dir) / name
            started = time.perf_counter()
            bench = BUILDERS[name](args, scratch)
            if isinstance(bench, str):
                print(f"\nskipped: {name}: {bench} (set FEDMED_SHARED_DATA to the shared data folder)", flush=True)
                continue
            results = run_bench(bench, args)
            print_table(bench, results, args)
            print(f"{name}: {(time.perf_counter() - started) / 60:.1f} min in all", flush=True)


if __name__ == "__main__":
    main()
