"""The fedmed ClientApp: a thin adapter from Flower messages to the site's round of work."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedmed.errors import FedmedError
from fedmed.log import logger
from fedmed.secagg import SecAggClient
from fedmed.site_round import SiteSession

from .client_dp import KEY_CLIPPING_NORM, clip_update_inplace, client_dp_mod
from .cross_site import FINAL, MODELS, PERSONAL, personal_model_name, personal_record_key
from .intensity_round import STANDARD_LANDMARKS, SUMMARY, encode_summary
from .protocol import ARRAYS, CONFIG, LAYOUT_DIGEST, METRICS, SITE, Layout, LayoutMismatchError
from .secure_round import MASKED, SECAGG, VECTOR
from .site_context import session_layout, site_session

SECAGG_STATE = "fedmed-secagg"  # this node's SecAgg+ secrets between stages (never sent)

app = ClientApp()
_loaded_at = time.time()
_first_message = True


def _log_start_up() -> None:
    """How long this process took from its start to its first message: the ClientApp's cold start."""
    global _first_message
    if _first_message:
        _first_message = False
        logger.info("ClientApp ready %.2f s after its process started", process_age())


def process_age() -> float:
    """Seconds since this process began (fork or exec), from /proc; since this module loaded elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time() - _loaded_at


@app.train(mods=[client_dp_mod])
def train(msg: Message, context: Context) -> Message:
    _log_start_up()
    started = time.perf_counter()
    try:
        session, layout, server_round, update, metrics = _train(msg, context)
    except FedmedError as error:
        return _refuse(msg, error)
    logger.info("site %s: round %s trained in %.2f s (training %.2f s)", session.spec.name, server_round,
                time.perf_counter() - started, metrics["train_seconds"])
    content = RecordDict(
        {ARRAYS: layout.pack(update), METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": session.spec.name})}
    )
    return Message(content, reply_to=msg)


def _train(msg: Message, context: Context) -> tuple[SiteSession, Layout, int, dict, dict]:
    """The site's round of training on the received global parameters."""
    session = _session(msg, context)
    layout = session_layout(session)
    round_config = msg.content[CONFIG]
    server_round = int(round_config["server-round"])
    trained, metrics = session.train(_received(msg, layout), server_round=server_round,
                                     proximal_mu=float(round_config.get("proximal-mu", 0.0)))
    return session, layout, server_round, trained, metrics


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _log_start_up()
    try:
        session = _session(msg, context)
        metrics = session.evaluate(_received(msg, session_layout(session)))
    except FedmedError as error:
        return _refuse(msg, error)
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": session.spec.name})})
    return Message(content, reply_to=msg)


def _session(msg: Message, context: Context) -> SiteSession:
    """The site's session, mapping its intensities onto the federation's landmarks when the round sends them."""
    session = site_session(context)
    if STANDARD_LANDMARKS in msg.content[CONFIG]:
        session.use_standard_landmarks([float(value) for value in msg.content[CONFIG][STANDARD_LANDMARKS]])
    return session


@app.query("intensity_fit")
def intensity_fit(msg: Message, context: Context) -> Message:
    """Fit the site's intensity normalization from its own training images; share only summaries."""
    return _site_query(msg, context, lambda session: {SUMMARY: encode_summary(session.describe_intensities())})


@app.query("intensity_apply")
def intensity_apply(msg: Message, context: Context) -> Message:
    """Map onto the federation's Nyúl landmarks; share the histogram of the result."""
    return _site_query(msg, context,
                       lambda session: {SUMMARY: encode_summary({"after": session.harmonized_histogram()})})


