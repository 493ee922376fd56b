"""The model card exchange at the end of the run: temperature scaling and the out-of-distribution reference of the
final global model, fitted across the sites from sums and counts (fedmed.site.model_card), no case moving.

1. reference: every site returns the summed NLL of its validation cases at a fixed grid of temperatures, per
   calibration fold, and the sums of its training cases' pooled features; the server adds them up: the argmin is
   the temperature a pooled fit on the grid would choose, and the feature sums give the pooled mean and variance.
2. calibrate: with the reference and, per fold, the temperature fitted on the other fold sent back, every site
   returns reliability bins (before and after scaling: cross-fitted, so no case scores a temperature it helped fit)
   and a histogram of its validation cases' OOD scores; pooled, its 95th percentile is the OOD threshold.

A site that fails or vanishes is left out and named in the card's notes. Under DP-SGD or client-level DP the
exchange is skipped: these statistics are not privacy-protected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedmed.core.log import logger
from fedmed.flower.wire import (
    ARRAYS,
    CARD_FOLD_TEMPERATURES,
    CARD_OOD_GROUPS,
    CARD_OOD_MEAN,
    CARD_OOD_VAR,
    CARD_STATISTICS,
    CONFIG,
    MODEL_CARD_CALIBRATE,
    MODEL_CARD_REFERENCE,
    SERVER_ROUND,
    MessageType,
)
from fedmed.runs.model_card import ALL_SITES, ModelCard, write_model_card
from fedmed.site.model_card import (
    ASSESSED,
    BINS_AFTER,
    BINS_BEFORE,
    FEATURE_COUNT,
    FEATURE_GROUPS,
    FEATURE_SUM,
    FEATURE_SUMSQ,
    FOLDS,
    NLL,
    NLL_COUNT,
    OOD_COUNTS,
)
from fedmed.tasks.calibration import TEMPERATURES, ece, fit_temperature
from fedmed.tasks.ood import threshold_from_histogram

from .context import RunContext
from .exchange import ask_every_site

PURPOSE = "model card"


def build_model_card(run: RunContext, arrays: ArrayRecord) -> ModelCard | None:
    """Run both exchanges with the final global `arrays` and write model_card.json; None when switched off."""
    config = run.config
    if not config.evaluation.model_card:
        return None
    private = [
        name for name, on in (("DP-SGD", config.dp_sgd.enabled), ("client-level DP", config.client_dp.enabled)) if on
    ]
    if private:
        note = (
            f"skipped: the run trains with {' and '.join(private)}, and the model card's statistics (NLL sums, "
            "feature means) are not privacy-protected"
        )
        logger.info("model card %s", note)
        card = ModelCard(temperature=None, ood_mean=None, ood_var=None, ood_threshold=None, notes=[note])
        write_model_card(run.run_dir.path, card)
        return card
    notes: list[str] = []
    base = {**run.settings, SERVER_ROUND: config.train.rounds}
    references = _ask(run, arrays, MODEL_CARD_REFERENCE, settings=base, notes=notes)
    temperature, fold_temperatures = _temperatures(references, notes=notes)
    mean, var, groups = _feature_reference(references, notes=notes)
    settings = dict(base)
    if fold_temperatures is not None:
        settings[CARD_FOLD_TEMPERATURES] = fold_temperatures
    if mean is not None and var is not None:
        settings |= {CARD_OOD_MEAN: mean, CARD_OOD_VAR: var, CARD_OOD_GROUPS: groups}
    assessed = _ask(run, arrays, MODEL_CARD_CALIBRATE, settings=settings, notes=notes)
    calibration = _calibration(assessed)
    threshold = _threshold(assessed, notes=notes) if mean is not None else None
    card = ModelCard(
        temperature=temperature,
        ood_mean=mean,
        ood_var=var,
        ood_threshold=threshold,
        ood_groups=groups if mean is not None else None,
        calibration=calibration,
        notes=notes,
    )
    write_model_card(run.run_dir.path, card)
    pooled = calibration.get(ALL_SITES, {})
    logger.info(
        "model card: temperature %s, ECE %s -> %s, OOD threshold %s (%d site(s))",
        _shown(temperature),
        _shown(pooled.get("ece_before")),
        _shown(pooled.get("ece_after")),
        _shown(threshold),
        len(assessed),
    )
    return card


def _ask(
    run: RunContext, arrays: ArrayRecord, message_type: MessageType, *, settings: dict[str, Any], notes: list[str]
) -> dict[str, dict[str, Any]]:
    """Every site's statistics by site name; the sites that failed are noted and left out."""
    refused: dict[str, str] = {}
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(settings)})
    replies = ask_every_site(run, content, message_type=message_type, purpose=PURPOSE, refused=refused)
    answered = {site: dict(reply[CARD_STATISTICS]) for site, reply in replies.items() if CARD_STATISTICS in reply}
    silent = dict.fromkeys(run.site_names.values(), "no reply before the round timeout")
    for site, reason in sorted((silent | refused).items()):
        if site in answered:
            continue
        if site not in refused:  # ask_every_site logged the refusals
            logger.warning("%s: site %s did not reply to %s", PURPOSE, site, message_type.action)
        notes.append(f"{message_type.action}: site {site} left out ({reason})")
    return dict(sorted(answered.items()))


