"""A site's side of DP-SGD for one run: its policy, its ledger, and the run's fixed noise multiplier.

The site decides, never the coordinator: it refuses to train without DP when its policy requires
DP, calibrates one noise multiplier for the run against what its ledger has already spent, and
refuses any round that would take the dataset past its budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmed.config import RunConfig, SitePrivacyPolicy
from fedmed.core.errors import FedmedError
from fedmed.privacy import (
    LEDGER_FILENAME,
    PrivacyBudgetExhaustedError,
    PrivacyLedger,
    RunPlan,
    epsilon_spent,
    sample_rate,
    steps_per_epoch,
)
from fedmed.privacy.ledger_anchor import anchor_path
from fedmed.site.ledger_guard import open_site_ledger, record_charge
from fedmed.tasks import DpSgdStep


class DpRequiredError(FedmedError):
    """The site's policy requires DP-SGD and the run asks to train without it."""


def ledger_path(state_dir: Path) -> Path:
    """A site's DP-SGD ledger: one per site, in its state folder, across all its runs."""
    return Path(state_dir) / LEDGER_FILENAME


@dataclass(frozen=True)
class SitePrivacyTerms:
    """Where a site keeps its ledger and which policy binds it."""

    ledger_path: Path
    policy: SitePrivacyPolicy


def simulated_policy(config: RunConfig) -> SitePrivacyPolicy:
    """In a simulation the researcher plays every site: the run's DP settings are the sites' policy."""
    return SitePrivacyPolicy(
        epsilon=config.dp_sgd.epsilon,
        delta=config.dp_sgd.delta,
        accountant=config.dp_sgd.accountant,
        share_personalized_model=True,
        share_local_baseline="all",
    )


@dataclass(frozen=True)
class DpPlanPreview:
    """A site's DP-SGD plan for a run, known before it spends anything."""

    noise_multiplier: float
    sample_rate: float
    expected_batch: float
    steps_per_round: int
    planned_steps: int
    target_epsilon: float
    delta: float
    trained_values: int = 0  # the values DP-SGD trains and noises (dp_sgd.trainable; adapters' own)

    @property
    def effective_noise(self) -> float:
        """σ / expected batch: the noise std on each step's mean clipped gradient, in units of the clip norm."""
        return self.noise_multiplier / self.expected_batch

    @property
    def noise_to_signal(self) -> float:
        """σ·√d / expected batch: the noise's norm on each step's mean clipped gradient over the most the clipped
        signal's can be (the clip norm), with d the values trained: what training fewer values lowers."""
        return self.effective_noise * self.trained_values**0.5


