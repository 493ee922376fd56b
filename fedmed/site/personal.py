"""A site's own models beside the global one: Ditto's personal model, the fine-tune stopped early on the tuning
split, the choice of the delivered model, and the local-only baseline with the site's comparison.

None of these models leaves the site; what the coordinator learns is a site's scores on its own data, and of its
local-only model only what its policy shares.
"""

from __future__ import annotations

import copy
import json
import math
import time
from typing import TYPE_CHECKING

from torch import nn

from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic
from fedmed.core.log import logger
from fedmed.runs.summary import DELIVERED_PERSONALIZED
from fedmed.site.local_layers import (
    DITTO_FILE,
    DITTO_OPTIMIZER_FILE,
    LOCAL_ONLY_FILE,
    START_FILE,
    LocalParameterStore,
)
from fedmed.site.session import SiteSession, StateDict, site_seed

if TYPE_CHECKING:
    from fedmed.config import SitePrivacyPolicy

COMPARISON_FILE = "comparison.json"  # the site's own answer: federated, personalized, delivered, local-only
FINETUNE_PATIENCE = 2  # fine-tuning stops after this many epochs without a better score on the tuning split


def train_ditto(session: SiteSession, received: nn.Module, global_state: StateDict, *, server_round: int) -> dict:
    """Ditto (Li et al. 2021): the site's personal model takes this round's steps on its data, pulled towards
    the global weights just received with weight ditto_lambda. It is kept here and never sent."""
    from fedmed.tasks import train_local

    store = LocalParameterStore(session.spec.state_dir, file_name=DITTO_FILE)
    personal = session.personal_network
    personal.load_state_dict(store.load() or received.state_dict())
    trainable = {name for name, parameter in personal.named_parameters() if parameter.requires_grad}
    kept = session.kept_optimizer(DITTO_OPTIMIZER_FILE)
    with session.watch_steps(f"round {server_round} (Ditto)", epochs=session.config.train.local_epochs) as watch:
        result = train_local(
            personal,
            session.personal_training_cases,
            task=session.task,
            train=session.round_train_config(server_round),
            epochs=session.config.train.local_epochs,
            steps=session.config.train.local_steps,
            seed=site_seed(session.config.seed, f"{session.spec.name}/ditto", server_round),
            device=session.device,
            proximal_mu=session.config.evaluation.ditto_lambda,
            proximal_anchors={key: value for key, value in global_state.items() if key in trainable},
            optimizer_state=session.load_optimizer_state(kept),
            workers=session.config.data.workers,
            on_step=watch.step,
        )
    store.save(personal.state_dict())
    if kept is not None:
        kept.save(result.optimizer_state)
    return {"ditto_loss": result.loss, "ditto_seconds": result.seconds}


def local_baseline(
    session: SiteSession, global_state: StateDict, *, personalized: dict[str, float]
) -> dict[str, float] | None:
    """[evaluation] local_baseline: train a local-only model on this site's compute (if its policy allows) from
    the first global model it received, for the steps it took in the federation; write the site's comparison
    (federated, personalized, delivered, local-only on its own validation data) to its state folder. Returns
    the local-only metrics its policy shares with the coordinator (none under DP-SGD), or None when its policy
    refuses to train it."""
    from fedmed.tasks import train_local

    policy = session.spec.privacy.policy if session.spec.privacy is not None else None
    federated = session.evaluate(global_state)
    local_only: dict[str, float] | None = None
    shared: dict[str, float] | None = None
    if policy is None or policy.train_local_baseline:
        start = LocalParameterStore(session.spec.state_dir, file_name=START_FILE).load()
        if start is None:
            raise FedmedError(
                f"site {session.spec.name}: the run asks for a local-only baseline but {session.spec.state_dir} holds "
                "no starting model; this site never trained in this run (or its state folder was cleared)"
            )
        model = session.personal_network
        model.load_state_dict(start)
        train = session.config.train
        steps = train.rounds * train.local_steps if train.local_steps else None
        with session.watch_steps("local-only baseline", epochs=train.rounds * train.local_epochs) as watch:
            train_local(
                model,
                session.training_cases,
                task=session.task,
                train=train,
                epochs=train.rounds * train.local_epochs,
                steps=steps,
                seed=site_seed(session.config.seed, session.spec.name, 0),
                device=session.device,
                workers=session.config.data.workers,
                on_step=watch.step,
            )
        LocalParameterStore(session.spec.state_dir, file_name=LOCAL_ONLY_FILE).save(model.state_dict())
        local_only = session.score(model, started=time.perf_counter())
        shared = _shareable(session, local_only, policy=policy)
    _write_comparison(session, federated=federated, personalized=personalized, local_only=local_only, shared=shared)
    return shared


