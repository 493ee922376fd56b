"""Baselines on the same data and budget as the federation.

local-only: each site trains alone for rounds x local_epochs epochs, or rounds x local_steps steps under a
step budget (the steps it takes in the federation), and is scored on its own validation split.
pooled: one model trains on all sites' training data together for rounds x local_epochs epochs, or
rounds x local_steps x sites steps (the samples the whole federation processes), and is scored on every
site's validation split.
Both return their models too, so the cross-site evaluation can score them on every site.
"""

from __future__ import annotations

import torch

from fedmed.config import RunConfig
from fedmed.core.log import logger
from fedmed.data.scan_site import pooled_training_set
from fedmed.models import InitialWeights, starting_model
from fedmed.site.session import NUM_EXAMPLES, site_seed
from fedmed.tasks import get_task, select_device, train_local


def _fresh_model(config: RunConfig, init: InitialWeights | None = None) -> torch.nn.Module:
    torch.manual_seed(config.seed)  # the federation's global model starts from this same init
    # model.init (or the run's pretrained weights, `init`) and model.freeze too: a baseline starts from the
    # federation's round-0 model, trained the same way.
    return starting_model(config.task, config.model, init=init).network


Models = dict[str, torch.nn.Module]
Scores = dict[str, dict[str, float]]


def local_only(config: RunConfig, sites: dict, *, init: InitialWeights | None = None) -> tuple[Scores, Models]:
    """sites: name -> fedmed.data.SiteData, normalized as the site's federated training saw it; `init`: the run's
    pretrained starting weights ([pretrain])."""
    task, device = get_task(config.task), select_device(config.train.device)
    epochs = config.train.rounds * config.train.local_epochs
    steps = config.train.rounds * config.train.local_steps if config.train.local_steps else None
    results, models = {}, {}
    for name, data in sites.items():
        model = _fresh_model(config, init)
        train_local(
            model,
            data.train,
            task=task,
            train=config.train,
            epochs=epochs,
            steps=steps,
            seed=site_seed(config.seed, name, 0),
            device=device,
        )
        results[name] = {NUM_EXAMPLES: len(data.val), **task.evaluate(model, data.val, device=device)}
        models[name] = model
        logger.info("local-only %s: %s %.3f", name, task.primary_metric, results[name][task.primary_metric])
    return results, models


def score_everywhere(config: RunConfig, model: torch.nn.Module, sites: dict) -> Scores:
    """One model on every site's validation split."""
    task, device = get_task(config.task), select_device(config.train.device)
    return {
        name: {NUM_EXAMPLES: len(data.val), **task.evaluate(model, data.val, device=device)}
        for name, data in sites.items()
    }


def pooled(config: RunConfig, sites: dict, *, init: InitialWeights | None = None) -> tuple[Scores, torch.nn.Module]:
    task, device = get_task(config.task), select_device(config.train.device)
    model = _fresh_model(config, init)
    samples = pooled_training_set([data.train for data in sites.values()])
    train_local(
        model,
        samples,
        task=task,
        train=config.train,
        epochs=config.train.rounds * config.train.local_epochs,
        steps=config.train.rounds * config.train.local_steps * len(sites) if config.train.local_steps else None,
        seed=site_seed(config.seed, "pooled", 0),
        device=device,
    )
    results = score_everywhere(config, model, sites)
    for name, metrics in results.items():
        logger.info("pooled on %s: %s %.3f", name, task.primary_metric, metrics[task.primary_metric])
    return results, model
