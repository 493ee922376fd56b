"""Final per-site comparison: federated against local-only and pooled baselines."""

from __future__ import annotations

import math
from typing import Any

from .cross_site import final_evaluation, local_only_model_name, personal_model_name
from .run_dir import BASELINES_FILE, DP_PLAN_FILE, STARTING_POINT_FILE, RunDirectory

COLUMNS = ("federated", "personalized", "delivered", "local_only", "pooled")
# Set by a site that trained a model of its own (fine-tune or Ditto): 1 when its personalized model beat the global one
# on its tuning split and is the model it delivers, 0 when it delivers the global one.
DELIVERED_PERSONALIZED = "delivered_personalized"


def final_federated_metrics(run_dir: RunDirectory) -> dict[str, dict[str, float]]:
    """The last evaluation of the global model at each site."""
    latest: dict[str, dict[str, Any]] = {}
    for row in run_dir.read_metrics():
        if row["phase"] == "evaluate":
            latest[row["site"]] = row
    return {site: {k: v for k, v in row.items() if k not in ("phase", "time", "site")} for site, row in latest.items()}


def personalized_metrics(run_dir: RunDirectory) -> dict[str, dict[str, float]]:
    """Each site's personalized model (global + its local layers, fine-tuned if asked) on its own data, from the
    final cross-site evaluation."""
    final = final_evaluation(run_dir)
    if final is None:
        return {}
    metrics = final["metrics"]
    return {
        site: metrics[personal_model_name(site)][site]
        for site in final["sites"]
        if site in metrics.get(personal_model_name(site), {})
    }


def delivered_model(federated: dict[str, float], personalized: dict[str, float] | None) -> dict[str, Any]:
    """The model a site delivers and its scores, when the site chose between global and personalized (on its tuning
    split, never on the validation data these scores come from); empty otherwise."""
    if not personalized or DELIVERED_PERSONALIZED not in personalized:
        return {}
    if personalized[DELIVERED_PERSONALIZED]:
        return {"delivered": personalized, "delivered_model": "personalized"}
    return {"delivered": federated, "delivered_model": "global"}


def site_local_baselines(run_dir: RunDirectory) -> dict[str, dict[str, float]]:
    """Local-only models the sites trained themselves ([evaluation] local_baseline), as far as each site's policy
    shares their metrics, from the final cross-site evaluation."""
    final = final_evaluation(run_dir)
    if final is None:
        return {}
    metrics = final["metrics"]
    homes = {site: metrics.get(local_only_model_name(site), {}) for site in final["sites"]}
    return {site: home[site] for site, home in homes.items() if site in home}


def federation_gains(
    table: dict[str, dict[str, Any]], *, primary_metric: str, higher_is_better: bool
) -> dict[str, float]:
    """Per site: what it delivers (or the global model) minus its local-only model, oriented so > 0 means
    federation helped; only where both scores are known."""
    gains = {}
    for site, row in table.items():
        ours = (row.get("delivered") or row.get("federated") or {}).get(primary_metric)
        alone = (row.get("local_only") or {}).get(primary_metric)
        if ours is not None and alone is not None and not math.isnan(ours) and not math.isnan(alone):
            gains[site] = (ours - alone) if higher_is_better else (alone - ours)
    return gains


def describe_gains(summary: dict[str, Any]) -> list[str]:
    """The answer a site asks first: did joining beat training alone?"""
    lines = []
    metric = summary.get("primary_metric", "")
    for site, gain in summary.get("gain_over_local_only", {}).items():
        row = summary["sites"][site]
        model = row.get("delivered_model", "global")
        ours = (row.get("delivered") or row["federated"])[metric]
        verdict = "helped" if gain >= 0 else "did not help"
        lines.append(
            f"{site:<16}federation {verdict}: delivered {model} model {metric} {ours:.3f} vs local-only "
            f"{row['local_only'][metric]:.3f} ({gain:+.3f})"
        )
    return lines


def privacy_spent(run_dir: RunDirectory) -> dict[str, dict[str, float]]:
    """Each site's DP-SGD spend as it last reported it: ε (cumulative for its dataset), δ, its budget."""
    spent: dict[str, dict[str, float]] = {}
    for row in run_dir.read_metrics():
        if row["phase"] == "train" and "epsilon" in row:
            spent[row["site"]] = {
                key: row[key] for key in ("epsilon", "delta", "epsilon_budget", "noise_multiplier") if key in row
            }
    return spent