class SitePrivacy:
    def __init__(self, *, site: str, run_id: str, dataset: str, terms: SitePrivacyTerms, config: RunConfig) -> None:
        self.site = site
        self.run_id = run_id
        self.dataset = dataset
        self.terms = terms
        self.config = config
        self._plan = None  # fixed at the run's first round, reloaded from the ledger after a restart

    @property
    def enabled(self) -> bool:
        return self.config.dp_sgd.enabled

    def check_allowed(self) -> None:
        if self.terms.policy.require_dp and not self.enabled:
            raise DpRequiredError(
                f"site {self.site}: refusing to train without DP-SGD (its site config sets privacy.require_dp); "
                f"enable [dp_sgd] in the run config"
            )

    def _ledger(self) -> PrivacyLedger:
        return open_site_ledger(self.terms.ledger_path)

    def step_for_round(self, *, num_examples: int) -> DpSgdStep:
        """The run's fixed DP-SGD step; raises PrivacyBudgetExhaustedError if this round would overspend."""
        with self._ledger() as ledger:
            plan = self._run_plan(ledger, num_examples=num_examples)
            steps = self._round_steps(num_examples)
            ledger.check_round(site=self.site, dataset=self.dataset, plan=plan, steps=steps).raise_if_refused()
        dp = self.config.dp_sgd
        return DpSgdStep(
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            logical_batch_size=self._logical_batch(num_examples),
            physical_batch_size=dp.physical_batch_size,
            steps=steps if dp.steps == "budget" else None,
            augmentation_multiplicity=dp.augmentation_multiplicity,
            ema_decay=dp.ema_decay,
            adapter_rank=dp.adapter_rank if self.config.trainable == "adapters" else 0,
        )

    def preview(self, *, num_examples: int) -> DpPlanPreview:
        """The run's plan before any round: σ, sampling and steps, fixed in the ledger but nothing charged."""
        with self._ledger() as ledger:
            plan = self._run_plan(ledger, num_examples=num_examples)
        return DpPlanPreview(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            expected_batch=plan.sample_rate * num_examples,
            steps_per_round=self._round_steps(num_examples),
            planned_steps=plan.planned_steps,
            target_epsilon=plan.target_epsilon,
            delta=plan.delta,
        )

    def charge(self, *, server_round: int, steps: int) -> dict[str, float]:
        """Record the round's spend before its update leaves the site; the ε spent goes into the metrics."""
        with self._ledger() as ledger:
            epsilon = ledger.record_round(
                dataset=self.dataset, run_id=self.run_id, round=server_round, plan=self._plan, steps=steps
            )
            record_charge(ledger, run_id=self.run_id, server_round=server_round, epsilon=epsilon)
        return {
            "epsilon": epsilon,
            "delta": self._plan.delta,
            "noise_multiplier": self._plan.noise_multiplier,
            "epsilon_budget": self._plan.target_epsilon,
        }

    def _logical_batch(self, num_examples: int) -> int:
        dp = self.config.dp_sgd
        if dp.steps == "epochs":
            return dp.batch_size or self.config.train.batch_size
        return dp.logical_batch_size(num_examples)

    def _epoch_steps(self, num_examples: int) -> int:
        """What train.local_epochs would take per round: the most a round does in either mode."""
        return self.config.train.local_epochs * steps_per_epoch(num_examples, self._logical_batch(num_examples))

    def _round_steps(self, num_examples: int) -> int:
        if self.config.dp_sgd.steps == "epochs":
            return self._epoch_steps(num_examples)
        # The plan fixed the run's steps; a restarted site divides the same stored number.
        return self._plan.planned_steps // self.config.train.rounds

    def _budget_steps(self, history: list, *, target: float, delta: float, rate: float, num_examples: int) -> int:
        """The run's steps: as many as the budget pays for at [dp_sgd] noise_multiplier, a whole number per
        round, at least one per round (the plan's σ then rises, which preview() makes visible) and at most
        [dp_sgd] max_epochs_per_round passes (a large site then gets less noise instead of more work)."""
        rounds = self.config.train.rounds
        dp = self.config.dp_sgd
        most = dp.max_epochs_per_round * steps_per_epoch(num_examples, self._logical_batch(num_examples))
        sigma = dp.noise_multiplier

        def fits(per_round: int) -> bool:
            # RDP's bound is the looser one: steps that fit it fit either accountant, whose σ the ledger calibrates.
            entry = (sigma, rate, per_round * rounds)
            return epsilon_spent([*history, entry], delta=delta, accountant="rdp") <= target

        low, high = 1, most
        if fits(high):
            return high * rounds
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low * rounds

    def _run_plan(self, ledger: PrivacyLedger, *, num_examples: int) -> RunPlan:
        if self._plan is None:
            # A restarted daemon (or a new ClientApp process per round) continues the run's plan.
            self._plan = ledger.get_plan(dataset=self.dataset, run_id=self.run_id)
        if self._plan is None:
            budget = self.terms.policy.budget_for(self.dataset)
            accountant = self.terms.policy.accountant
            spent_before = ledger.spent(self.dataset, delta=budget.delta, accountant=accountant)
            # The run may add at most its own ε, and never take the dataset past the site's budget.
            target = min(budget.epsilon, spent_before + self.config.dp_sgd.epsilon)
            rate = sample_rate(num_examples, self._logical_batch(num_examples))
            history = ledger.history(self.dataset)
            if self.config.dp_sgd.steps == "budget":
                steps = self._budget_steps(
                    history, target=target, delta=budget.delta, rate=rate, num_examples=num_examples
                )
            else:
                steps = self.config.train.rounds * self._epoch_steps(num_examples)
            ceiling = self.terms.policy.max_noise_multiplier
            # Even the ceiling's noise cannot keep the run within what is left: refuse before planning,
            # so that nothing is stored or charged.
            if (
                spent_before < target
                and epsilon_spent([*history, (ceiling, rate, steps)], delta=budget.delta, accountant=accountant)
                > target
            ):
                self._refuse_noise(remaining=budget.epsilon - spent_before, sigma=None)
            self._plan = ledger.plan_run(
                site=self.site,
                dataset=self.dataset,
                run_id=self.run_id,
                target_epsilon=target,
                delta=budget.delta,
                accountant=accountant,
                sample_rate=rate,
                planned_steps=steps,
            )
        if self._plan.noise_multiplier > self.terms.policy.max_noise_multiplier:
            # A plan stored before the site lowered its ceiling, or one calibrated just past it.
            budget = self.terms.policy.budget_for(self.dataset)
            spent = ledger.spent(self.dataset, delta=budget.delta, accountant=self.terms.policy.accountant)
            self._refuse_noise(remaining=budget.epsilon - spent, sigma=self._plan.noise_multiplier)
        return self._plan

    def _refuse_noise(self, *, remaining: float, sigma: float | None) -> None:
        ceiling = self.terms.policy.max_noise_multiplier
        needs = f"noise multiplier {sigma:.2f}" if sigma is not None else "a noise multiplier"
        raise PrivacyBudgetExhaustedError(
            f"site {self.site}: privacy budget exhausted for this run (ε {max(remaining, 0.0):.3f} left, the run "
            f"asks ε {self.config.dp_sgd.epsilon:g}): training within it needs {needs} above the site's ceiling "
            f"{ceiling:g} (privacy.max_noise_multiplier), where the update would be mostly noise; plan fewer rounds "
            "or local epochs, or the site admin raises max_noise_multiplier or the budget in site.toml"
        )


