"""The coordinator's round loop: sample sites, train, aggregate, evaluate, checkpoint.

Flower's `Strategy.start` runs the same steps; fedmed drives them itself so every round is
checkpointed (and can be resumed), per-site metrics reach the run directory, and a round that
loses its quorum fails loudly instead of keeping the old model silently.
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmed.config import RunConfig
from fedmed.core.errors import FedmedError
from fedmed.core.log import logger
from fedmed.flower.records import Layout
from fedmed.flower.wire import CLIPPING_MODE, LAYOUT_DIGEST, STANDARD_LANDMARKS
from fedmed.runs import RunDirectory
from fedmed.runs.progress import RoundProgress
from fedmed.runs.proxy_traffic import ProxyLog
from fedmed.runs.tracking import RunTracker
from fedmed.tasks import Task

from .arrivals import collect_train_replies
from .client_dp import client_dp_round_record, client_level_privacy
from .context import RunContext
from .cross_site import cross_site_evaluation
from .dp_plan import DpPlans, ask_dp_plans, stop_if_mostly_noise
from .exchange import NodesAsOfNow, round_traffic, send_and_receive
from .intensity import fit_intensities
from .model_card import build_model_card
from .replies import Outcome, by_site, outcome_of, record_metrics, usable_replies, with_deadline
from .reply_checks import refuse_implausible
from .robust.round_loop import (
    readmissions_recorded,
    resume_state,
    robust_layer,
    save_state,
    secure_contributions,
    without_quarantined,
)
from .robust.updates import SpilledUpdates
from .secure_round import SecureRoundError, secure_train_round
from .start import GlobalStart, check_resumed_start, global_start, record_start
from .strategies import build_strategy, check_strategy_name, quorum, restore_strategy_state, strategy_state


class RoundFailedError(FedmedError):
    """Too few sites returned a usable reply for the round to count."""


def run_federation(
    grid: Grid,
    *,
    config: RunConfig,
    task: Task,
    run_dir: RunDirectory,
    site_names: dict[int, str] | None = None,
    proxy: ProxyLog | None = None,
) -> None:
    """Run (or resume, if the run directory holds a checkpoint) the configured federation; `proxy`, in
    deployment, is the front proxy's access log, from which each round's row takes each site's bytes."""
    begun = _start_or_resume(config, run_dir=run_dir)
    start, strategy, arrays = begun.start, begun.strategy, begun.arrays
    run = RunContext(
        grid=grid,
        config=config,
        task=task,
        run_dir=run_dir,
        site_names=dict(site_names or {}),
        held=start.held,
        proxy=proxy,
    )
    start_fields = record_start(run_dir, start)
    start.release_shared()
    scan_geometry = config.task.scan_geometry
    progress = RoundProgress(
        total_rounds=config.train.rounds,
        first_round=begun.first_round,
        metric=task.primary_metric,
        eval_every=config.train.evaluation_interval(scan_geometry=scan_geometry),
        cache=config.data.cache if scan_geometry else None,
    )
    # The live bar (a terminal only) and the tracker's files are closed however the loop ends.
    with progress, RunTracker.open(run_dir, config=config, first_round=begun.first_round) as tracker:
        _before_the_rounds(run, layout=start.layout, first_round=begun.first_round)
        for server_round in range(begun.first_round, config.train.rounds + 1):
            done = _run_round(run, strategy, arrays, server_round=server_round, progress=progress)
            arrays = done.arrays
            _commit_round(run, strategy, done, layout=start.layout, start_fields=start_fields)
            # Tracked once the round is committed: a resumed run never re-runs a round TensorBoard or MLflow holds.
            tracker.log_round(server_round, train=done.trained, evaluation=done.evaluation, round_row=done.row)
            progress.report(server_round, train=done.trained, evaluation=done.evaluation)

    start.state.update(start.layout.unpack(arrays))
    run_dir.save_checkpoint(
        "final",
        {
            "round": config.train.rounds,
            "state_dict": start.state,
            "site_local_keys": start.keys.local,
            "task": config.task.kind,
        },
    )
    build_model_card(run, arrays)


