"""Privacy settings: what a run asks for ([dp_sgd], [client_dp], [secagg]) and what a site allows ([privacy]),
and the checks that the rest of a run config keeps each privacy promise."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from .base import StrictModel

if TYPE_CHECKING:
    from .run import RunConfig

Accountant = Literal["prv", "rdp"]
# What DP-SGD trains (fedmed.models.trainable): "auto" resolves to "norm" (FedBN: "adapters") from a pretrained
# start, else "all".
Trainable = Literal["auto", "all", "norm", "head", "adapters"]
MIN_DEFAULT_BATCH = 16  # σ / 16 stays below the mostly-noise line (0.5) up to σ 8


class DpSgdConfig(StrictModel):
    """Sample-level DP-SGD (Opacus) at every site; each site charges its own ledger."""

    enabled: bool = False
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm")
    epsilon: float = Field(
        8.0, gt=0, description="ε this run may add at each site; a site's own policy can only lower it"
    )
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Accountant = "prv"
    steps: Literal["budget", "epochs"] = Field(
        "budget",
        description="'budget': each site runs as many DP-SGD steps as its ε pays for at noise_multiplier, spread "
        "evenly over the rounds (train.local_epochs is not used); 'epochs': train.local_epochs per round, σ "
        "calibrated to fit, which with small sites means a σ that drowns the gradient",
    )
    noise_multiplier: float = Field(
        4.0,
        gt=0,
        description="steps = 'budget': the σ the steps are planned at (the site calibrates a σ at or just below it); "
        "measured on the synthetic 64-case federation at ε 8, batch 16: σ 4 gave Dice 0.69, σ 2 0.40",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="expected logical batch per DP-SGD step (Poisson sampling rate = batch_size / training cases); "
        "default: a quarter of the site's training cases, at least 16 and at most max_batch_size (never more than "
        "the site has). Measured: 64 cases, batch 16 Dice 0.69 where all 64 per batch gave 0.10; 810 images at the "
        "same compute, batch 32 AUC 0.90 where 202 gave 0.81 (too few steps)",
    )
    max_batch_size: int = Field(32, ge=1, description="the default logical batch's cap for large sites")
    max_epochs_per_round: int = Field(
        10,
        ge=1,
        description="steps = 'budget': a round runs at most this many passes over the site's data, however many "
        "steps the budget would pay for (a large site then plans a lower σ)",
    )
    physical_batch_size: int | None = Field(
        None,
        ge=1,
        description="a logical batch is processed in pieces of at most this many samples (Opacus' "
        "BatchMemoryManager); default: train.batch_size. Memory only: the update is the same",
    )
    augmentation_multiplicity: int = Field(
        1,
        ge=1,
        description="augmented views (random flips) of each sample whose gradients are averaged before clipping; "
        "costs compute, not privacy",
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="exponential moving average of the weights over a site's DP-SGD steps (with warm-up), sent "
        "instead of the last iterate; 0 switches it off. Post-processing: costs no privacy",
    )

    trainable: Trainable = Field(
        "auto",
        description="what DP-SGD trains, the rest fixed at the starting weights and never sent: 'all'; 'norm' "
        "(normalization layers' scale and shift); 'head' (the classifier head, or a UNet's decoder); 'adapters' "
        "(low-rank adapters on every convolution, merged into its weights after each round, so the update and every "
        "exported model stay plain MONAI); 'auto': from pretrained weights (model.init or [pretrain]) 'norm', or "
        "'adapters' under FedBN (whose normalization layers stay at the sites), else 'all'. Fewer trained values "
        "put less noise on the update: the noise's norm grows with the square root of their number, the clipped "
        "signal's does not",
    )
    adapter_rank: int = Field(
        4, ge=1, le=256, description="trainable = 'adapters': the rank of each convolution's low-rank update"
    )

    max_effective_noise: float = Field(
        0.5,
        gt=0,
        description="a run stops before round 1, nothing spent, when a site's plan puts more noise than this on "
        "each step's mean clipped gradient (σ / expected batch, in units of max_grad_norm): measured on the demo "
        "task, 0.25 still learned (Dice 0.60) while 0.45 and above learned next to nothing (Dice ≤ 0.20)",
    )

    def logical_batch_size(self, num_examples: int) -> int:
        if self.batch_size is not None:
            return min(num_examples, self.batch_size)
        return min(num_examples, self.max_batch_size, max(MIN_DEFAULT_BATCH, num_examples // 4))


class ClientDpConfig(StrictModel):
    """Client-level DP: each site clips its update, the server adds Gaussian noise (Flower's wrappers)."""

    enabled: bool = False
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clipping_norm: float = Field(0.1, gt=0, description="L2 norm of a site's update (initial value if adaptive)")
    noise_multiplier: float = Field(
        1.0, ge=0, description="server noise std = noise_multiplier * clipping_norm / sites"
    )
    target_clipped_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: fraction of updates left unclipped")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive: step size of the clipping-norm update")
    clipped_count_stddev: float | None = Field(None, ge=0, description="adaptive: noise on the unclipped count")
    delta: float = Field(1e-5, gt=0, lt=1, description="participant-level δ of the (ε, δ) the run reports")
    accountant: Accountant = "rdp"


