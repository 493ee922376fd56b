"""What a person sees while a federation runs: one line per round in the log (round i/N, the primary metric
over the sites, s/round, ETA), each site's details under -v, and in a terminal a live bar under the lines.

The bar is transient and drawn only when the command asked for a live display and stderr is a terminal
(fedmed.core.log.live_console); a pipe, a file or a service journal gets the plain lines only.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

from fedmed.core.log import console_stream, live_console, logger
from fedmed.core.terminal import activity_display, is_terminal

# Up to this many sites the round line names each one; beyond, it gives the worst and best site.
SITES_NAMED = 4
# Metrics a site reports that are bookkeeping, not a score: left out of the -v lines.
BOOKKEEPING = ("num-examples", "train_steps")

# Validation this short is not worth a line, however it compares with a round of a tiny run's training.
ADVICE_MIN_S = 10.0

SiteMetrics = dict[str, dict[str, Any]]


class RoundProgress:
    """Use as a context manager around the round loop: the live bar (if any) is removed on the way out,
    whether the loop finished, failed or was interrupted."""

    def __init__(
        self, *, total_rounds: int, first_round: int = 1, metric: str, eval_every: int = 1, cache: str | None = None
    ) -> None:
        """`eval_every`: the run's evaluation interval (the last round always evaluates); `cache`: the sites'
        data.cache in scan geometry (None on a fixed grid), whose filling makes the first round slow."""
        self.total_rounds = total_rounds
        self.first_round = first_round
        self.metric = metric
        self.eval_every = eval_every
        # The memory cache is refilled by every process, the disk cache once (a resumed run finds it filled).
        self.fills_cache = cache == "memory" or (cache == "disk" and first_round == 1)
        self.cache = cache
        self.started: float | None = None  # when the first round of this process began
        self._display: _LiveBar | None = None
        self._phases: list[tuple[str, float]] = []  # the current round's phases and when each began
        self._timings: list[RoundTiming] = []  # this process's rounds
        self._advised = False

    def __enter__(self) -> RoundProgress:
        terminal = live_console()
        if terminal is not None:
            self._display = _LiveBar(terminal, total=self.total_rounds, done=self.first_round - 1)
            self._display.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._display is not None:
            self._display.stop()
            self._display = None

    def start_round(self, server_round: int) -> None:
        """A round begins (the pace counts from the first one this process runs: set-up is not a round)."""
        if self.started is None:
            self.started = time.perf_counter()
            if self.fills_cache:
                logger.info(
                    "the sites fill their %s caches of preprocessed cases in round %d%s: slower than later rounds; "
                    "the ETA waits for the next one",
                    self.cache,
                    server_round,
                    " (unless an earlier run with the same preprocessing did)" if self.cache == "disk" else "",
                )
        self._phases = []
        self.phase(server_round, "training")

    def phase(self, server_round: int, what: str) -> None:
        """The round's current phase (training, evaluating, ...), shown on the bar and timed."""
        self._phases.append((what, time.perf_counter()))
        if self._display is not None:
            self._display.describe(f"round {server_round}/{self.total_rounds} · {what}")

    def report(self, server_round: int, *, train: SiteMetrics, evaluation: SiteMetrics) -> None:
        """Log the round's line (the global model's metric over the sites, or the training loss when the
        round did not evaluate) and, at debug level, one line per site with all its numbers."""
        if self.started is None:
            self.started = time.perf_counter()
        timing = _timing(self._phases, ended=time.perf_counter())
        self._phases = []
        if timing is not None:
            self._timings.append(timing)
            self._advise(server_round, timing)
        per_round, eta = self._pace(server_round)
        logger.info(
            "%s",
            round_line(
                server_round,
                self.total_rounds,
                metric=self.metric,
                train=train,
                evaluation=evaluation,
                per_round=per_round,
                eta=eta,
            ),
        )
        for site in sorted(set(train) | set(evaluation)):
            logger.debug("round %d  site %s  %s", server_round, site, _details(train.get(site), evaluation.get(site)))
        if self._display is not None:
            self._display.advance(server_round, per_round=per_round, eta=eta)

    def _pace(self, server_round: int) -> tuple[float, Eta]:
        if not self._timings:  # rounds reported without being started: the wall clock since the first
            done = server_round - self.first_round + 1
            per_round = (time.perf_counter() - (self.started or time.perf_counter())) / max(done, 1)
            return per_round, per_round * (self.total_rounds - server_round)
        return estimate_pace(
            self._timings,
            server_round=server_round,
            total_rounds=self.total_rounds,
            eval_every=self.eval_every,
            first_filled_cache=self.fills_cache,
        )

    def _advise(self, server_round: int, timing: RoundTiming) -> None:
        """Once a run: validation took longer than the round's training and, at this interval, more than about a
        third of the run; the line names the train.eval_every that brings it under."""
        if (
            self._advised
            or timing.validate_s < ADVICE_MIN_S
            or timing.validate_s <= timing.train_s
            or timing.train_s <= 0
        ):
            return
        needed = math.ceil(2 * timing.validate_s / timing.train_s)  # e / (N t + e) <= 1/3
        fix = min(needed, self.total_rounds)
        if fix <= self.eval_every:  # already as rare as the advice would make it
            return
        self._advised = True
        logger.warning(
            "round %d: validation took %s and training %s: at one validation every %d round(s) it dominates the "
            "run; set train.eval_every = %d%s",
            server_round,
            _duration(timing.validate_s),
            _duration(timing.train_s),
            self.eval_every,
            fix,
            " (the last round only)" if fix == self.total_rounds else " to keep validation under a third of the run",
        )


