"""The ClientApp's audit mod: every reply is written to the site's audit log before it leaves.

One mod around every handler (Flower applies the ClientApp's own mods outside each handler's), so
no handler can send anything unrecorded; it sees the final reply, after the clipping mods. If the
record cannot be written, the reply is replaced by a refusal: nothing leaves the site unrecorded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.serde import recorddict_to_proto

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.wire import (
    CONFIG,
    CROSS_EVALUATE,
    DP_PLAN,
    INTENSITY_APPLY,
    INTENSITY_FIT,
    MODEL_CARD_CALIBRATE,
    MODEL_CARD_REFERENCE,
    PERSONAL,
    PERSONALIZE,
    RUN_DIR_KEY,
    RUN_ID_KEY,
    SECAGG_MASK,
    SECAGG_SETUP,
    SECAGG_SHARE_KEYS,
    SECAGG_UNMASK,
    SERVER_ROUND,
)
from fedmed.site.audit import AuditLog, audit_path

from .neutral import site_neutral
from .site_context import site_state_root

MESSAGE = "message-sent"  # the audit event of a reply that left the site
REFUSAL = "refusal"
UPDATE_BOUNDED = "update-bounded"  # the site scaled its own update down to robust.update_norm_bound before masking

_KINDS = {
    "train": "model-update",
    "evaluate": "metrics",
    str(INTENSITY_FIT): "normalization-statistics",
    str(INTENSITY_APPLY): "normalization-statistics",
    str(PERSONALIZE): "metrics",  # "personalized-model" when the site lends its model
    str(CROSS_EVALUATE): "metrics",
    str(DP_PLAN): "metrics",  # the site's DP-SGD plan: σ, sampling rate, steps, ε target
    str(MODEL_CARD_REFERENCE): "model-card-statistics",  # NLL sums per temperature, feature sums: no case, no model
    str(MODEL_CARD_CALIBRATE): "model-card-statistics",  # reliability bins, OOD score histogram
    str(SECAGG_SETUP): "secagg-public-keys",
    str(SECAGG_SHARE_KEYS): "secagg-key-shares",
    str(SECAGG_MASK): "secagg-masked-update",
    str(SECAGG_UNMASK): "secagg-unmask-shares",
}


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Record what the handler replies (or that it failed), then let it go."""
    try:
        root = site_state_root(context)
    except FedmedError:
        root = None  # an unreadable site config: the handler refuses with the reason
    if root is None:  # no site to audit for; the handler refuses such a node itself
        return call_next(msg, context)
    log = AuditLog(audit_path(root))
    try:
        reply = call_next(msg, context)
    except Exception as error:
        # Flower turns the exception into an error reply, which leaves the site too: without the site's paths
        # (the whole exception, with its traceback, stays in the site's log through the chain).
        reason = f"{type(error).__name__}: {site_neutral(str(error))}"
        _record(log, msg, context, kind=REFUSAL, payload=reason.encode(), extra={"reason": reason})
        raise SiteFailureError(reason) from error
    try:
        _record(log, msg, context, **describe(msg, reply))
    except FedmedError as error:
        logger.error("%s", error)
        reason = site_neutral(str(error))
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    return reply


class SiteFailureError(Exception):
    """An unexpected failure of a handler, as the coordinator is told of it (fedmed.flower.client.neutral)."""


def describe(msg: Message, reply: Message) -> dict[str, Any]:
    """The reply's kind, payload bytes and what of it a person wants to read (records, metrics)."""
    if reply.has_error():
        error = reply.error
        return {"kind": REFUSAL, "payload": f"{error.code}: {error.reason}".encode(), "extra": {"reason": error.reason}}
    content = reply.content
    kind = _KINDS.get(msg.metadata.message_type, f"other:{msg.metadata.message_type}")
    if str(msg.metadata.message_type) == str(PERSONALIZE) and PERSONAL in content:
        kind = "personalized-model"
    metrics = {name: dict(record) for name, record in content.items() if isinstance(record, MetricRecord)}
    # The arrays' own bytes (elements × item size), without their serialization headers.
    array_bytes = sum(
        int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        for record in content.values()
        if isinstance(record, ArrayRecord)
        for array in record.values()
    )
    extra = {
        "records": sorted(content.keys()),
        "array_bytes": array_bytes,
        "metrics": metrics,
        "flower_content_id": content.object_id,
    }
    return {"kind": kind, "payload": recorddict_to_proto(content).SerializeToString(deterministic=True), "extra": extra}


def record_site_event(msg: Message, context: Context, event: str, **fields: Any) -> None:
    """Something the site's own code did to what it is about to send (not a message itself), written before the
    reply it concerns leaves; raises AuditLogError (a FedmedError, so the handler refuses) if it cannot be."""
    root = site_state_root(context)
    if root is None:  # no site to audit for (the handler refuses such a node itself)
        return
    AuditLog(audit_path(root)).append(event, run_id=_run_id(context), round=_round(msg), **fields)


def _record(log: AuditLog, msg: Message, context: Context, *, kind: str, payload: bytes, extra: dict) -> None:
    log.append(
        MESSAGE,
        kind=kind,
        message_type=str(msg.metadata.message_type),
        flower_run_id=int(msg.metadata.run_id),
        run_id=_run_id(context),
        round=_round(msg),
        bytes=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
        **extra,
    )


def _run_id(context: Context) -> str | None:
    if RUN_ID_KEY in context.run_config:
        return str(context.run_config[RUN_ID_KEY])
    if RUN_DIR_KEY in context.run_config:  # a simulation names its run by its folder
        return Path(str(context.run_config[RUN_DIR_KEY])).name
    return None


def _round(msg: Message) -> int | None:
    try:
        if msg.has_content() and CONFIG in msg.content and SERVER_ROUND in msg.content[CONFIG]:
            return int(msg.content[CONFIG][SERVER_ROUND])
    except (TypeError, ValueError, KeyError):
        pass
    group = str(msg.metadata.group_id)
    return int(group) if group.isdigit() else None
