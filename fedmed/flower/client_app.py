"""The fedmed ClientApp: a thin adapter from Flower messages to the site's round of work."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedmed.errors import FedmedError
from fedmed.log import logger

from .protocol import ARRAYS, CONFIG, LAYOUT_DIGEST, METRICS, SITE, Layout, LayoutMismatchError
from .site_context import session_layout, site_session

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    _log_start_up()
    started = time.perf_counter()
    try:
        session = site_session(context)
        layout = session_layout(session)
        round_config = msg.content[CONFIG]
        update, metrics = session.train(
            _received(msg, layout),
            server_round=int(round_config["server-round"]),
            proximal_mu=float(round_config.get("proximal-mu", 0.0)),
        )
    except FedmedError as error:
        return _refuse(msg, error)
    logger.info("site %s: round %s trained in %.2f s (training %.2f s)", session.spec.name,
                round_config["server-round"], time.perf_counter() - started, metrics["train_seconds"])
    content = RecordDict(
        {ARRAYS: layout.pack(update), METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": session.spec.name})}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _log_start_up()
    try:
        session = site_session(context)
        metrics = session.evaluate(_received(msg, session_layout(session)))
    except FedmedError as error:
        return _refuse(msg, error)
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord({"name": session.spec.name})})
    return Message(content, reply_to=msg)


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
