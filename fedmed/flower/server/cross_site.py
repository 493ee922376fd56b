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

from fedmed.config import RunConfig
from fedmed.flower.wire import (
    ARRAYS,
    CONFIG,
    CROSS_EVALUATE,
    FINAL,
    LOCAL_BASELINE,
    METRICS,
    MODELS,
    PERSONAL,
    PERSONALIZE,
    SERVER_ROUND,
    MessageType,
    model_metrics_record,
    personal_record,
)
from fedmed.runs.cross_site import GLOBAL_MODEL, local_only_model_name, personal_model_name, record_evaluation

from .context import RunContext
from .exchange import ask_every_site


def personalizes(config: RunConfig, *, final: bool) -> bool:
    """Whether a site's personalized model differs from the global one at this evaluation."""
    return config.strategy.fedbn or (final and config.evaluation.personal_training)


def cross_site_evaluation(run: RunContext, arrays: ArrayRecord, *, server_round: int, final: bool) -> dict[str, Any]:
    """Run both exchanges and append the sites x models matrix to the run's cross_site.json."""
    base = {**run.settings, SERVER_ROUND: server_round}
    metrics: dict[str, dict[str, dict[str, float]]] = {GLOBAL_MODEL: {}}
    personal: dict[str, ArrayRecord] = {}
    personalized = personalizes(run.config, final=final)
    # The sites train their local-only baselines in the same exchange, on their own compute.
    if personalized or (final and run.config.evaluation.local_baseline):
        replies = _exchange(run, arrays, message_type=PERSONALIZE, settings={**base, FINAL: final}, extra={})
        for site, reply in replies.items():
            if LOCAL_BASELINE in reply:  # scored at home only: the model never leaves its site
                metrics.setdefault(local_only_model_name(site), {})[site] = dict(reply[LOCAL_BASELINE])
            if not personalized:
                continue
            metrics.setdefault(personal_model_name(site), {})[site] = dict(reply[METRICS])
            if PERSONAL in reply:
                personal[site] = reply[PERSONAL]
    sites_in_order = sorted(personal)
    extra = {personal_record(index): personal[site] for index, site in enumerate(sites_in_order)}
    models = [personal_model_name(site) for site in sites_in_order]
    replies = _exchange(
        run, arrays, message_type=CROSS_EVALUATE, settings={**base, MODELS: models, FINAL: final}, extra=extra
    )
    for site, reply in replies.items():
        for name in [GLOBAL_MODEL, *models]:
            key = model_metrics_record(name)
            if key in reply:
                metrics.setdefault(name, {})[site] = dict(reply[key])
    metrics = {GLOBAL_MODEL: metrics.pop(GLOBAL_MODEL), **dict(sorted(metrics.items()))}
    evaluation = {
        "round": server_round,
        "final": final,
        "models": list(metrics),
        "sites": sorted({site for by_site in metrics.values() for site in by_site}),
        "metrics": metrics,
    }
    task = run.task
    record_evaluation(run.run_dir, evaluation, metric=task.primary_metric, higher_is_better=task.higher_is_better)
    return evaluation


def _exchange(
    run: RunContext,
    arrays: ArrayRecord,
    *,
    message_type: MessageType,
    settings: dict[str, Any],
    extra: dict[str, ArrayRecord],
) -> dict[str, RecordDict]:
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(settings), **extra})
    return ask_every_site(run, content, message_type=message_type, purpose="cross-site evaluation")