class SecAggConfig(StrictModel):
    """SecAgg+ over the Message API: the server learns only the sum of the sites' updates."""

    enabled: bool = False
    clipping_range: float = Field(
        0.5, gt=0, description="updates (local - global) are quantized on [-range, range]; values beyond are reported"
    )
    max_total_weight: int = Field(2**16, ge=1, description="upper bound on the training examples summed over sites")
    reconstruction_threshold: int | None = Field(None, ge=2, description="shares needed to unmask; default: majority")
    stage_timeout_s: float = Field(120.0, gt=0, description="how long each protocol stage waits for the sites")
    max_attempts: int = Field(2, ge=1, description="a round the protocol cannot finish is retried with fresh keys")


class PrivacyBudget(StrictModel):
    epsilon: float = Field(gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class SitePrivacyPolicy(StrictModel):
    """A site's own privacy policy: its lifetime (ε, δ) budget per dataset, enforced by its ledger."""

    require_dp: bool = Field(False, description="refuse any run that asks this site to train without DP-SGD")
    epsilon: float = Field(8.0, gt=0, description="lifetime budget per dataset, over all runs")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Accountant = "prv"
    datasets: dict[str, PrivacyBudget] = Field(default_factory=dict, description="budgets for named datasets")
    max_noise_multiplier: float = Field(
        10.0,
        gt=0,
        description=(
            "refuse a run whose calibrated DP-SGD noise multiplier σ would exceed this, as if the budget were "
            "exhausted: past σ ≈ 10 the clipped gradient is buried in noise (signal-to-noise below 1/10 per step "
            "even at batch size 100), so the site would spend its remaining ε on an update that is only noise"
        ),
    )
    share_personalized_model: bool = Field(
        False,
        description="let the other sites evaluate this site's personalized model (its FedBN layers leave the site)",
    )
    train_local_baseline: bool = Field(
        True,
        description="train a local-only model on this site's compute when a run asks ([evaluation] local_baseline); "
        "the model never leaves the site",
    )
    share_local_baseline: list[str] | Literal["all"] = Field(
        default_factory=list,
        description="metrics of that local-only model (on this site's validation data) this site reports to the "
        "coordinator, e.g. ['dice']; the others stay in its own comparison.json. Never any under DP-SGD: the "
        "local-only model trains without it",
    )

    def budget_for(self, dataset: str) -> PrivacyBudget:
        return self.datasets.get(dataset, PrivacyBudget(epsilon=self.epsilon, delta=self.delta))


def check_privacy(run: RunConfig) -> None:
    """No other setting may release what DP-SGD, client-level DP or SecAgg+ keep from the coordinator."""
    if run.client_dp.enabled and run.strategy.name not in ("fedavg", "fedprox"):
        raise ValueError(
            f"client_dp works with strategy 'fedavg' or 'fedprox', not '{run.strategy.name}': Flower noises the "
            "strategy's output, so a server optimizer's state (FedAvgM's momentum, FedAdam's moments) would keep "
            "the sites' un-noised updates and release them again in later rounds, outside the privacy accounting; "
            "set strategy.name = 'fedavg'"
        )
    if run.strategy.normalized_averaging and run.secagg.enabled:
        raise ValueError(
            "strategy.normalized_averaging needs each site's update, but with secagg.enabled the coordinator "
            "sees only their masked sum; turn one off, or equalize the sites' pull with train.local_steps (the "
            "same step budget at every site) instead"
        )
    if run.strategy.normalized_averaging and run.client_dp.enabled:
        raise ValueError(
            "strategy.normalized_averaging rescales each site's update by its step count, which can stretch a "
            "clipped update past client_dp.clipping_norm, so the noise would no longer cover one site; turn one "
            "off, or equalize the sites' pull with train.local_steps (the same step budget at every site) instead"
        )
    if run.dp_sgd.enabled and run.evaluation.finetune_epochs:
        raise ValueError(
            "evaluation.finetune_epochs must be 0 with dp_sgd: a fine-tune after the run would spend privacy "
            "budget beyond the run's plan; personalize with FedBN's local layers (strategy.fedbn) instead"
        )
    if run.dp_sgd.enabled and run.evaluation.ditto_lambda:
        raise ValueError(
            "evaluation.ditto_lambda must be 0 with dp_sgd: Ditto's personal model trains on the site's data "
            "without DP-SGD and its scores leave the site; personalize with FedBN's local layers (strategy.fedbn)"
        )
    if run.dp_sgd.enabled and run.train.local_steps:
        raise ValueError(
            "train.local_steps must be unset with dp_sgd: DP-SGD plans each round's steps from the privacy "
            "budget; bound them with dp_sgd.max_epochs_per_round instead"
        )


def dp_trainable(run: RunConfig) -> str:
    """What trains under the run's DP-SGD (dp_sgd.trainable with 'auto' resolved); 'all' without DP-SGD."""
    if not run.dp_sgd.enabled:
        return "all"
    chosen = run.dp_sgd.trainable
    if chosen != "auto":
        return chosen
    if run.model.init is None and not run.pretrain.enabled:
        return "all"
    # Measured from public starts (docs/benchmarks/dp-utility.md): the normalization layers' few values kept or
    # improved the public model where adapters and every weight lost AUC; under FedBN they stay at the sites.
    return "adapters" if run.strategy.fedbn else "norm"


def check_dp_trainable(run: RunConfig) -> None:
    """dp_sgd.trainable only with DP-SGD, and never with a setting that would leave nothing shared or resume an
    optimizer over parameters that no longer exist."""
    chosen = run.dp_sgd.trainable
    if not run.dp_sgd.enabled:
        if chosen not in ("auto", "all"):
            raise ValueError(
                f"dp_sgd.trainable = '{chosen}' chooses what DP-SGD trains, but dp_sgd.enabled is false; enable "
                "DP-SGD, or fix parameters without it with model.freeze"
            )
        return
    trainable = dp_trainable(run)
    if trainable == "norm" and run.strategy.fedbn:
        raise ValueError(
            "dp_sgd.trainable = 'norm' with strategy.fedbn: FedBN keeps every normalization layer at its site, so the "
            "sites would share nothing; choose trainable = 'adapters' or 'head', or set strategy.fedbn = false"
        )
    if trainable == "adapters" and run.strategy.proximal_mu > 0:
        raise ValueError(
            "dp_sgd.trainable = 'adapters' with strategy.proximal_mu: FedProx pulls the weights a round trains "
            "towards the global ones, but the adapters start at zero each round and are merged only after it, so "
            "the pull would do nothing; set strategy.proximal_mu = 0, or dp_sgd.trainable = 'all'"
        )
    if trainable == "adapters" and run.train.keep_optimizer_state:
        raise ValueError(
            "dp_sgd.trainable = 'adapters' with train.keep_optimizer_state: each round trains fresh adapters, so "
            "there is no optimizer state to keep; set train.keep_optimizer_state = false"
        )


def check_secagg_sites(run: RunConfig) -> None:
    if run.secagg.enabled and len(run.site_names) == 1:
        raise ValueError("secagg needs at least 2 sites: with one site the sum is that site's update")


def check_dp_sgd_patches(run: RunConfig) -> None:
    """Scan geometry draws patches; DP-SGD's unit must stay one case per draw (after check_scan_geometry)."""
    if run.task.scan_geometry and run.dp_sgd.enabled and run.train.samples_per_volume > 1:
        raise ValueError(
            "dp_sgd protects each case: with train.samples_per_volume > 1 one patient would count several "
            "times per step; set train.samples_per_volume = 1"
        )