class ValidationPending(float):
    """The ETA of the training alone: evaluation rounds remain and none has been timed yet."""


Eta = float | None  # None: unknown yet (only a round that filled the caches is timed)


@dataclass(frozen=True)
class RoundTiming:
    """Where one round's time went: training (and aggregation), then evaluation of every kind, of which
    validation at the sites ("evaluating") is a part."""

    train_s: float
    evaluate_s: float
    validate_s: float
    evaluated: bool

    @property
    def seconds(self) -> float:
        return self.train_s + self.evaluate_s

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RoundTiming:
        """From a row of rounds.jsonl, which does not tell validation from cross-site evaluation."""
        evaluate_s = float(row.get("evaluate_phase_s", 0.0))
        return cls(
            train_s=float(row.get("train_phase_s", row.get("seconds", 0.0))),
            evaluate_s=evaluate_s,
            validate_s=evaluate_s,
            evaluated=bool(row.get("sites_evaluated")) or evaluate_s > 0,
        )


def estimate_pace(
    timings: Sequence[RoundTiming], *, server_round: int, total_rounds: int, eval_every: int, first_filled_cache: bool
) -> tuple[float, Eta]:
    """Seconds per round and the time left after `server_round`. A first round that filled the sites' caches is
    left out once a later one is timed (until then the ETA is unknown); evaluation is costed only in the rounds
    left that evaluate (every `eval_every`-th and the last)."""
    counted = timings[1:] if first_filled_cache else timings
    if not counted:
        return timings[0].seconds, None if server_round < total_rounds else 0.0
    remaining = range(server_round + 1, total_rounds + 1)
    evaluations = sum(1 for number in remaining if number == total_rounds or number % eval_every == 0)
    evaluated = [timing.evaluate_s for timing in counted if timing.evaluated] or [
        timing.evaluate_s for timing in timings if timing.evaluated
    ]
    training = sum(timing.train_s for timing in counted) / len(counted)
    per_round = sum(timing.seconds for timing in counted) / len(counted)
    eta = training * len(remaining)
    if evaluations and not evaluated:
        return per_round, ValidationPending(eta)
    return per_round, eta + (sum(evaluated) / len(evaluated) if evaluated else 0.0) * evaluations


def _timing(phases: list[tuple[str, float]], *, ended: float) -> RoundTiming | None:
    if not phases:
        return None
    bounds = [*(start for _, start in phases[1:]), ended]
    spans = [(name, end - start) for (name, start), end in zip(phases, bounds, strict=True)]
    train_s = sum(span for name, span in spans if name == "training")
    return RoundTiming(
        train_s=train_s,
        evaluate_s=sum(span for _, span in spans) - train_s,
        validate_s=sum(span for name, span in spans if name == "evaluating"),
        evaluated=any(name != "training" for name, _ in spans),
    )


