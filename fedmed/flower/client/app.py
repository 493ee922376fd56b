"""The fedmed ClientApp: a thin adapter from Flower messages to the site's session (fedmed.site)."""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.records import Layout, encode_summary
from fedmed.flower.wire import (
    ARRAYS,
    CARD_FOLD_TEMPERATURES,
    CARD_OOD_GROUPS,
    CARD_OOD_MEAN,
    CARD_OOD_VAR,
    CARD_STATISTICS,
    CONFIG,
    CROSS_EVALUATE,
    DP_PLAN,
    FINAL,
    INTENSITY_APPLY,
    INTENSITY_FIT,
    LOCAL_BASELINE,
    METRICS,
    MODEL_CARD_CALIBRATE,
    MODEL_CARD_REFERENCE,
    MODELS,
    PERSONAL,
    PERSONALIZE,
    PLAN,
    SECAGG_MASK,
    SECAGG_SETUP,
    SECAGG_SHARE_KEYS,
    SECAGG_UNMASK,
    SERVER_ROUND,
    SUMMARY,
    model_metrics_record,
    personal_record,
)
from fedmed.runs.cross_site import personal_model_name
from fedmed.site.local_baseline import local_baseline
from fedmed.site.model_card import calibration_statistics, reference_statistics
from fedmed.site.privacy import plan_numbers
from fedmed.site.session import SiteSession

from . import secagg
from .audit import audit_mod
from .common import log_start_up, received, refuse, reply, session_for, train_round
from .compression import compression_mod
from .mods import client_dp_mod
from .site_context import session_layout

# Every reply passes the audit mod on its way out (fedmed.flower.client.audit).
app = ClientApp(mods=[audit_mod])


# Compression outside the clipping mod: it encodes the clipped update (fedmed.flower.client.compression).
@app.train(mods=[compression_mod, client_dp_mod])
def train(msg: Message, context: Context) -> Message:
    log_start_up()
    started = time.perf_counter()
    try:
        session, layout, server_round, update, metrics = train_round(msg, context)
    except FedmedError as error:
        return refuse(msg, error)
    # Per site and round: the round's own line (fedmed.runs.progress) says enough without -v.
    logger.debug(
        "site %s: round %s trained in %.2f s (training %.2f s)",
        session.spec.name,
        server_round,
        time.perf_counter() - started,
        metrics["train_seconds"],
    )
    return reply(msg, session, {ARRAYS: layout.pack(update), METRICS: MetricRecord(metrics)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(
        msg, context, lambda session: {METRICS: MetricRecord(session.evaluate(received(msg, session_layout(session))))}
    )


@app.query(INTENSITY_FIT.action)
def intensity_fit(msg: Message, context: Context) -> Message:
    """Fit the site's intensity normalization from its own training images; share only summaries."""
    return _answer(msg, context, lambda session: {SUMMARY: encode_summary(session.describe_intensities())})


@app.query(INTENSITY_APPLY.action)
def intensity_apply(msg: Message, context: Context) -> Message:
    """Map onto the federation's Nyúl landmarks; share the histogram of the result."""
    return _answer(msg, context, lambda session: {SUMMARY: encode_summary({"after": session.harmonized_histogram()})})


@app.query(DP_PLAN.action)
def dp_plan(msg: Message, context: Context) -> Message:
    """[dp_sgd]: the site's plan for the run (σ, sampling rate, steps; fixed in its ledger, nothing charged), or
    its refusal; numbers only, nothing about its data beyond what the plan's rate and batch imply."""
    return _answer(msg, context, lambda session: {PLAN: MetricRecord(plan_numbers(session.dp_plan()))})


@app.query(PERSONALIZE.action)
def personalize(msg: Message, context: Context) -> Message:
    """Global weights + local layers (+ fine-tune): scored here, returned if this site shares it."""

    def answer(session: SiteSession) -> dict:
        config = msg.content[CONFIG]
        final = bool(config.get(FINAL, False))
        personal, metrics = session.personalize(
            received(msg, session_layout(session)), server_round=int(config[SERVER_ROUND]), final=final
        )
        records = {METRICS: MetricRecord(metrics)}
        if session.lends_personalized_model(final=final):
            records[PERSONAL] = _personal_layout(session, final=final).pack(personal)
        if final and session.config.evaluation.local_baseline:
            shared = local_baseline(session, received(msg, session_layout(session)), personalized=metrics)
            if shared:
                records[LOCAL_BASELINE] = MetricRecord(shared)
        return records

    return _answer(msg, context, answer)


@app.query(CROSS_EVALUATE.action)
def cross_evaluate(msg: Message, context: Context) -> Message:
    """Score the global model and the other sites' personalized models on this site's validation data."""

    def answer(session: SiteSession) -> dict:
        config = msg.content[CONFIG]
        layout = _personal_layout(session, final=bool(config.get(FINAL, False)))
        own = personal_model_name(session.spec.name)  # scored in the personalize exchange already
        personal = {
            name: layout.unpack(msg.content[personal_record(index)])
            for index, name in enumerate(config.get(MODELS, []))
            if name != own
        }
        results = session.evaluate_models(received(msg, session_layout(session)), personal)
        return {model_metrics_record(name): MetricRecord(metrics) for name, metrics in results.items()}

    return _answer(msg, context, answer)


@app.query(MODEL_CARD_REFERENCE.action)
def model_card_reference(msg: Message, context: Context) -> Message:
    """The final global model on this site's data: NLL sums per temperature and training feature sums, numbers only."""

    def answer(session: SiteSession) -> dict:
        statistics = reference_statistics(session, received(msg, session_layout(session)))
        return {CARD_STATISTICS: MetricRecord(statistics)}

    return _answer(msg, context, answer)


@app.query(MODEL_CARD_CALIBRATE.action)
def model_card_calibrate(msg: Message, context: Context) -> Message:
    """Reliability bins before and after temperature scaling (cross-fitted), and the histogram of OOD scores."""

    def answer(session: SiteSession) -> dict:
        config = msg.content[CONFIG]
        folds = config.get(CARD_FOLD_TEMPERATURES)
        temperatures = [float(value) for value in folds] if folds is not None else None
        mean = [float(value) for value in config[CARD_OOD_MEAN]] if CARD_OOD_MEAN in config else None
        var = [float(value) for value in config[CARD_OOD_VAR]] if CARD_OOD_VAR in config else None
        groups = [int(value) for value in config.get(CARD_OOD_GROUPS) or []]
        statistics = calibration_statistics(
            session,
            received(msg, session_layout(session)),
            fold_temperatures=temperatures,
            reference=None if mean is None or var is None else (mean, var, groups),
        )
        return {CARD_STATISTICS: MetricRecord(statistics)}

    return _answer(msg, context, answer)


def _personal_layout(session: SiteSession, *, final: bool) -> Layout:
    return Layout.of(session.full_template(), session.personal_keys(final=final))


def _answer(msg: Message, context: Context, answer: Callable[[SiteSession], dict]) -> Message:
    log_start_up()
    try:
        session = session_for(msg, context)
        return reply(msg, session, answer(session))
    except FedmedError as error:
        return refuse(msg, error)


app.train(SECAGG_SETUP.action)(secagg.setup)
app.train(SECAGG_SHARE_KEYS.action)(secagg.share_keys)
app.train(SECAGG_MASK.action)(secagg.mask)
app.train(SECAGG_UNMASK.action)(secagg.unmask)