@dataclass
class _Begun:
    """Where the round loop starts: the round-0 model, the strategy, the global arrays and the first round
    (after a checkpoint's round when resuming)."""

    start: GlobalStart
    strategy: Strategy
    arrays: ArrayRecord
    first_round: int


def _start_or_resume(config: RunConfig, *, run_dir: RunDirectory) -> _Begun:
    """Seed, build the round-0 model and the strategy and, if the run directory holds a checkpoint, continue
    from it: its global arrays, strategy state and random states."""
    check_strategy_name(config)  # before the seeding and any [pretrain] work
    # Flower samples nodes with the global `random` module: seed it for reproducible rounds.
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)  # Flower's DP wrappers draw their noise from numpy's global generator
    torch.manual_seed(config.seed)
    start = global_start(config, run_dir=run_dir)  # model.init or [pretrain] loaded, model.freeze applied
    strategy = build_strategy(config)
    arrays = start.layout.pack(start.state)

    first_round = 1
    checkpoint = run_dir.load_checkpoint("latest")
    if checkpoint is not None:
        check_resumed_start(checkpoint, start, run_dir=run_dir)
        arrays = start.layout.pack(checkpoint["shared_state"])
        restore_strategy_state(strategy, checkpoint["strategy_state"])
        resume_state(robust_layer(strategy), checkpoint, run_dir=run_dir)
        random.setstate(checkpoint["random_state"])
        if "numpy_random_state" in checkpoint:
            np.random.set_state(checkpoint["numpy_random_state"])
        first_round = int(checkpoint["round"]) + 1
        logger.info("resuming %s from round %d", run_dir.path.name, first_round)
    # Rows of rounds after the checkpoint were written by the run that died, and its updates; they are re-run now.
    run_dir.drop_rounds_after(first_round - 1)
    SpilledUpdates.remove_stale(run_dir.path)
    return _Begun(start=start, strategy=strategy, arrays=arrays, first_round=first_round)


def _before_the_rounds(run: RunContext, *, layout: Layout, first_round: int) -> None:
    """The exchanges before the first round: the quorum, the sites' intensity normalization and, with DP-SGD,
    their privacy plans. Repeated on resume: sites refit from the same images, so the statistics and
    landmarks come out the same."""
    _wait_for_quorum(run, server_round=first_round)
    landmarks = fit_intensities(run)
    run.settings = {LAYOUT_DIGEST: layout.digest} | ({STANDARD_LANDMARKS: landmarks} if landmarks else {})
    if run.config.dp_sgd.enabled:
        # Before any site trains: a plan too few sites can follow, or one whose updates would be mostly
        # noise, stops the run with nothing charged.
        plans = ask_dp_plans(run)
        _check_private_quorum(run, plans, server_round=first_round)
        stop_if_mostly_noise(plans, run=run, server_round=first_round)


@dataclass
class _RoundDone:
    """A finished round: the new global arrays, the sites' metrics and the round's row of rounds.jsonl."""

    server_round: int
    arrays: ArrayRecord
    trained: dict[str, dict[str, float]]
    evaluation: dict[str, dict[str, float]]
    row: dict[str, Any]


def _run_round(
    run: RunContext, strategy: Strategy, arrays: ArrayRecord, *, server_round: int, progress: RoundProgress
) -> _RoundDone:
    """Train and aggregate, then evaluate and cross-evaluate when due; timed for the round's row."""
    config = run.config
    round_started = time.perf_counter()
    proxy_offset = run.proxy.end() if run.proxy is not None else 0
    progress.start_round(server_round)
    arrays, trained, aggregation_record = _train_round(run, strategy, arrays, server_round=server_round)
    noise_record = client_dp_round_record(strategy)  # the noise this round's aggregate received
    noise_record |= client_level_privacy(
        strategy, config, rounds=server_round, sites=max(len(config.site_names), len(run.site_names))
    )
    trained_at = time.perf_counter()
    evaluation: dict[str, dict[str, float]] = {}
    last = server_round == config.train.rounds
    if config.train.evaluates(server_round, scan_geometry=config.task.scan_geometry):
        progress.phase(server_round, "evaluating")
        evaluation = _evaluate_round(run, strategy, arrays, server_round=server_round)
    every = config.evaluation.cross_site_every
    if config.evaluation.cross_site and (last or (every and server_round % every == 0)):
        progress.phase(server_round, "cross-site evaluation")
        cross_site_evaluation(run, arrays, server_round=server_round, final=last)
    evaluated_at = time.perf_counter()
    row = {
        "round": server_round,
        "seconds": round(time.perf_counter() - round_started, 4),
        "train_phase_s": round(trained_at - round_started, 4),
        "evaluate_phase_s": round(evaluated_at - trained_at, 4),
        "sites_trained": sorted(trained),
        "sites_evaluated": sorted(evaluation),
        **aggregation_record,
        **noise_record,
        **(run.proxy.record(proxy_offset) if run.proxy is not None else {}),
    }
    return _RoundDone(server_round=server_round, arrays=arrays, trained=trained, evaluation=evaluation, row=row)