def round_line(
    server_round: int,
    total_rounds: int,
    *,
    metric: str,
    train: SiteMetrics,
    evaluation: SiteMetrics,
    per_round: float,
    eta: Eta,
) -> str:
    """`round 3/40  dice mean 0.712 (site-a 0.700, site-b 0.730)  2.1 s/round  ETA 1.3 min`."""
    if evaluation:
        name, values = metric, {site: m.get(metric) for site, m in evaluation.items()}
    else:
        name, values = "loss", {site: m.get("train_loss") for site, m in train.items()}
    return f"round {server_round}/{total_rounds}  {_over_sites(name, values)}  {per_round:.1f} s/round  ETA {_eta(eta)}"


def _over_sites(name: str, values: dict[str, Any]) -> str:
    if not values:
        return f"{name} n/a (no site replied)"
    known = {site: float(value) for site, value in values.items() if _finite(value)}
    mean = _fmt(sum(known.values()) / len(known)) if known else "n/a"
    if len(values) <= SITES_NAMED:
        sites = ", ".join(f"{site} {_fmt(value)}" for site, value in sorted(values.items()))
        return f"{name} mean {mean} ({sites})"
    if not known:
        return f"{name} mean n/a ({len(values)} sites)"
    low = min(known, key=known.__getitem__)
    high = max(known, key=known.__getitem__)
    return f"{name} mean {mean} over {len(values)} sites (min {low} {_fmt(known[low])}, max {high} {_fmt(known[high])})"


def _details(train: dict[str, Any] | None, evaluation: dict[str, Any] | None) -> str:
    numbers = {**(train or {}), **(evaluation or {})}
    shown = [
        f"{key} {_fmt(value)}"
        for key, value in numbers.items()
        if key not in BOOKKEEPING and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    return ", ".join(shown) or "no metrics"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return "n/a"
    return f"{value:.3f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _eta(eta: Eta) -> str:
    if eta is None:
        return "estimating"
    return _duration(eta) + (" + validation" if isinstance(eta, ValidationPending) else "")


class _LiveBar:
    """The rounds bar, with the step a site is in (fedmed.core.terminal.show_activity) beneath it; fedmed's
    log lines print above it while it is on screen."""

    def __init__(self, terminal: IO[str], *, total: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class _Progress(Progress):
            activity: str | None = None

            def get_renderables(self) -> Iterable[Any]:
                yield self.make_tasks_table(self.tasks)
                if self.activity:
                    yield Text(f"  {self.activity}", style="dim", overflow="ellipsis", no_wrap=True)

        # soft_wrap: a long log line is wrapped by the terminal, as without the bar, not cut into two lines.
        console = Console(file=terminal, force_terminal=True, soft_wrap=True)
        self._progress = _Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[pace]}"),
            console=console,
            transient=True,
            # Other writers' lines (warnings, Ray's) print above the bar too; stdout only when it is this
            # terminal as well, never a file the output was sent to.
            redirect_stdout=is_terminal(sys.stdout),
            redirect_stderr=is_terminal(sys.stderr),
        )
        self._task = self._progress.add_task(f"round {done + 1}/{total}", total=total, completed=done, pace="")
        self._on_screen = contextlib.ExitStack()

    def start(self) -> None:
        from rich.file_proxy import FileProxy

        self._progress.start()
        self._on_screen.callback(self._progress.stop)
        console = self._progress.console
        # The log handler holds the terminal itself; through the proxy its lines print above the bar.
        self._on_screen.enter_context(console_stream(FileProxy(console, console.file)))
        self._on_screen.enter_context(activity_display(self._show_activity))

    def stop(self) -> None:
        self._on_screen.close()

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)

    def advance(self, server_round: int, *, per_round: float, eta: Eta) -> None:
        self._progress.update(self._task, completed=server_round, pace=f"{per_round:.1f} s/round  ETA {_eta(eta)}")

    def _show_activity(self, text: str | None) -> None:
        self._progress.activity = text
