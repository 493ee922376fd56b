"""A site's part of the model card (fedmed.runs.model_card): statistics of the final global model on its own data.

Two exchanges at the end of the run, each answered with sums and counts only, never a case:
1. reference: the summed NLL of its validation cases at every grid temperature (fedmed.tasks.calibration), for each
   of two folds, and the per-dimension sum and sum of squares of its training cases' pooled deepest features
   (fedmed.tasks.ood);
2. calibrate: with the temperatures and the feature reference, the reliability bins of its validation cases before
   and after scaling, and the histogram of their OOD scores.

Calibration is fitted on the validation cases, cross-fitted: each case falls in one of two seeded folds, and its
calibration after scaling is scored with the temperature fitted on the other fold (of every site), so no case
judges a temperature it helped choose, and every case is scored. The card's temperature is fitted on both folds.
Not the run's tuning split: that is part of what the federation trained on, so a temperature fitted there would
come out too low. Under FedBN the global model carries the site's own normalization layers, as when it is
evaluated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.data.scan_site import PatchDataset
from fedmed.data.tuning import tuning_split
from fedmed.site.session import SiteSession
from fedmed.site.spec import StateDict
from fedmed.tasks.calibration import (
    RELIABILITY_BINS,
    TEMPERATURES,
    case_outputs,
    nll_sums,
    reliability_bins,
    scored_pairs,
)
from fedmed.tasks.ood import ood_score, score_histogram

# Keys of a site's reply (a MetricRecord of numbers and lists of numbers).
NLL = "nll"  # summed NLL per grid temperature, fold 0's then fold 1's
NLL_COUNT = "nll-count"  # per fold: cases (classification) or voxels (segmentation) in the sums
FEATURE_SUM = "feature-sum"
FEATURE_SUMSQ = "feature-sumsq"
FEATURE_COUNT = "feature-count"
FEATURE_GROUPS = "feature-groups"  # the lengths of the feature vector's parts (fedmed.tasks.ood)
BINS_BEFORE = "bins-before"  # reliability bins, flattened rows: count, sum of confidences, number correct
BINS_AFTER = "bins-after"
OOD_COUNTS = "ood-counts"  # validation cases per OOD score bin (fedmed.tasks.ood.OOD_SCORE_EDGES)
ASSESSED = "assessed-cases"
FOLDS = 2

CALIBRATED_TASKS = ("classification", "segmentation")
MAX_REFERENCE_CASES = 2048  # training cases whose features form the reference, spread evenly over the site's

Statistics = dict[str, Any]


class ModelCardRefusedError(FedmedError):
    """The site does not share model-card statistics in this run."""


def reference_statistics(session: SiteSession, global_state: StateDict) -> Statistics:
    """Per calibration fold, the NLL sums of its validation cases at every grid temperature; feature sums over the
    training cases."""
    _check_shareable(session)
    model, _ = session.parts.models.model_with(global_state)
    statistics: Statistics = {}
    validation = _scored_validation(session, model, global_state)
    if _calibrates(session):
        folds = calibration_folds(session)
        totals, counts = np.zeros((FOLDS, len(TEMPERATURES))), [0] * FOLDS
        for index, case in enumerate(validation):
            if case.labels is not None:
                totals[folds[index]] += nll_sums(case.logits, case.labels)
                counts[folds[index]] += len(case.labels)
        statistics |= {NLL: totals.reshape(-1).tolist(), NLL_COUNT: counts}
    # Whole training volumes where the site trains on patches: the reference must see a case as prediction does.
    training = getattr(session.data, "train_volumes", None) or session.training_cases
    indices = _reference_indices(training)
    outputs = list(case_outputs(model, training, indices=indices, device=session.device))
    vectors = [case.features for case in outputs]
    if vectors:
        stacked = np.stack(vectors)
        statistics |= {
            FEATURE_SUM: stacked.sum(axis=0).tolist(),
            FEATURE_SUMSQ: (stacked**2).sum(axis=0).tolist(),
            FEATURE_COUNT: len(vectors),
            FEATURE_GROUPS: list(outputs[0].feature_groups),
        }
    logger.info("site %s: model card reference from %d training case(s)", session.spec.name, len(vectors))
    return statistics


def calibration_statistics(
    session: SiteSession,
    global_state: StateDict,
    *,
    fold_temperatures: list[float] | None,
    reference: tuple[list[float], list[float], list[int]] | None,
) -> Statistics:
    """Reliability bins of the validation cases before scaling and after it, each fold's cases with the temperature
    `fold_temperatures` gives it (fitted on the other fold); the histogram of their OOD scores against `reference`
    (the pooled features' mean, variance and the lengths of the vector's parts)."""
    _check_shareable(session)
    model, _ = session.parts.models.model_with(global_state)
    calibrates = _calibrates(session)
    folds = calibration_folds(session)
    before, after = np.zeros((3, RELIABILITY_BINS)), np.zeros((3, RELIABILITY_BINS))
    scores: list[float] = []
    assessed = 0
    for index, case in enumerate(_scored_validation(session, model, global_state)):
        if reference is not None:
            mean, var, groups = reference
            scores.append(ood_score(case.features, mean=mean, var=var, groups=groups))
        if not calibrates or case.labels is None:
            continue
        assessed += 1
        before += reliability_bins(torch.softmax(case.logits, dim=1), case.labels)
        if fold_temperatures is not None:
            scaled = torch.softmax(case.logits / fold_temperatures[folds[index]], dim=1)
            after += reliability_bins(scaled, case.labels)
    _scored_cache.pop(id(session), None)  # the last exchange that needs them
    statistics: Statistics = {ASSESSED: assessed}
    if calibrates:
        statistics[BINS_BEFORE] = before.reshape(-1).tolist()
        if fold_temperatures is not None:
            statistics[BINS_AFTER] = after.reshape(-1).tolist()
    if scores:
        statistics[OOD_COUNTS] = score_histogram(scores).tolist()
    return statistics


def calibration_folds(session: SiteSession) -> list[int]:
    """The calibration fold (0 or 1) of each of the site's validation cases: a seeded half each, fixed by the run's
    seed and the site (a single case is in fold 1)."""
    count = len(session.data.val)
    if count < 2:
        return [1] * count
    _, fold_zero = tuning_split(count, fraction=0.5, seed=session.config.seed, site=f"{session.spec.name}/calibration")
    zero = set(fold_zero)
    return [0 if index in zero else 1 for index in range(count)]


@dataclass
class _ScoredCase:
    """What the model card keeps of one validation case between its two exchanges: the scored rows of logits and
    their labels (None without a label or for a task without classes) and the case's feature vector."""

    logits: torch.Tensor | None
    labels: torch.Tensor | None
    features: np.ndarray