def _commit_round(
    run: RunContext, strategy: Strategy, done: _RoundDone, *, layout: Layout, start_fields: dict[str, Any]
) -> None:
    """The round's row, then the checkpoint a resume continues from."""
    # The row goes first: a crash between the two leaves a row the resume drops, never a checkpointed round
    # without its row.
    run.run_dir.append_round(done.row)
    readmissions_recorded(run.run_dir)
    run.run_dir.save_checkpoint(
        "latest",
        {
            "round": done.server_round,
            "shared_state": layout.unpack(done.arrays),
            "strategy_state": strategy_state(strategy),
            "random_state": random.getstate(),
            "numpy_random_state": np.random.get_state(),
            **save_state(robust_layer(strategy)),
            **start_fields,
        },
    )


def _train_round(
    run: RunContext, strategy: Strategy, arrays: ArrayRecord, *, server_round: int
) -> tuple[ArrayRecord, dict[str, dict[str, float]], dict]:
    """Train at the sites and aggregate: the new global arrays, per-site metrics, and what the round
    log keeps about the aggregation."""
    config = run.config
    _wait_for_quorum(run, server_round=server_round)
    round_config = ConfigRecord(run.settings)
    if config.client_dp.enabled:
        round_config[CLIPPING_MODE] = config.client_dp.clipping
    if config.secagg.enabled:
        return _secure_train_round(run, strategy, arrays, server_round=server_round, round_config=round_config)
    robust = robust_layer(strategy)
    messages, quarantined = without_quarantined(
        with_deadline(
            strategy.configure_train(server_round, arrays, round_config, NodesAsOfNow(run.grid)), run.timeout
        ),
        robust=robust,
        site_of=run.site_of,
    )
    # Each update is written to disk as it arrives (fedmed.flower.server.robust.updates) and read back a slice at a
    # time by the robust layer; the files go with the round.
    with SpilledUpdates(robust.sent, folder=run.run_dir.path) as updates:
        collected = collect_train_replies(run, messages, arrays=arrays, start=robust.sent, updates=updates)
        outcome = outcome_of(messages, collected.replies, run=run, why_dropped=collected.why_dropped)
        outcome.refused = dict(sorted({**outcome.refused, **collected.refused}.items()))
        usable = collected.usable
        _check_train_quorum(
            run, server_round=server_round, usable=usable, asked=len(messages), outcome=outcome, quarantined=quarantined
        )
        rows = record_metrics(run.run_dir, usable, phase="train", server_round=server_round)
        robust.spilled = updates
        try:
            aggregated, _ = strategy.aggregate_train(server_round, usable)
        finally:
            robust.spilled = None
    if aggregated is None:
        raise RoundFailedError(f"round {server_round}: the strategy produced no aggregate from {len(usable)} updates")
    record = {
        **round_traffic(messages, upload=collected.upload_bytes, site_of=run.site_of),
        **({"decode_s": round(collected.decode_seconds, 4)} if config.compression.enabled else {}),
        "sites_dropped": outcome.dropped,
        **({"why_dropped": outcome.why_dropped} if outcome.why_dropped else {}),
        "sites_refused": outcome.refused,
        **robust.last_record,
    }
    return aggregated, by_site(rows), record


