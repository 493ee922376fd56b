"""[dp_sgd]: before any site trains, every site tells its DP-SGD plan, and a plan whose updates would be mostly
noise stops the run before any ε is spent.

Each site fixes its plan for the run in its ledger (its σ, Poisson sampling rate and steps, as its first
round would) and replies with the numbers only, or with its refusal (budget exhausted, DP-SGD cannot train the
model, σ past its ceiling). The plan's effective noise, σ / expected batch, is the std of the noise on each
step's mean clipped gradient in units of the clipping norm; over the d values DP-SGD trains
(dp_sgd.trainable) the noise's norm is that times √d against a clipped signal of norm at most 1 (the
plan's noise/signal, reported only: what a task tolerates depends on how aligned its gradients are). Past the
threshold ([dp_sgd] max_effective_noise) the update is mostly noise, and the coordinator is told, with what
would help, before round 1. The plans go to dp_plan.json in the run directory, whatever the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.wire import CONFIG, DP_PLAN, PLAN
from fedmed.runs.run_dir import DP_PLAN_FILE

from .context import RunContext
from .exchange import ask_every_site

OK = "ok"
MOSTLY_NOISE = "mostly noise"
REFUSED = "refused"


class MostlyNoiseError(FedmedError):
    """A site's DP-SGD plan would make its updates mostly noise: the run stops before any site spends ε."""


@dataclass(frozen=True)
class DpPlans:
    """What the sites answered: their plans' numbers, their refusals, and the run's effective-noise ceiling."""

    plans: dict[str, dict[str, float]]
    refused: dict[str, str]
    threshold: float

    @property
    def mostly_noise(self) -> list[str]:
        return [site for site, plan in self.plans.items() if plan["effective_noise"] > self.threshold]

    def verdict(self, site: str) -> str:
        if site in self.refused:
            return REFUSED
        return MOSTLY_NOISE if site in self.mostly_noise else OK

    def describe(self) -> dict[str, Any]:
        """dp_plan.json: per site its numbers and verdict, or its refusal and reason."""
        sites: dict[str, dict[str, Any]] = {
            site: {**plan, "verdict": self.verdict(site)} for site, plan in self.plans.items()
        }
        sites |= {site: {"verdict": REFUSED, "reason": reason} for site, reason in self.refused.items()}
        return {"max_effective_noise": self.threshold, "sites": dict(sorted(sites.items()))}


def ask_dp_plans(run: RunContext) -> DpPlans:
    """Ask every site for its plan; write dp_plan.json and log the table."""
    content = RecordDict({CONFIG: ConfigRecord(dict(run.settings))})  # Nyúl's landmarks: the data as trained
    refused: dict[str, str] = {}
    replies = ask_every_site(run, content, message_type=DP_PLAN, purpose="DP-SGD plan", refused=refused)
    plans = {site: {key: float(value) for key, value in reply[PLAN].items()} for site, reply in replies.items()}
    for plan in plans.values():
        plan["steps_per_round"] = int(plan["steps_per_round"])
        plan["planned_steps"] = int(plan["planned_steps"])
        plan["trained_values"] = int(plan.get("trained_values", 0))
    result = DpPlans(
        plans=dict(sorted(plans.items())),
        refused=dict(sorted(refused.items())),
        threshold=run.config.dp_sgd.max_effective_noise,
    )
    run.run_dir.write_json(DP_PLAN_FILE, result.describe())
    logger.info("%s", format_plans(result))
    return result


def format_plans(plans: DpPlans) -> str:
    """The sites' plans as a table, one row per site."""
    lines = [
        f"DP-SGD plan per site (the run stops above effective noise {plans.threshold:g}):",
        f"{'site':<16}{'σ':>8}{'rate':>7}{'batch':>8}{'steps/round':>12}{'steps':>7}{'ε target':>10}{'δ':>8}"
        f"{'noise/step':>12}{'trained':>10}{'noise/signal':>14}  verdict",
    ]
    for site, plan in plans.plans.items():
        lines.append(
            f"{site:<16}{plan['noise_multiplier']:>8.3f}{plan['sample_rate']:>7.3f}{plan['expected_batch']:>8.1f}"
            f"{plan['steps_per_round']:>12d}{plan['planned_steps']:>7d}{plan['target_epsilon']:>10.3f}"
            f"{plan['delta']:>8.0e}{plan['effective_noise']:>12.3f}{plan['trained_values']:>10d}"
            f"{plan.get('noise_to_signal', float('nan')):>14.1f}  {plans.verdict(site)}"
        )
    lines += [f"{site:<16}refused: {reason}" for site, reason in plans.refused.items()]
    return "\n".join(lines)


def stop_if_mostly_noise(plans: DpPlans, *, run: RunContext, server_round: int) -> None:
    """Raise MostlyNoiseError naming every site whose plan is mostly noise, and what would help."""
    noisy = plans.mostly_noise
    if not noisy:
        return
    sites = "; ".join(
        f"{site}: σ {plan['noise_multiplier']:.2f} on an expected batch of {plan['expected_batch']:.1f} cases, "
        f"effective noise {plan['effective_noise']:.2f}"
        for site, plan in ((site, plans.plans[site]) for site in noisy)
    )
    spent = (
        "no site has spent any ε (each stored its plan, nothing charged)"
        if server_round == 1
        else f"nothing is charged for round {server_round}"
    )
    raise MostlyNoiseError(
        f"DP-SGD would make the updates of {len(noisy)} site(s) mostly noise, so the run stops before round "
        f"{server_round}: {sites}. Effective noise is σ / expected batch, the noise on each step's mean clipped "
        f"gradient in units of the clipping norm; the run stops above {plans.threshold:g}. {spent.capitalize()}; "
        f"the plans are in {run.run_dir.path / DP_PLAN_FILE}. Options: fewer rounds (train.rounds, or "
        'train.local_epochs with [dp_sgd] steps = "epochs": fewer steps need less noise per step for the same ε); '
        "larger sites, or a larger [dp_sgd] batch_size where it is below a site's training cases (more cases "
        "per step average the noise down); pre-training ([pretrain], or model.init with pretrained weights) so "
        "that fewer private steps are needed; client-level DP ([client_dp]) across many sites instead of DP-SGD "
        "at each; or a larger ε ([dp_sgd] epsilon, within each site's budget)."
    )