def format_budget(ledger_path: Path, *, policy: SitePrivacyPolicy, site: str) -> str:
    """`fedmed site budget`: spent and remaining per dataset and run, against the site's policy."""
    header = f"site {site}: DP-SGD ledger {ledger_path}"
    if not ledger_path.exists() and not anchor_path(ledger_path).exists():
        return (
            f"{header}\nno DP-SGD training recorded yet; budget per dataset ε {policy.epsilon:g} at "
            f"δ {policy.delta:g} ({policy.accountant})"
        )
    # Through the guard: a missing or rolled-back ledger is reported, never shown as an unspent budget.
    with open_site_ledger(ledger_path) as ledger:
        rows = ledger.summary()
        datasets = sorted({row.dataset for row in rows})
        spent = {
            name: ledger.spent(name, delta=policy.budget_for(name).delta, accountant=policy.accountant)
            for name in datasets
        }
    lines = [header, f"{'dataset':<24}{'run':<34}{'rounds':>7}{'steps':>8}{'σ':>8}"]
    lines += [
        f"{row.dataset:<24}{row.run_id:<34}{row.rounds:>7}{row.steps:>8}{row.noise_multiplier:>8.3f}" for row in rows
    ]
    lines.append("")
    lines.append(f"{'dataset':<24}{'ε spent':>10}{'ε budget':>10}{'remaining':>11}{'δ':>9}  accountant")
    for name in datasets:
        budget = policy.budget_for(name)
        lines.append(
            f"{name:<24}{spent[name]:>10.3f}{budget.epsilon:>10.3f}{max(budget.epsilon - spent[name], 0):>11.3f}"
            f"{budget.delta:>9.0e}  {policy.accountant}"
        )
    return "\n".join(lines)


def plan_numbers(preview: DpPlanPreview) -> dict[str, float]:
    """What a site tells the coordinator about its plan: numbers only, effective noise included."""
    return {
        "noise_multiplier": preview.noise_multiplier,
        "sample_rate": preview.sample_rate,
        "expected_batch": preview.expected_batch,
        "steps_per_round": preview.steps_per_round,
        "planned_steps": preview.planned_steps,
        "target_epsilon": preview.target_epsilon,
        "delta": preview.delta,
        "effective_noise": preview.effective_noise,
        "trained_values": preview.trained_values,
        "noise_to_signal": preview.noise_to_signal,
    }