def _check_train_quorum(
    run: RunContext,
    *,
    server_round: int,
    usable: list[Message],
    asked: int,
    outcome: Outcome,
    quarantined: Collection[str],
) -> None:
    """Enough usable updates for the round to count, else RoundFailedError naming every failed site."""
    failures = outcome.describe()
    # A quarantined site is not asked to train: the quorum counts the sites that are.
    needed = quorum(run.config)
    if quarantined:
        sites = set(run.site_names.values()) | set(run.config.site_names)
        needed = min(needed, max(1, len(sites) - len(quarantined)))
    if len(usable) < needed:
        raise RoundFailedError(
            f"round {server_round}: {len(usable)} of {asked} site(s) returned an update, quorum is "
            f"{needed}. {'; '.join(failures) or 'No site replied.'} Fix the failing sites or lower "
            f"strategy.min_sites."
        )
    for failure in failures:
        logger.warning("round %d: dropped %s", server_round, failure)


def _secure_train_round(
    run: RunContext, strategy: Strategy, arrays: ArrayRecord, *, server_round: int, round_config: ConfigRecord
) -> tuple[ArrayRecord, dict[str, dict[str, float]], dict]:
    try:
        outcome = secure_train_round(
            run, strategy, arrays, server_round=server_round, round_config=round_config, needed=quorum(run.config)
        )
    except SecureRoundError as error:
        raise RoundFailedError(str(error)) from error
    usable = usable_replies(outcome.replies, phase="train", site_names=run.site_names)
    rows = record_metrics(run.run_dir, usable, phase="train", server_round=server_round)
    trained = by_site(rows)
    return outcome.arrays, trained, {**outcome.record, **secure_contributions(trained)}


def _evaluate_round(
    run: RunContext, strategy: Strategy, arrays: ArrayRecord, *, server_round: int
) -> dict[str, dict[str, float]]:
    round_config = ConfigRecord(run.settings)
    messages = with_deadline(
        strategy.configure_evaluate(server_round, arrays, round_config, NodesAsOfNow(run.grid)), run.timeout
    )
    replies = send_and_receive(run, messages, timeout=run.timeout)
    usable, implausible = refuse_implausible(
        usable_replies(replies, phase="evaluate", site_names=run.site_names), sent=None, settings=run.config.robust
    )
    for failure in [*outcome_of(messages, replies, run=run).describe(), *implausible.values()]:
        logger.warning("round %d: evaluation missing from %s", server_round, failure)
    return by_site(record_metrics(run.run_dir, usable, phase="evaluate", server_round=server_round))


def _wait_for_quorum(run: RunContext, *, server_round: int) -> None:
    """Wait (at most the round timeout) until enough sites are connected to train this round."""
    needed = quorum(run.config)
    deadline = time.monotonic() + run.timeout
    logged = False
    while len(connected := list(run.grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            missing = sorted(set(run.site_names.values()) - {run.site_names.get(node, "") for node in connected})
            raise RoundFailedError(
                f"round {server_round}: {len(connected)} site(s) connected, quorum is {needed}"
                + (f" (not connected: {', '.join(missing)})" if missing else "")
                + f"; waited {run.timeout:.0f} s. Start the missing sites or lower strategy.min_sites."
            )
        if not logged:
            logger.info("round %d: waiting for sites, %d of %d connected", server_round, len(connected), needed)
            logged = True
        time.sleep(1.0)


def _check_private_quorum(run: RunContext, plans: DpPlans, *, server_round: int) -> None:
    """Fewer sites with a DP-SGD plan than the quorum: the round would fail after the others had spent ε."""
    needed = quorum(run.config)
    if len(plans.plans) >= needed:
        return
    refusals = Outcome(refused=plans.refused).describe()
    raise RoundFailedError(
        f"round {server_round}: {len(plans.plans)} site(s) can train with DP-SGD, quorum is {needed}. "
        f"{'; '.join(refusals) or 'No site replied.'} The run stops before any site trains, so none is charged "
        f"for it. Fix the refusing sites or lower strategy.min_sites."
    )
