"""Cross-site evaluation: the global model and every site's personalized model on every site's data.

Two exchanges. First each site builds its personalized model (global weights + its site-local layers,
fine-tuned on its own data at the end of the run if the config asks), scores it on its own validation
data and, if its policy lets it, returns the personal parameters. Then every site scores the global
model and the shared personalized models on its validation data. Under FedBN the global model has no
normalization layers of its own, so each site scores it with its own, as in every round.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedmed.config import RunConfig
from fedmed.runs import RunDirectory

from .exchange import ask_every_site
from .protocol import ARRAYS, CONFIG, METRICS

PERSONALIZE_MESSAGE_TYPE = "query.personalize"
EVALUATE_MESSAGE_TYPE = "query.cross_evaluate"
PERSONAL = "personal"  # ArrayRecord: a site's personal parameters, packed in its personal layout
FINAL = "final"  # the end-of-run evaluation, where a site fine-tunes if the run asks
MODELS = "models"  # config: names of the personalized models in the message, in order
RUN_FILE = "cross_site.json"
GLOBAL = "global"


def personal_model_name(site: str) -> str:
    return f"personalized:{site}"


def personal_record_key(index: int) -> str:
    return f"{PERSONAL}-{index}"


def personalizes(config: RunConfig, *, final: bool) -> bool:
    """Whether a site's personalized model differs from the global one at this evaluation."""
    return config.strategy.fedbn or (final and config.evaluation.finetune_epochs > 0)


def cross_site_evaluation(grid: Grid, arrays: ArrayRecord, *, server_round: int, final: bool, config: RunConfig,
                          settings: dict[str, Any], run_dir: RunDirectory,
                          site_names: dict[int, str]) -> dict[str, Any]:
    """Run both exchanges and append the sites x models matrix to the run's cross_site.json.

    `settings`: the round config every message carries (layout digest, Nyúl landmarks)."""
    base = {**settings, "server-round": server_round}
    metrics: dict[str, dict[str, dict[str, float]]] = {GLOBAL: {}}
    personal: dict[str, ArrayRecord] = {}
    if personalizes(config, final=final):
        replies = _exchange(grid, arrays, message_type=PERSONALIZE_MESSAGE_TYPE, config=config,
                            site_names=site_names, settings={**base, FINAL: final}, extra={})
        for site, reply in replies.items():
            metrics.setdefault(personal_model_name(site), {})[site] = dict(reply[METRICS])
            if PERSONAL in reply:
                personal[site] = reply[PERSONAL]
    sites_in_order = sorted(personal)
    extra = {personal_record_key(index): personal[site] for index, site in enumerate(sites_in_order)}
    models = [personal_model_name(site) for site in sites_in_order]
    replies = _exchange(grid, arrays, message_type=EVALUATE_MESSAGE_TYPE, config=config, site_names=site_names,
                        settings={**base, MODELS: models, FINAL: final}, extra=extra)
    for site, reply in replies.items():
        for name in [GLOBAL, *models]:
            key = f"{METRICS}-{name}"
            if key in reply:
                metrics.setdefault(name, {})[site] = dict(reply[key])
    metrics = {GLOBAL: metrics.pop(GLOBAL), **dict(sorted(metrics.items()))}
    evaluation = {"round": server_round, "final": final, "models": list(metrics),
                  "sites": sorted({site for by_site in metrics.values() for site in by_site}), "metrics": metrics}
    record_evaluation(run_dir, evaluation, config=config)
    return evaluation


def record_evaluation(run_dir: RunDirectory, evaluation: dict[str, Any], *, config: RunConfig) -> None:
    """Add (or replace, for a resumed run) the evaluation of this round in cross_site.json."""
    from fedmed.tasks import get_task

    task = get_task(config.task)
    recorded = run_dir.read_json(RUN_FILE) or {"metric": task.primary_metric,
                                               "higher_is_better": task.higher_is_better, "evaluations": []}
    recorded["evaluations"] = [entry for entry in recorded["evaluations"] if entry["round"] != evaluation["round"]]
    recorded["evaluations"].append(evaluation)
    recorded["evaluations"].sort(key=lambda entry: entry["round"])
    run_dir.write_json(RUN_FILE, recorded)


def _exchange(grid: Grid, arrays: ArrayRecord, *, message_type: str, config: RunConfig,
              site_names: dict[int, str], settings: dict[str, Any],
              extra: dict[str, ArrayRecord]) -> dict[str, RecordDict]:
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(settings), **extra})
    return ask_every_site(grid, content, message_type=message_type, timeout=config.strategy.round_timeout_s,
                          site_names=site_names, purpose="cross-site evaluation")
