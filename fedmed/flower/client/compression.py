"""[compression], the site's part: a mod around the train handler that replaces the trained weights of its reply
with the encoded update (local - global). Outside the client-level DP clipping mod, so it encodes the clipped update;
inside the audit mod, so the audit log records the bytes that actually leave."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedmed.compression import UpdateCodec
from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.wire import ARRAYS, COMPRESSED, CONFIG, METRICS, SERVER_ROUND
from fedmed.site.compression import compress_update
from fedmed.site.spec import site_seed

from .common import refuse
from .site_context import site_session

COMPRESS_SECONDS = "compress_seconds"  # the site's metric: encoding time, error feedback's load and save included


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if reply.has_error() or ARRAYS not in reply.content:
        return reply
    try:
        session = site_session(context)
        settings = session.config.compression
        if not settings.enabled:
            return reply
        trained, sent = _arrays(reply.content[ARRAYS]), _arrays(msg.content[ARRAYS])
        floats = [key for key, array in sent.items() if np.issubdtype(array.dtype, np.floating)]
        config = msg.content[CONFIG]
        server_round = int(config[SERVER_ROUND])
        encoded = compress_update(
            UpdateCodec.of(settings),
            trained={key: trained[key] for key in floats},
            sent={key: sent[key] for key in floats},
            state_dir=session.spec.state_dir,
            seed=site_seed(session.config.seed, session.spec.name, server_round),
            error_feedback=settings.error_feedback,
            clipping_norm=float(config[KEY_CLIPPING_NORM]) if KEY_CLIPPING_NORM in config else None,
        )
    except FedmedError as error:
        return refuse(msg, error)
    if encoded.clipped_norm is not None:
        logger.info(
            "site %s: round %d encoded update norm %.4g scaled to client_dp's clipping norm",
            session.spec.name,
            server_round,
            encoded.clipped_norm,
        )
    # Integer groups (a BatchNorm's step counter) are not updates: they travel as they are.
    raw = {key: Array(array) for key, array in trained.items() if key not in floats}
    content = {key: record for key, record in reply.content.items() if key not in (ARRAYS, METRICS)}
    metrics = MetricRecord({**dict(reply.content[METRICS]), COMPRESS_SECONDS: encoded.seconds})
    compressed = ArrayRecord({**{key: Array(part) for key, part in encoded.parts.items()}, **raw})
    return Message(RecordDict({**content, COMPRESSED: compressed, METRICS: metrics}), reply_to=msg)


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}