@app.query("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """Global weights + local layers (+ fine-tune): scored here, returned if this site shares it."""
    def reply(session: SiteSession) -> dict:
        config = msg.content[CONFIG]
        final = bool(config.get(FINAL, False))
        personal, metrics = session.personalize(_received(msg, session_layout(session)),
                                                server_round=int(config["server-round"]), final=final)
        content = {METRICS: MetricRecord(metrics)}
        if session.shares_personalized_model:
            content[PERSONAL] = _personal_layout(session, final=final).pack(personal)
        return content

    return _site_query(msg, context, reply)


@app.query("cross_evaluate")
def cross_evaluate(msg: Message, context: Context) -> Message:
    """Score the global model and the other sites' personalized models on this site's validation data."""
    def reply(session: SiteSession) -> dict:
        config = msg.content[CONFIG]
        layout = _personal_layout(session, final=bool(config.get(FINAL, False)))
        own = personal_model_name(session.spec.name)  # scored in the personalize exchange already
        personal = {name: layout.unpack(msg.content[personal_record_key(index)])
                    for index, name in enumerate(config.get(MODELS, [])) if name != own}
        results = session.evaluate_models(_received(msg, session_layout(session)), personal)
        return {f"{METRICS}-{name}": MetricRecord(metrics) for name, metrics in results.items()}

    return _site_query(msg, context, reply)


def _personal_layout(session: SiteSession, *, final: bool) -> Layout:
    return Layout.of(session.full_template(), session.personal_keys(final=final))


def _site_query(msg: Message, context: Context, answer) -> Message:  # noqa: ANN001
    _log_start_up()
    try:
        session = _session(msg, context)
        content = RecordDict({**answer(session), SITE: ConfigRecord({"name": session.spec.name})})
    except FedmedError as error:
        return _refuse(msg, error)
    return Message(content, reply_to=msg)


@app.train("secagg_setup")
def secagg_setup(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, lambda client, body: client.setup(body))


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, lambda client, body: client.share_keys(body))


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _secagg_stage(msg, context, lambda client, body: client.unmask(body))


@app.train("secagg_mask")
def secagg_mask(msg: Message, context: Context) -> Message:
    """Train, then send only the masked update (local - global); see fedmed.flower.secure_round."""
    _log_start_up()
    started = time.perf_counter()
    try:
        session, layout, server_round, trained, metrics = _train(msg, context)
        round_config = msg.content[CONFIG]
        received = msg.content[ARRAYS].to_numpy_ndarrays()
        update = [np.subtract(local, sent, dtype=np.float32)
                  for local, sent in zip(layout.pack(trained).to_numpy_ndarrays(), received, strict=True)]
        extra = None
        if KEY_CLIPPING_NORM in round_config:
            clipped = clip_update_inplace(update, clipping_norm=float(round_config[KEY_CLIPPING_NORM]))
            extra = [int(clipped)]
        client = _secagg_client(context)
        vector, fields = client.mask(dict(msg.content[SECAGG]), update=update,
                                     weight=int(metrics.pop("num-examples")), extra_counts=extra)
        _keep_secagg_client(context, client)
    except FedmedError as error:
        return _refuse(msg, error)
    if client.last_clipped_values:
        logger.warning("site %s: %d update value(s) clipped to secagg.clipping_range", session.spec.name,
                       client.last_clipped_values)
    logger.info("site %s: round %d trained and masked in %.2f s", session.spec.name, server_round,
                time.perf_counter() - started)
    content = RecordDict({MASKED: ArrayRecord({VECTOR: Array(vector)}), SECAGG: ConfigRecord(fields),
                          METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": session.spec.name})})
    return Message(content, reply_to=msg)


def _secagg_stage(msg: Message, context: Context, step) -> Message:  # noqa: ANN001
    """A key-exchange or unmasking stage: no training, just the protocol step on the kept state."""
    _log_start_up()
    try:
        session = site_session(context)
        client = _secagg_client(context)
        fields = step(client, dict(msg.content[SECAGG]))
        _keep_secagg_client(context, client)
    except FedmedError as error:
        return _refuse(msg, error)
    content = RecordDict({SECAGG: ConfigRecord(fields), SITE: ConfigRecord({"name": session.spec.name})})
    return Message(content, reply_to=msg)


def _secagg_client(context: Context) -> SecAggClient:
    """The site's protocol state lives in the node's context: each stage may run in a new process."""
    record = context.state[SECAGG_STATE] if SECAGG_STATE in context.state else ConfigRecord()
    return SecAggClient.from_record(dict(record), node_id=context.node_id)


def _keep_secagg_client(context: Context, client: SecAggClient) -> None:
    context.state[SECAGG_STATE] = ConfigRecord(client.state_to_record())


def _received(msg: Message, layout: Layout) -> dict:
    """The global parameters, checked against the model this site builds."""
    sent = str(msg.content[CONFIG].get(LAYOUT_DIGEST, ""))
    if sent != layout.digest:
        raise LayoutMismatchError(
            f"the server's model layout {sent or '(none)'} differs from this site's {layout.digest}: coordinator and "
            f"site must run the same fedmed version with the same task and model config"
        )
    return layout.unpack(msg.content[ARRAYS])


def _refuse(msg: Message, error: FedmedError) -> Message:
    """Expected problems (bad data, mismatched model) go back as a readable error, not a crash."""
    logger.error("%s", error)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(error)), reply_to=msg)