def _shareable(
    session: SiteSession, metrics: dict[str, float], *, policy: SitePrivacyPolicy | None
) -> dict[str, float]:
    """The local-only metrics the site's policy lets the coordinator see: none under DP-SGD (that model trained
    without it), all in a simulation (no policy), else the names the policy lists."""
    if session.privacy is not None and session.privacy.enabled:
        return {}
    allowed = "all" if policy is None else policy.share_local_baseline
    return {key: value for key, value in metrics.items() if allowed == "all" or key in allowed}


def _write_comparison(
    session: SiteSession,
    *,
    federated: dict[str, float],
    personalized: dict[str, float],
    local_only: dict[str, float] | None,
    shared: dict[str, float] | None,
) -> None:
    """Did federation help this site? Its models side by side on its own validation data, kept at the site."""
    metric, higher = session.task.primary_metric, session.task.higher_is_better
    chosen = personalized.get(DELIVERED_PERSONALIZED)
    delivered = personalized if chosen else federated
    personalizes = session.config.evaluation.personal_training or session.config.strategy.fedbn
    comparison = {
        "site": session.spec.name,
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
            f"federation {'helped' if helped else 'did not help'} site {session.spec.name}: its delivered "
            f"{comparison['delivered_model']} model scores {metric} {delivered[metric]:.4f} against "
            f"{local_only[metric]:.4f} for the model it trained alone ({gain:+.4f})"
        )
        logger.info("%s", comparison["answer"])
    write_text_atomic(session.spec.state_dir / COMPARISON_FILE, json.dumps(comparison, indent=1))


def _tuning_score(session: SiteSession, model: nn.Module) -> float:
    return float(session.task.evaluate(model, session.tuning_cases, device=session.device)[session.task.primary_metric])


def _better(session: SiteSession, score: float, than: float) -> bool:
    if math.isnan(score):
        return False
    return math.isnan(than) or (score > than if session.task.higher_is_better else score < than)


def personal_candidate(session: SiteSession, global_model: nn.Module, *, server_round: int) -> tuple[nn.Module, dict]:
    """The site's own model (Ditto's personal model, or the global one, then fine-tuned with early stopping on
    the tuning split) and the choice between it and the global model, made on the tuning split only."""
    candidate = session.personal_network
    candidate.load_state_dict(global_model.state_dict())
    if session.config.evaluation.ditto_lambda > 0:
        stored = LocalParameterStore(session.spec.state_dir, file_name=DITTO_FILE).load()
        if stored is None:
            raise FedmedError(
                f"site {session.spec.name}: the run trains a Ditto personal model but {session.spec.state_dir} holds "
                "none; this site never trained in this run (or its state folder was cleared)"
            )
        candidate.load_state_dict(stored)
    metric = session.task.primary_metric
    global_score = _tuning_score(session, global_model)
    score, tuned = _tuning_score(session, candidate), {}
    if session.config.evaluation.finetune_epochs:
        score, tuned = _finetune(session, candidate, start_score=score, server_round=server_round)
    chosen = _better(session, score, global_score)
    logger.info(
        "site %s: tuning %s global %.4f, personalized %.4f: delivers the %s model",
        session.spec.name,
        metric,
        global_score,
        score,
        "personalized" if chosen else "global",
    )
    return candidate, {
        f"tuning_{metric}_global": global_score,
        f"tuning_{metric}_personalized": score,
        "tuning_cases": len(session.tuning_cases),
        DELIVERED_PERSONALIZED: float(chosen),
        **tuned,
    }


def _finetune(session: SiteSession, model: nn.Module, *, start_score: float, server_round: int) -> tuple[float, dict]:
    """Fine-tune epoch by epoch on the training cases, keeping the state that scores best on the tuning split;
    stops after FINETUNE_PATIENCE epochs without improvement. The model is left at its best state."""
    from fedmed.tasks import train_local

    best_score, best_state, best_epoch = start_score, copy.deepcopy(model.state_dict()), 0
    optimizer_state, seconds, epoch = None, 0.0, 0
    for epoch in range(1, session.config.evaluation.finetune_epochs + 1):
        with session.watch_steps(f"fine-tuning epoch {epoch}", epochs=1) as watch:
            result = train_local(
                model,
                session.personal_training_cases,
                task=session.task,
                train=session.config.train,
                epochs=1,
                seed=site_seed(session.config.seed, session.spec.name, -server_round * 1000 - epoch),
                device=session.device,
                optimizer_state=optimizer_state,
                on_step=watch.step,
            )
        optimizer_state, seconds = result.optimizer_state, seconds + result.seconds
        score = _tuning_score(session, model)
        if _better(session, score, best_score):
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= FINETUNE_PATIENCE:
            break
    model.load_state_dict(best_state)
    tuned = {"finetune_epochs_run": epoch, "finetune_best_epoch": best_epoch, "finetune_seconds": seconds}
    return best_score, tuned
