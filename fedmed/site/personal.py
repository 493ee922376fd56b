"""A site's own models beside the global one: Ditto's personal model, the fine-tune stopped early on the tuning
split, and the choice of the delivered model (the local-only baseline: fedmed.site.local_baseline).

None of these models leaves the site; what the coordinator learns is a site's scores on its own data.
"""

from __future__ import annotations

import copy
import math

from torch import nn

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.runs.summary import DELIVERED_PERSONALIZED
from fedmed.site.fold_choice import cross_validated_finetune
from fedmed.site.local_layers import DITTO_FILE, DITTO_OPTIMIZER_FILE, LocalParameterStore
from fedmed.site.parts import SiteParts
from fedmed.site.spec import StateDict, site_seed
from fedmed.tasks import ProximalPull, train_local

FINETUNE_PATIENCE = 2  # fine-tuning stops after this many epochs without a better score on the tuning split


def train_ditto(site: SiteParts, received: nn.Module, global_state: StateDict, *, server_round: int) -> dict:
    """Ditto (Li et al. 2021): the site's personal model takes this round's steps on its data, pulled towards
    the global weights just received with weight ditto_lambda. It is kept here and never sent."""
    store = LocalParameterStore(site.spec.state_dir, file_name=DITTO_FILE)
    personal = site.models.personal_network
    personal.load_state_dict(store.load() or received.state_dict())
    trainable = {name for name, parameter in personal.named_parameters() if parameter.requires_grad}
    kept = site.models.kept_optimizer(DITTO_OPTIMIZER_FILE)
    with site.watch_steps(f"round {server_round} (Ditto)", epochs=site.config.train.local_epochs) as watch:
        result = train_local(
            personal,
            site.cases.personal_training_cases,
            task=site.task,
            train=site.round_train_config(server_round),
            epochs=site.config.train.local_epochs,
            steps=site.config.train.local_steps,
            seed=site_seed(site.config.seed, f"{site.spec.name}/ditto", server_round),
            device=site.device,
            loss_terms=[
                ProximalPull(
                    {key: value for key, value in global_state.items() if key in trainable},
                    mu=site.config.evaluation.ditto_lambda,
                )
            ],
            optimizer_state=site.models.load_optimizer_state(kept),
            workers=site.config.data.workers,
            on_step=watch.step,
        )
    store.save(personal.state_dict())
    if kept is not None:
        kept.save(result.optimizer_state)
    return {"ditto_loss": result.loss, "ditto_seconds": result.seconds}


def _tuning_score(site: SiteParts, model: nn.Module) -> float:
    return float(site.task.evaluate(model, site.cases.tuning_cases, device=site.device)[site.task.primary_metric])


def _better(site: SiteParts, score: float, than: float) -> bool:
    if math.isnan(score):
        return False
    return math.isnan(than) or (score > than if site.task.higher_is_better else score < than)


def personal_candidate(site: SiteParts, global_model: nn.Module, *, server_round: int) -> tuple[nn.Module, dict]:
    """The site's own model (Ditto's personal model, or the global one, then fine-tuned with early stopping on
    the tuning split) and the choice between it and the global model, made on the tuning split only."""
    candidate = site.models.personal_network
    candidate.load_state_dict(global_model.state_dict())
    if site.config.evaluation.ditto_lambda > 0:
        stored = LocalParameterStore(site.spec.state_dir, file_name=DITTO_FILE).load()
        if stored is None:
            raise FedmedError(
                f"site {site.spec.name}: the run trains a Ditto personal model but {site.spec.state_dir} holds "
                "none; this site never trained in this run (or its state folder was cleared)"
            )
        candidate.load_state_dict(stored)
    metric = site.task.primary_metric
    if site.config.evaluation.ditto_lambda == 0 and site.cases.training_case_count < 2:
        logger.warning(
            "site %s: %d training case, none to spare to judge a fine-tune by: delivers the global model",
            site.spec.name,
            site.cases.training_case_count,
        )
        return candidate, {DELIVERED_PERSONALIZED: 0.0, "tuning_cases": 0}
    if site.cases.cross_validated:
        global_score, score, tuned = _cross_validated(site, candidate, server_round=server_round)
    else:
        global_score = _tuning_score(site, global_model)
        score, tuned = _tuning_score(site, candidate), {"tuning_cases": len(site.cases.tuning_cases)}
        if site.config.evaluation.finetune_epochs:
            finetuned_score, finetuned = _finetune(site, candidate, start_score=score, server_round=server_round)
            score, tuned = finetuned_score, {**tuned, **finetuned}
    chosen = _better(site, score, global_score)
    logger.info(
        "site %s: %s %s global %.4f, personalized %.4f: delivers the %s model",
        site.spec.name,
        f"cross-validated ({tuned['choice_folds']} folds)" if "choice_folds" in tuned else "tuning",
        metric,
        global_score,
        score,
        "personalized" if chosen else "global",
    )
    return candidate, {
        f"tuning_{metric}_global": global_score,
        f"tuning_{metric}_personalized": score,
        DELIVERED_PERSONALIZED: float(chosen),
        **tuned,
    }


def _cross_validated(site: SiteParts, candidate: nn.Module, *, server_round: int) -> tuple[float, float, dict]:
    """A small site: the fine-tune's length and the choice from folds over every training case (fold_choice)."""
    choice = cross_validated_finetune(
        site,
        candidate,
        server_round=server_round,
        patience=FINETUNE_PATIENCE,
        better=lambda score, than: _better(site, score, than),
    )
    return (
        choice.global_score,
        choice.best_score,
        {
            "tuning_cases": choice.cases,
            "choice_folds": choice.folds,
            "finetune_epochs_run": len(choice.curve) - 1,
            "finetune_best_epoch": choice.best_epoch,
            "finetune_seconds": choice.seconds,
        },
    )


def _finetune(site: SiteParts, model: nn.Module, *, start_score: float, server_round: int) -> tuple[float, dict]:
    """Fine-tune epoch by epoch on the training cases, keeping the state that scores best on the tuning split;
    stops after FINETUNE_PATIENCE epochs without improvement. The model is left at its best state."""
    best_score, best_state, best_epoch = start_score, copy.deepcopy(model.state_dict()), 0
    optimizer_state, seconds, epoch = None, 0.0, 0
    for epoch in range(1, site.config.evaluation.finetune_epochs + 1):
        with site.watch_steps(f"fine-tuning epoch {epoch}", epochs=1) as watch:
            result = train_local(
                model,
                site.cases.personal_training_cases,
                task=site.task,
                train=site.config.train,
                epochs=1,
                seed=site_seed(site.config.seed, site.spec.name, -server_round * 1000 - epoch),
                device=site.device,
                optimizer_state=optimizer_state,
                on_step=watch.step,
            )
        optimizer_state, seconds = result.optimizer_state, seconds + result.seconds
        score = _tuning_score(site, model)
        if _better(site, score, best_score):
            best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
        elif epoch - best_epoch >= FINETUNE_PATIENCE:
            break
    model.load_state_dict(best_state)
    tuned = {"finetune_epochs_run": epoch, "finetune_best_epoch": best_epoch, "finetune_seconds": seconds}
    return best_score, tuned
