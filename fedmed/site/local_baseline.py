"""The local-only baseline ([evaluation] local_baseline): a model a site trains on its data alone, and its
comparison with the federation's models (did federation help this site?), kept at the site.

The coordinator learns of the local-only model only the metrics the site's policy shares.
"""

from __future__ import annotations

import json
import time

from fedmed.config import SitePrivacyPolicy
from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.runs.summary import DELIVERED_PERSONALIZED
from fedmed.site.local_layers import LOCAL_ONLY_FILE, START_FILE, LocalParameterStore
from fedmed.site.parts import SiteParts
from fedmed.site.session import SiteSession
from fedmed.site.spec import StateDict, site_seed
from fedmed.site.trainer import SiteTrainer
from fedmed.tasks import train_local

COMPARISON_FILE = "comparison.json"  # the site's own answer: federated, personalized, delivered, local-only


def local_baseline(
    session: SiteSession, global_state: StateDict, *, personalized: dict[str, float]
) -> dict[str, float] | None:
    """[evaluation] local_baseline: train a local-only model on this site's compute (if its policy allows) from
    the first global model it received, for the steps it took in the federation; write the site's comparison
    (federated, personalized, delivered, local-only on its own validation data) to its state folder. Returns
    the local-only metrics its policy shares with the coordinator (none under DP-SGD), or None when its policy
    refuses to train it."""
    site, trainer = session.parts, session.trainer
    policy = site.spec.privacy.policy if site.spec.privacy is not None else None
    federated = trainer.evaluate(global_state)
    local_only: dict[str, float] | None = None
    shared: dict[str, float] | None = None
    if policy is None or policy.train_local_baseline:
        start = LocalParameterStore(site.spec.state_dir, file_name=START_FILE).load()
        if start is None:
            raise FedmedError(
                f"site {site.spec.name}: the run asks for a local-only baseline but {site.spec.state_dir} holds "
                "no starting model; this site never trained in this run (or its state folder was cleared)"
            )
        model = site.models.personal_network
        model.load_state_dict(start)
        train = site.config.train
        steps = train.rounds * train.local_steps if train.local_steps else None
        with site.watch_steps("local-only baseline", epochs=train.rounds * train.local_epochs) as watch:
            train_local(
                model,
                site.cases.training_cases,
                task=site.task,
                train=train,
                epochs=train.rounds * train.local_epochs,
                steps=steps,
                seed=site_seed(site.config.seed, site.spec.name, 0),
                device=site.device,
                workers=site.config.data.workers,
                on_step=watch.step,
            )
        LocalParameterStore(site.spec.state_dir, file_name=LOCAL_ONLY_FILE).save(model.state_dict())
        local_only = trainer.score(model, started=time.perf_counter())
        shared = _shareable(trainer, local_only, policy=policy)
    _write_comparison(site, federated=federated, personalized=personalized, local_only=local_only, shared=shared)
    return shared


def _shareable(
    trainer: SiteTrainer, metrics: dict[str, float], *, policy: SitePrivacyPolicy | None
) -> dict[str, float]:
    """The local-only metrics the site's policy lets the coordinator see: none under DP-SGD (that model trained
    without it), all in a simulation (no policy), else the names the policy lists."""
    if trainer.private:
        return {}
    allowed = "all" if policy is None else policy.share_local_baseline
    return {key: value for key, value in metrics.items() if allowed == "all" or key in allowed}


def _write_comparison(
    site: SiteParts,
    *,
    federated: dict[str, float],
    personalized: dict[str, float],
    local_only: dict[str, float] | None,
    shared: dict[str, float] | None,
) -> None:
    """Did federation help this site? Its models side by side on its own validation data, kept at the site."""
    metric, higher = site.task.primary_metric, site.task.higher_is_better
    chosen = personalized.get(DELIVERED_PERSONALIZED)
    delivered = personalized if chosen else federated
    personalizes = site.config.evaluation.personal_training or site.config.strategy.fedbn
    comparison = {
        "site": site.spec.name,
        "metric": metric,
        "higher_is_better": higher,
        "federated": federated,
        "personalized": personalized if personalizes else None,
        "delivered_model": "personalized" if chosen else "global",
        "local_only": local_only,
        "local_only_shared_with_coordinator": sorted(shared or {}),
    }
    if local_only is not None:
        gain = delivered[metric] - local_only[metric]
        helped = gain >= 0 if higher else gain <= 0
        comparison["answer"] = (
            f"federation {'helped' if helped else 'did not help'} site {site.spec.name}: its delivered "
            f"{comparison['delivered_model']} model scores {metric} {delivered[metric]:.4f} against "
            f"{local_only[metric]:.4f} for the model it trained alone ({gain:+.4f})"
        )
        logger.info("%s", comparison["answer"])
    write_text_atomic(site.spec.state_dir / COMPARISON_FILE, json.dumps(comparison, indent=1))