def client_level_privacy(run_dir: RunDirectory) -> dict[str, float]:
    """Client-level DP: the participant-level (ε, δ) after the last recorded round, its sampling rate and noise."""
    rows = [row for row in run_dir.read_rounds() if "client_dp_epsilon" in row]
    if not rows:
        return {}
    last = rows[-1]
    return {
        "epsilon": last["client_dp_epsilon"],
        "delta": last["client_dp_delta"],
        "rounds": last["round"],
        "sample_rate": last["client_dp_sample_rate"],
        "noise_multiplier": last.get("client_dp_noise_multiplier", math.nan),
    }


def build_summary(run_dir: RunDirectory, *, primary_metric: str, higher_is_better: bool) -> dict[str, Any]:
    baselines = run_dir.read_json(BASELINES_FILE) or {}
    federated = final_federated_metrics(run_dir)
    personalized = personalized_metrics(run_dir)
    sites = sorted(federated)
    local_only = baselines.get("local_only") or site_local_baselines(run_dir)
    table = {
        site: {
            "federated": federated.get(site, {}),
            "personalized": personalized.get(site),
            **delivered_model(federated.get(site, {}), personalized.get(site)),
            "local_only": local_only.get(site),
            "pooled": baselines.get("pooled", {}).get(site),
        }
        for site in sites
    }
    summary = {"primary_metric": primary_metric, "higher_is_better": higher_is_better, "sites": table}
    if gains := federation_gains(table, primary_metric=primary_metric, higher_is_better=higher_is_better):
        summary["gain_over_local_only"] = gains
    if privacy := privacy_spent(run_dir):
        summary["privacy"] = privacy
    if client_level := client_level_privacy(run_dir):
        summary["client_privacy"] = client_level
    if dp_plan := run_dir.read_json(DP_PLAN_FILE):
        summary["dp_plan"] = dp_plan
    starting_point = run_dir.read_json(STARTING_POINT_FILE)
    if starting_point:
        summary["starting_point"] = starting_point
    summary["start"] = run_start(starting_point)
    for column in COLUMNS:
        values = [table[site][column][primary_metric] for site in sites if table[site].get(column)]
        finite = [value for value in values if not math.isnan(value)]
        if finite and len(values) == len(sites):
            worst = min(finite) if higher_is_better else max(finite)
            summary[column] = {"mean": sum(finite) / len(finite), "worst_site": worst}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    metric = summary["primary_metric"]
    columns = [column for column in COLUMNS if any(row.get(column) for row in summary["sites"].values())]
    header = f"{'site':<16}" + "".join(f"{column.replace('_', '-') + ' ' + metric:>22}" for column in columns)
    lines = describe_gains(summary)
    lines += [header, "-" * len(header)]
    for site, row in summary["sites"].items():
        cells = "".join(f"{_cell(row.get(column), metric):>22}" for column in columns)
        lines.append(f"{site:<16}{cells}")
    for label in ("mean", "worst_site"):
        cells = "".join(f"{_number(summary.get(column, {}).get(label)):>22}" for column in columns)
        lines.append(f"{label.replace('_', ' '):<16}{cells}")
    if line := describe_delivered(summary["sites"]):
        lines.append(line)
    if line := describe_starting_point(summary.get("starting_point"), start=summary.get("start")):
        lines.append(line)
    for site, spent in summary.get("privacy", {}).items():
        lines.append(
            f"{site:<16}DP-SGD ε {spent['epsilon']:.2f} of {spent.get('epsilon_budget', float('nan')):.2f} "
            f"(δ {spent.get('delta', float('nan')):.0e})"
        )
    if client := summary.get("client_privacy"):
        lines.append(describe_client_privacy(client))
    lines += describe_dp_plan(summary.get("dp_plan"))
    return "\n".join(lines)


def describe_delivered(sites: dict[str, dict[str, Any]]) -> str:
    """Which model each site delivers, chosen on its tuning split."""
    chosen = [f"{site} {row['delivered_model']}" for site, row in sites.items() if row.get("delivered_model")]
    if not chosen:
        return ""
    return "delivered (better on each site's training cases held out, not its validation data): " + ", ".join(chosen)


