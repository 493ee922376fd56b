"""Replies the coordinator refuses to use: implausible case counts, a diverged training loss, impossible metrics,
arrays that do not match what the round sent. Each is refused for its site alone, with the reason; the round goes
on with the rest."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedmed.config import RobustConfig
from fedmed.flower.records import sender
from fedmed.flower.wire import ARRAYS, METRICS
from fedmed.site.session import NUM_EXAMPLES

TRAIN_LOSS = "train_loss"  # fedmed.site.trainer's name for it
# Metrics that are fractions by definition (Dice, AUC, accuracy, ...), matched by name prefix.
FRACTION_METRICS = ("dice", "auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ssim", "f1")


def refuse_implausible(
    replies: list[Message], *, sent: ArrayRecord | None, settings: RobustConfig
) -> tuple[list[Message], dict[str, str]]:
    """The replies that pass, and the refused ones' reasons by site. `sent`: the round's global arrays (train)."""
    passed, refused = [], {}
    for reply in replies:
        reason = _metrics_problem(reply.content.get(METRICS), settings=settings, trained=sent is not None)
        if reason is None and sent is not None and ARRAYS in reply.content:
            reason = _arrays_problem(reply.content[ARRAYS], sent=sent)
        if reason is None:
            passed.append(reply)
        else:
            refused[sender(reply)] = f"site {sender(reply)}: reply refused by the coordinator: {reason}"
    return passed, refused


def _metrics_problem(metrics: object, *, settings: RobustConfig, trained: bool) -> str | None:
    if not isinstance(metrics, MetricRecord):
        return "it carries no metrics; the site runs a different fedmed version"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        # NaN is how a site says a metric is undefined on its cases (an AUC with one class, a Dice with no
        # lesion); a finite value outside a fraction's range is impossible.
        if key.lower().startswith(FRACTION_METRICS) and any(
            math.isfinite(float(v)) and not 0.0 <= float(v) <= 1.0 for v in values
        ):
            return f"metric '{key}' = {value!r} lies outside [0, 1], which no {key} can"
    loss = metrics.get(TRAIN_LOSS)
    if trained and isinstance(loss, int | float) and not math.isfinite(loss):
        return f"its training loss is {loss!r}; its training diverged or its data hold NaNs"
    cases = metrics.get(NUM_EXAMPLES)
    if cases is None:
        return f"it reports no '{NUM_EXAMPLES}'" if trained else None
    if isinstance(cases, list) or float(cases) != int(cases) or not 0 <= cases <= settings.max_cases:
        return (
            f"it claims {cases!r} cases, outside 0..{settings.max_cases} (robust.max_cases); a site's count must be "
            "a whole number of the cases it holds"
        )
    if trained and cases == 0:
        return "it trained on 0 cases"
    return None


def _arrays_problem(received: ArrayRecord, *, sent: ArrayRecord) -> str | None:
    if set(received.keys()) != set(sent.keys()):
        differ = sorted(set(received.keys()) ^ set(sent.keys()))
        return f"its update holds other parameters than the round sent ({differ[:3]}); it runs another model"
    for key, array in received.items():
        local, start = array.numpy(), sent[key]
        # Kinds, not exact dtypes: a server optimizer (FedAdam) sends float64 to sites that train in float32.
        if tuple(local.shape) != tuple(start.shape) or local.dtype.kind != np.dtype(start.dtype).kind:
            return (
                f"parameter '{key}' has shape {tuple(local.shape)} {local.dtype}, the round sent "
                f"{tuple(start.shape)} {start.dtype}; it runs another model"
            )
        if np.issubdtype(local.dtype, np.floating) and not np.isfinite(local).all():
            return f"parameter '{key}' holds NaN or infinite values; the site's training diverged"
    return None
