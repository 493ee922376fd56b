"""A training round under SecAgg+, carried over Flower's Message API.

Four exchanges per round (Flower's SecAgg+ stages): public keys, encrypted key shares, training
with the masked update, unmasking. The server only ever holds masked uint32 vectors and the
protocol's key material; it learns the weighted mean of the sites' updates (local - global) and
nothing about any one site's update. The run's strategy steps from that mean as from a plain
average, so a server optimizer (FedAvgM's momentum) works unchanged. A round the protocol cannot
finish (too many sites lost) is retried with fresh keys, then fails loudly; the old model is never
kept silently.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.wire import (
    ARRAYS,
    CONFIG,
    MASKED,
    METRICS,
    SECAGG,
    VECTOR,
)
from fedmed.secagg import SecAggResult, SecAggRoundError, SecAggServer, SecAggSettings
from fedmed.secagg.encoding import l2_norm
from fedmed.secagg.messages import MASKED_INPUT, SETUP, SHARE_KEYS, UNMASK
from fedmed.site.session import NUM_EXAMPLES

from .client_dp import ClientDpStrategy, clipping_config, noise_secure_mean
from .context import RunContext
from .exchange import NodesAsOfNow
from .secure_exchange import StageExchange


class SecureRoundError(FedmedError):
    """Secure aggregation could not finish a round in its allowed attempts."""


@dataclass
class SecureRound:
    """The outcome of one securely aggregated round."""

    arrays: ArrayRecord
    replies: list[Message]  # the masked-input replies of the aggregated sites (metrics only are read)
    record: dict[str, Any] = field(default_factory=dict)  # what rounds.jsonl keeps about the protocol


def secagg_settings(config: RunConfig, *, sites: int) -> SecAggSettings:
    """The round's protocol settings. With compression.bits = 16 the masked vectors are 16-bit: every site weighs
    one (the field has room for sites x levels, not case counts x levels), so the levels are (2^16 - 1) / sites."""
    settings = config.secagg
    field16 = config.compression.bits == 16
    return SecAggSettings(
        clipping_range=settings.clipping_range,
        max_total_weight=sites if field16 else settings.max_total_weight,
        reconstruction_threshold=settings.reconstruction_threshold,
        stage_timeout_s=settings.stage_timeout_s,
        field_bits=16 if field16 else 32,
    )


def secure_train_round(
    run: RunContext,
    strategy: Strategy,
    arrays: ArrayRecord,
    *,
    server_round: int,
    round_config: ConfigRecord,
    needed: int,
) -> SecureRound:
    """Run the round's four SecAgg+ exchanges; the run's site names are filled in from replies."""
    attempts = run.config.secagg.max_attempts
    for attempt in range(1, attempts + 1):
        site_errors: dict[str, str] = {}
        try:
            outcome = _attempt(
                run,
                strategy,
                arrays,
                server_round=server_round,
                round_config=round_config,
                needed=needed,
                site_errors=site_errors,
            )
            outcome.record["secagg_attempts"] = attempt
            # A site that replied with an error refused (its reason kept); any other loss is a drop.
            outcome.record["sites_refused"] = dict(sorted(site_errors.items()))
            outcome.record["sites_dropped"] = sorted(set(outcome.record["secagg_dropped"]) - set(site_errors))
            return outcome
        except SecAggRoundError as error:
            failure = str(error)
            logger.warning(
                "round %d: secure aggregation attempt %d of %d failed: %s", server_round, attempt, attempts, error
            )
    reasons = "".join(
        f" {reason if reason.startswith(f'site {site}:') else f'{site}: {reason}'}."
        for site, reason in sorted(site_errors.items())
    )
    raise SecureRoundError(
        f"round {server_round}: secure aggregation failed in {attempts} attempt(s).{reasons} Last attempt: {failure}"
    )


def _attempt(
    run: RunContext,
    strategy: Strategy,
    arrays: ArrayRecord,
    *,
    server_round: int,
    round_config: ConfigRecord,
    needed: int,
    site_errors: dict[str, str],
) -> SecureRound:
    config = run.config
    train_messages = {
        message.metadata.dst_node_id: message
        for message in strategy.configure_train(server_round, arrays, round_config, NodesAsOfNow(run.grid))
    }
    server = SecAggServer(
        node_ids=sorted(train_messages),
        shapes=[array.shape for array in arrays.to_numpy_ndarrays()],
        settings=secagg_settings(config, sites=len(train_messages)),
        extra_length=1 if isinstance(strategy, ClientDpStrategy) else 0,
    )
    exchange = StageExchange(run, server_round=server_round, site_errors=site_errors)
    site_of = run.site_of
    stage_started = time.perf_counter()

    replies = exchange.send(SETUP, server.setup_messages())
    replies = exchange.send(SHARE_KEYS, server.receive_public_keys(_fields(replies)))
    outgoing = server.receive_encrypted_shares(_fields(replies))
    keys_done = time.perf_counter()

    mask_content = _with_training(
        outgoing, train_messages=train_messages, extra_config=clipping_config(strategy, config)
    )
    masked = exchange.send(
        MASKED_INPUT,
        mask_content,
        timeout=run.timeout,
        wrap=False,
        each=lambda node, reply: _summed(server, node, reply),
    )
    trained_done = time.perf_counter()
    replies = exchange.send(UNMASK, server.masked_vectors_done())
    result = server.receive_unmask_shares(_fields(replies))
    unmasked_done = time.perf_counter()

    if len(result.sites_aggregated) < needed:
        raise SecAggRoundError(
            f"SecAgg: {len(result.sites_aggregated)} site(s) aggregated, quorum is {needed}",
            stage=UNMASK,
            lost=dict(result.sites_dropped.items()),
        )
    aggregated = [masked[node] for node in result.sites_aggregated if node in masked]
    new_arrays, bound_record = _new_global(
        strategy,
        result,
        arrays=arrays,
        server_round=server_round,
        bound=config.robust.update_norm_bound,
        like=aggregated[0],
    )
    _warn_about_clipping(result, server_round=server_round, config=config)
    return SecureRound(
        arrays=new_arrays,
        replies=aggregated,
        record={
            "secagg_sites": sorted(site_of(node) for node in result.sites_aggregated),
            "secagg_dropped": {site_of(node): stage for node, stage in result.sites_dropped.items()},
            "secagg_max_quantization_error": result.max_quantization_error,
            "secagg_clipped_values": result.clipped_values,
            "secagg_keys_s": round(keys_done - stage_started, 4),
            "secagg_unmask_s": round(unmasked_done - trained_done, 4),
            **exchange.traffic(),
            **bound_record,
        },
    )


def check_aggregate_norm(
    mean_update: Sequence[np.ndarray], *, bound: float, max_quantization_error: float, server_round: int
) -> dict[str, Any]:
    """What rounds.jsonl keeps of the check of robust.update_norm_bound on the unmasked mean update, with
    "aggregate_rejected" (and a warning) when the mean is longer than any mean of bounded updates can be.

    Every site running fedmed's code scales its own update to norm <= B before masking, so the weighted mean of
    the updates has norm <= B (a convex combination). A longer mean means some site did not; which one, the
    coordinator cannot know under secure aggregation."""
    norm = l2_norm(mean_update)
    tolerance = aggregate_norm_tolerance(
        bound=bound,
        max_quantization_error=max_quantization_error,
        num_params=sum(int(np.size(array)) for array in mean_update),
    )
    record: dict[str, Any] = {"aggregate_update_norm": norm, "update_norm_bound": bound}
    if not norm <= bound + tolerance:  # a NaN norm is rejected too
        reason = (
            f"the unmasked mean update has norm {norm:.6g}, over robust.update_norm_bound {bound:g} (+ {tolerance:.3g} "
            "for secagg's quantization): every site running fedmed's code bounds its own update, so at least one "
            "site did not; the aggregate is rejected and the global model stays as it was. Secure aggregation "
            "cannot say which site: ask the sites to check their fedmed version and 'fedmed site audit'"
        )
        logger.warning("round %d: %s", server_round, reason)
        record["aggregate_rejected"] = reason
    return record


def aggregate_norm_tolerance(*, bound: float, max_quantization_error: float, num_params: int) -> float:
    """How far over `bound` the unmasked mean of bounded updates can come out, worst case.

    Clipping to secagg.clipping_range only shortens values, so never lengthens an update. Quantization moves each
    element of the mean by at most max_quantization_error (fedmed.secagg.quantize), so the error vector is at most
    sqrt(P) times that long. The site's float32 rescaling moves each value by at most 2^-24 of itself, so a
    bounded update is at most B (1 + 2^-24) long; B 2^-22 covers that and the float64 norms on both sides."""
    return math.sqrt(num_params) * max_quantization_error + bound * 2.0**-22


def _new_global(
    strategy: Strategy,
    result: SecAggResult,
    *,
    arrays: ArrayRecord,
    server_round: int,
    bound: float | None,
    like: Message,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """The round's new global arrays from the unmasked mean, and the record of robust.update_norm_bound's check."""
    bound_record: dict[str, Any] = {}
    if bound is not None:  # before any noise is added: the sites bound their updates, not the noised mean
        bound_record = check_aggregate_norm(
            result.mean_update,
            bound=bound,
            max_quantization_error=result.max_quantization_error,
            server_round=server_round,
        )
    if "aggregate_rejected" in bound_record:
        return arrays, bound_record  # the round counts (metrics, checkpoint); the global model and momentum stay
    client_dp = isinstance(strategy, ClientDpStrategy)
    global_arrays = arrays.to_numpy_ndarrays()
    averaged = _averaged(strategy, result, arrays=arrays, global_arrays=global_arrays, client_dp=client_dp)
    if client_dp:  # plain FedAvg only (fedmed.config.privacy.check_privacy): the noise on the mean is the step
        return averaged, bound_record
    return step_from_mean(strategy, averaged, server_round=server_round, like=like), bound_record


def _with_training(
    outgoing: Mapping[int, Any], *, train_messages: Mapping[int, Message], extra_config: dict[str, object]
) -> dict[int, RecordDict]:
    """The masked-input stage's messages: each node's training message (arrays and round config, plus what
    client-level DP's clipping needs) with its SecAgg+ message."""
    mask_content = {}
    for node, message in outgoing.items():
        content = train_messages[node].content
        config_record = ConfigRecord({**dict(content[CONFIG]), **extra_config})
        mask_content[node] = RecordDict({ARRAYS: content[ARRAYS], CONFIG: config_record, SECAGG: ConfigRecord(message)})
    return mask_content


def _averaged(
    strategy: Strategy,
    result: SecAggResult,
    *,
    arrays: ArrayRecord,
    global_arrays: list[np.ndarray],
    client_dp: bool,
) -> ArrayRecord:
    """The global arrays plus the unmasked mean update (noised first under client-level DP)."""
    mean = [
        update.astype(array.dtype, copy=False) for update, array in zip(result.mean_update, global_arrays, strict=True)
    ]
    if client_dp:
        clipped = int(result.extra_sums[0]) if result.extra_sums is not None else 0
        noise_secure_mean(strategy, mean, clipped_count=clipped, sites=len(result.sites_aggregated))
    return ArrayRecord(
        {
            key: Array(np.asarray(array + update, dtype=array.dtype))
            for key, array, update in zip(arrays.keys(), global_arrays, mean, strict=True)
        }
    )


def step_from_mean(strategy: Strategy, averaged: ArrayRecord, *, server_round: int, like: Message) -> ArrayRecord:
    """The strategy's own step from the round's average: it is handed the unmasked mean as the round's only
    reply, so a server optimizer (FedAvgM's momentum, FedAdam's moments) steps from what the server may see and
    nothing else; plain FedAvg returns the mean unchanged."""
    weight_key = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
    content = RecordDict({ARRAYS: averaged, METRICS: MetricRecord({weight_key: 1})})
    stepped, _ = strategy.aggregate_train(server_round, [Message(content, metadata=copy.copy(like.metadata))])
    if stepped is None:
        raise SecureRoundError(f"round {server_round}: the strategy produced no model from the secure aggregate")
    return stepped


def _warn_about_clipping(result: SecAggResult, *, server_round: int, config: RunConfig) -> None:
    if result.clipped_values:
        logger.warning(
            "round %d: %d update value(s) fell outside secagg.clipping_range ±%g and were clipped; raise "
            "secagg.clipping_range (or lower the learning rate)",
            server_round,
            result.clipped_values,
            config.secagg.clipping_range,
        )


def _summed(server: SecAggServer, node: int, reply: Message) -> None:
    """A masked vector into the round's running sum as it arrives; the reply keeps an empty record in its place
    (it carried an update), so the coordinator holds one masked vector at a time."""
    record = reply.content.get(MASKED)
    vector = np.asarray(record[VECTOR].numpy()) if isinstance(record, ArrayRecord) and VECTOR in record else None
    header = dict(reply.content[SECAGG]) if SECAGG in reply.content else {}
    server.add_masked_vector(node, (vector, header))  # a malformed reply loses its site there
    reply.content[MASKED] = ArrayRecord()


def _fields(replies: Mapping[int, Message]) -> dict[int, dict]:
    return {node: dict(reply.content[SECAGG]) for node, reply in replies.items()}
