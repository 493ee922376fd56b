"""The site's four SecAgg+ stages. The protocol is fedmed.secagg's; this carries its messages and
keeps the site's secrets between stages in the node's context (each stage may run in a new process)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.wire import ARRAYS, CONFIG, MASKED, METRICS, SECAGG, VECTOR
from fedmed.secagg import SecAggClient
from fedmed.secagg.encoding import l2_norm
from fedmed.site.compression import ErrorFeedback
from fedmed.site.session import NUM_EXAMPLES

from .audit import UPDATE_BOUNDED, record_site_event
from .common import log_start_up, refuse, reply, train_round
from .mods import clip_update_inplace
from .site_context import site_session

STATE = "fedmed-secagg"  # the node context's record of this site's SecAgg+ secrets (never sent)


def setup(msg: Message, context: Context) -> Message:
    return _stage(msg, context, lambda client, body: client.setup(body))


def share_keys(msg: Message, context: Context) -> Message:
    return _stage(msg, context, lambda client, body: client.share_keys(body))


def unmask(msg: Message, context: Context) -> Message:
    return _stage(msg, context, lambda client, body: client.unmask(body))


def mask(msg: Message, context: Context) -> Message:
    """Train, then send only the masked update (local - global); see fedmed.flower.server.secure_round."""
    log_start_up()
    started = time.perf_counter()
    try:
        session, layout, server_round, trained, metrics = train_round(msg, context)
        round_config = msg.content[CONFIG]
        sent = msg.content[ARRAYS].to_numpy_ndarrays()
        update = [
            np.subtract(local, start, dtype=np.float32)
            for local, start in zip(layout.pack(trained).to_numpy_ndarrays(), sent, strict=True)
        ]
        compression = session.config.compression
        # A 16-bit field: the site's error feedback carries what its quantization (and clipping) left out.
        feedback = (
            ErrorFeedback(session.spec.state_dir) if compression.bits == 16 and compression.error_feedback else None
        )
        if feedback is not None:
            feedback.add_to(dict(zip(msg.content[ARRAYS].keys(), update, strict=True)))  # in place
        extra = None
        if KEY_CLIPPING_NORM in round_config:
            clipped = clip_update_inplace(update, clipping_norm=float(round_config[KEY_CLIPPING_NORM]))
            extra = [int(clipped)]
        bound = session.config.robust.update_norm_bound
        if bound is not None:
            _bound_update(msg, context, update, bound=bound, site=session.spec.name, server_round=server_round)
        client = _client(context)
        examples = int(metrics.pop(NUM_EXAMPLES))
        # Over a 16-bit field every site counts once: the field holds no room for case counts as weights.
        weight = 1 if compression.bits == 16 else examples
        vector, fields = client.mask(dict(msg.content[SECAGG]), update=update, weight=weight, extra_counts=extra)
        if feedback is not None:
            _keep_residual(
                feedback, client.contribution(update), update=update, groups=list(msg.content[ARRAYS].keys())
            )
        _keep(context, client)
    except FedmedError as error:
        return refuse(msg, error)
    if client.last_clipped_values:
        logger.warning(
            "site %s: %d update value(s) clipped to secagg.clipping_range",
            session.spec.name,
            client.last_clipped_values,
        )
    logger.debug(  # per site and round: shown with -v
        "site %s: round %d trained and masked in %.2f s", session.spec.name, server_round, time.perf_counter() - started
    )
    return reply(
        msg,
        session,
        {MASKED: ArrayRecord({VECTOR: Array(vector)}), SECAGG: ConfigRecord(fields), METRICS: MetricRecord(metrics)},
    )


def _keep_residual(
    feedback: ErrorFeedback, contributed: np.ndarray, *, update: list[np.ndarray], groups: list[str]
) -> None:
    """What the site's clipped, quantized contribution left out of its update, for the next round."""
    offsets = np.cumsum([0, *(array.size for array in update)])
    feedback.keep(
        {group: array.reshape(-1) for group, array in zip(groups, update, strict=True)},
        sent={group: contributed[offsets[i] : offsets[i + 1]] for i, group in enumerate(groups)},
    )


def bound_update_inplace(update: Sequence[np.ndarray], *, bound: float) -> float | None:
    """Scale the update down to L2 norm `bound` if it is longer; its measured norm when it was, else None.

    Scaled in float64 and stored back in the update's dtype: each value moves by at most one float32 rounding
    (relative 2^-24), which the coordinator's check allows for (fedmed.flower.server.secure_round)."""
    norm = l2_norm(update)
    if not math.isfinite(norm) or norm <= bound:
        return None  # a NaN or infinite update is refused, with the reason, by the SecAgg+ encoder
    scale = bound / norm
    for array in update:
        array[...] = (array.astype(np.float64) * scale).astype(array.dtype)
    return norm


def _bound_update(
    msg: Message, context: Context, update: list[np.ndarray], *, bound: float, site: str, server_round: int
) -> None:
    """robust.update_norm_bound, enforced by the site's own code: the coordinator sees only the masked sum, so
    this is the one place a single update's norm can be bounded; the longer update never leaves the site."""
    measured = bound_update_inplace(update, bound=bound)
    if measured is None:
        return
    logger.warning(
        "site %s: round %d update norm %.6g is over robust.update_norm_bound %g; scaled down to the bound before "
        "masking",
        site,
        server_round,
        measured,
        bound,
    )
    # The norm stays in the site's own log: the coordinator must not learn one site's update norm.
    record_site_event(
        msg,
        context,
        UPDATE_BOUNDED,
        update_norm=measured,
        update_norm_bound=bound,
        reason=f"update norm {measured:.6g} over robust.update_norm_bound {bound:g}: scaled to the bound "
        "before masking",
    )


def _stage(msg: Message, context: Context, step: Callable[[SecAggClient, dict], dict]) -> Message:
    """A key-exchange or unmasking stage: no training, just the protocol step on the kept state."""
    log_start_up()
    try:
        session = site_session(context)
        client = _client(context)
        fields = step(client, dict(msg.content[SECAGG]))
        _keep(context, client)
    except FedmedError as error:
        return refuse(msg, error)
    return reply(msg, session, {SECAGG: ConfigRecord(fields)})


def _client(context: Context) -> SecAggClient:
    record = context.state[STATE] if STATE in context.state else ConfigRecord()
    return SecAggClient.from_record(dict(record), node_id=context.node_id)


def _keep(context: Context, client: SecAggClient) -> None:
    context.state[STATE] = ConfigRecord(client.state_to_record())