def _temperatures(
    references: dict[str, dict[str, Any]], *, notes: list[str]
) -> tuple[float | None, list[float] | None]:
    """The card's temperature (fitted on both calibration folds of every site) and, per fold, the temperature fitted
    on the other fold, which scores that fold's calibration after scaling."""
    grid = len(TEMPERATURES)
    sums = [np.asarray(stats[NLL], dtype=np.float64) for stats in references.values() if sum(stats.get(NLL_COUNT, []))]
    sums = [values.reshape(FOLDS, grid) for values in sums if len(values) == FOLDS * grid]
    if not sums:
        notes.append("no temperature: no site had calibration cases (or the task has no class probabilities)")
        return None, None
    by_fold = np.sum(sums, axis=0)
    temperature = fit_temperature(by_fold.sum(axis=0))
    counts = np.sum([stats[NLL_COUNT] for stats in references.values() if NLL in stats], axis=0)
    if not all(counts):  # a fold without cases (single-case sites only): the card's own temperature scores both
        notes.append("calibration after scaling scored in-sample: too few validation cases for two folds")
        return temperature, [temperature] * FOLDS
    return temperature, [fit_temperature(by_fold[1 - fold]) for fold in range(FOLDS)]


def _feature_reference(
    references: dict[str, dict[str, Any]], *, notes: list[str]
) -> tuple[list[float] | None, list[float] | None, list[int]]:
    rows = [stats for stats in references.values() if stats.get(FEATURE_COUNT)]
    layouts = {(len(stats[FEATURE_SUM]), tuple(stats.get(FEATURE_GROUPS) or [])) for stats in rows}
    if not rows or len(layouts) != 1:
        notes.append("no OOD reference: " + ("no site sent features" if not rows else "the sites' features differ"))
        return None, None, []
    count = float(sum(stats[FEATURE_COUNT] for stats in rows))
    mean = np.sum([np.asarray(stats[FEATURE_SUM]) for stats in rows], axis=0) / count
    squares = np.sum([np.asarray(stats[FEATURE_SUMSQ]) for stats in rows], axis=0) / count
    var = np.maximum(squares - mean**2, 0.0)
    return mean.tolist(), var.tolist(), [int(size) for size in rows[0].get(FEATURE_GROUPS) or []]


def _calibration(assessed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per site and pooled: assessed cases, ECE before and after scaling, and the reliability bins."""
    tables: dict[str, dict[str, np.ndarray]] = {}
    for site, stats in assessed.items():
        if BINS_BEFORE in stats:
            tables[site] = {
                key: np.asarray(stats[key]).reshape(3, -1) for key in (BINS_BEFORE, BINS_AFTER) if key in stats
            }
    if not tables:
        return {}
    pooled: dict[str, np.ndarray] = {}
    for key in (BINS_BEFORE, BINS_AFTER):
        if all(key in table for table in tables.values()):
            pooled[key] = np.sum([table[key] for table in tables.values()], axis=0)
    calibration = {site: _site_entry(table, assessed=assessed[site].get(ASSESSED, 0)) for site, table in tables.items()}
    calibration[ALL_SITES] = _site_entry(
        pooled, assessed=sum(int(stats.get(ASSESSED, 0)) for stats in assessed.values())
    )
    return calibration


def _site_entry(table: dict[str, np.ndarray], *, assessed: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"cases": int(assessed)}
    for key, name in ((BINS_BEFORE, "before"), (BINS_AFTER, "after")):
        if key in table:
            bins = table[key]
            entry[f"ece_{name}"] = ece(bins)
            entry[f"bins_{name}"] = {
                "count": bins[0].tolist(),
                "confidence": bins[1].tolist(),
                "correct": bins[2].tolist(),
            }
    return entry


def _threshold(assessed: dict[str, dict[str, Any]], *, notes: list[str]) -> float | None:
    histograms = [np.asarray(stats[OOD_COUNTS]) for stats in assessed.values() if OOD_COUNTS in stats]
    if not histograms:
        notes.append("no OOD threshold: no site scored validation cases")
        return None
    pooled = np.sum(histograms, axis=0)
    threshold = threshold_from_histogram(pooled)
    notes.append(
        f"OOD threshold: 95th percentile of {int(pooled.sum())} validation case score(s) from {len(histograms)} site(s)"
    )
    return threshold


def _shown(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4g}"