# One site's validation cases through the final model, from the reference exchange to the calibrate exchange: a
# whole-volume pass over the validation cases costs as much as a round's evaluation, so it is made once.
_scored_cache: dict[int, tuple[str, list[_ScoredCase]]] = {}


def _scored_validation(session: SiteSession, model: torch.nn.Module, global_state: StateDict) -> list[_ScoredCase]:
    digest = _digest(global_state)
    cached = _scored_cache.get(id(session))
    if cached is not None and cached[0] == digest:
        return cached[1]
    validation = session.data.val
    kind = session.config.task.kind
    scored = []
    for case in case_outputs(
        model, validation, indices=range(len(validation)), device=session.device, binarize_labels=_binarize(session)
    ):
        logits, labels = (None, None)
        if _calibrates(session) and case.label is not None:
            logits, labels = scored_pairs(case.output, case.label, kind=kind)
        scored.append(_ScoredCase(logits=logits, labels=labels, features=case.features))
    _scored_cache[id(session)] = (digest, scored)  # one entry per session: replaced, never piled up
    return scored


def _digest(state: StateDict) -> str:
    hashed = hashlib.sha256()
    for key in sorted(state):
        hashed.update(key.encode())
        hashed.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hashed.hexdigest()


def _binarize(session: SiteSession) -> bool:
    return bool(session.config.task.binarize_labels)


def _calibrates(session: SiteSession) -> bool:
    return session.config.task.kind in CALIBRATED_TASKS


def _reference_indices(training: Sequence) -> list[int]:
    """One index per training case (patch datasets: the first patch of each), at most MAX_REFERENCE_CASES spread
    evenly."""
    if isinstance(training, PatchDataset):
        cases = [case * training.samples_per_volume for case in range(training.num_cases)]
    else:
        cases = list(range(len(training)))
    if len(cases) <= MAX_REFERENCE_CASES:
        return cases
    return [cases[int(position)] for position in np.linspace(0, len(cases) - 1, MAX_REFERENCE_CASES)]


def _check_shareable(session: SiteSession) -> None:
    """These statistics are not privacy-protected: a private run's site refuses them, whatever the coordinator asks."""
    config = session.config
    if config.dp_sgd.enabled or config.client_dp.enabled:
        raise ModelCardRefusedError(
            f"site {session.spec.name}: the run trains with differential privacy, and model-card statistics (NLL "
            "sums, feature means) are not privacy-protected; set evaluation.model_card = false for private runs"
        )