def describe_dp_plan(dp_plan: dict[str, Any] | None) -> list[str]:
    """One line per site: its DP-SGD plan (σ, expected batch, steps, effective noise) and the verdict on it, or its
    refusal (dp_plan.json, written before round 1)."""
    if not dp_plan:
        return []
    lines = []
    for site, plan in dp_plan.get("sites", {}).items():
        if "noise_multiplier" not in plan:
            lines.append(f"{site:<16}DP-SGD plan {plan.get('verdict', 'refused')}: {plan.get('reason', '')}")
            continue
        lines.append(
            f"{site:<16}DP-SGD plan σ {plan['noise_multiplier']:.2f}, expected batch {plan['expected_batch']:.1f}, "
            f"{plan['planned_steps']} step(s), effective noise {plan['effective_noise']:.2f} "
            f"(max {dp_plan.get('max_effective_noise', float('nan')):g}): {plan.get('verdict', '-')}"
        )
    return lines


def describe_client_privacy(client: dict[str, Any]) -> str:
    """One line: what client-level DP gave each participating site, as an (ε, δ) over the whole run."""
    return (
        f"client-level DP: ε {client['epsilon']:.2f} per site (δ {client['delta']:.0e}) after {client['rounds']} "
        f"round(s), sampling rate {client['sample_rate']:.2f}"
    )


START_KINDS = ("random", "synthetic pretraining", "public pretraining", "weights file")
PRETRAINING_KINDS = START_KINDS[1:3]


def run_start(starting_point: dict[str, Any] | None) -> dict[str, Any]:
    """The run's starting point for summary.json: {"kind": one of START_KINDS, ...}: the pretraining's cases,
    epochs, seed and held-out metric with its weights file and sha256 (public pretraining: the data set's name,
    path and digest too), or model.init's file and sha256. A run directory without starting_point.json (made
    before fedmed recorded random starts) started at random."""
    starting_point = starting_point or {}
    if pretraining := starting_point.get("pretraining"):
        kind = starting_point.get("kind")
        return {"kind": kind if kind in PRETRAINING_KINDS else "synthetic pretraining", **pretraining}
    if init := starting_point.get("init"):
        return {"kind": "weights file", "path": init.get("path"), "sha256": init.get("sha256")}
    start: dict[str, Any] = {"kind": "random"}
    if starting_point.get("seed") is not None:
        start["seed"] = starting_point["seed"]
    return start


def describe_starting_point(starting_point: dict[str, Any] | None, *, start: dict[str, Any] | None = None) -> str:
    """One line naming where the run started (random weights, synthetic or public pretraining with its held-out
    metric, or model.init's file with its sha256) and what it froze."""
    start = start or run_start(starting_point)
    starting_point = starting_point or {}
    if start["kind"] == "synthetic pretraining":
        line = (
            f"started from synthetic pretraining: {start.get('cases')} phantom cases × {start.get('epochs')} epoch(s) "
            f"(seed {start.get('seed')}), {start.get('metric')} {_number(start.get('value'))} on "
            f"{start.get('val_cases')} held-out phantoms (random init {_number(start.get('random_value'))}); "
            f"weights {start.get('file')} (sha256 {str(start.get('sha256'))[:16]})"
        )
    elif start["kind"] == "public pretraining":
        line = (
            f"started from public pretraining on {start.get('data_set')}: {start.get('cases')} cases × "
            f"{start.get('epochs')} epoch(s) (seed {start.get('seed')}; data {start.get('data_path')}, sha256 "
            f"{str(start.get('data_sha256'))[:16]}), {start.get('metric')} {_number(start.get('value'))} on its "
            f"{start.get('val_cases')} validation cases (random init {_number(start.get('random_value'))}); "
            f"weights {start.get('file')} (sha256 {str(start.get('sha256'))[:16]})"
        )
    elif start["kind"] == "weights file":
        line = f"started from {start['path']} (sha256 {str(start['sha256'])[:16]})"
    else:
        seed = f"seed {start['seed']}" if start.get("seed") is not None else "seed"
        line = f"started from random weights ({seed})"
    if starting_point.get("freeze"):
        line += (
            f"; frozen: {', '.join(starting_point['freeze'])} ({starting_point.get('frozen_parameters', 0)} "
            f"parameters, {starting_point.get('frozen_values', 0):,} values never trained or sent)"
        )
    return line


def _cell(metrics: dict[str, float] | None, metric: str) -> str:
    return _number(metrics.get(metric)) if metrics else "-"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else f"{value:.3f}"
