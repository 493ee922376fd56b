"""What every ClientApp handler does: find the site's session, check the received parameters, train,
and turn an expected problem into a readable refusal."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.records import Layout, LayoutMismatchError, site_record
from fedmed.flower.wire import (
    ARRAYS,
    CONFIG,
    HELD,
    LAYOUT_DIGEST,
    PROXIMAL_MU,
    SERVER_ROUND,
    SITE,
    STANDARD_LANDMARKS,
)
from fedmed.site.session import SiteSession

from .neutral import site_neutral
from .site_context import session_held_layout, session_layout, site_session

_loaded_at = time.time()
_first_message = True


def log_start_up() -> None:
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


def session_for(msg: Message, context: Context) -> SiteSession:
    """The site's session, mapping its intensities onto the federation's landmarks and taking the coordinator's
    frozen and site-local starting values when the round sends them."""
    session = site_session(context)
    if STANDARD_LANDMARKS in msg.content[CONFIG]:
        session.use_standard_landmarks([float(value) for value in msg.content[CONFIG][STANDARD_LANDMARKS]])
    if HELD in msg.content:
        session.use_held(session_held_layout(session).unpack(msg.content[HELD]))
    return session


def received(msg: Message, layout: Layout) -> dict:
    """The global parameters, checked against the model this site builds."""
    sent = str(msg.content[CONFIG].get(LAYOUT_DIGEST, ""))
    if sent != layout.digest:
        raise LayoutMismatchError(
            f"the server's model layout {sent or '(none)'} differs from this site's {layout.digest}: coordinator and "
            f"site must run the same fedmed version with the same task and model config"
        )
    return layout.unpack(msg.content[ARRAYS])


def train_round(msg: Message, context: Context) -> tuple[SiteSession, Layout, int, dict, dict]:
    """The site's round of training on the received global parameters: its session, the layout of the
    shared parameters, the round, the trained shared parameters and the metrics."""
    session = session_for(msg, context)
    layout = session_layout(session)
    round_config = msg.content[CONFIG]
    server_round = int(round_config[SERVER_ROUND])
    trained, metrics = session.train(
        received(msg, layout), server_round=server_round, proximal_mu=float(round_config.get(PROXIMAL_MU, 0.0))
    )
    return session, layout, server_round, trained, metrics


def reply(msg: Message, session: SiteSession, records: dict) -> Message:
    """A reply with `records`, signed with the site's name."""
    return Message(RecordDict({**records, SITE: site_record(session.spec.name)}), reply_to=msg)


def refuse(msg: Message, error: FedmedError) -> Message:
    """Expected problems (bad data, mismatched model) go back as a readable error, not a crash: the site's
    log keeps the whole message, the coordinator gets it without the site's paths and ledger id."""
    logger.error("%s", error)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=site_neutral(str(error))), reply_to=msg)
