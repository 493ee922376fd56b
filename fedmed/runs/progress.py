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
from collections.abc import Iterable
from types import TracebackType
from typing import IO, Any

from fedmed.core.log import console_stream, live_console, logger
from fedmed.core.terminal import activity_display, is_terminal

# Up to this many sites the round line names each one; beyond, it gives the worst and best site.
SITES_NAMED = 4
# Metrics a site reports that are bookkeeping, not a score: left out of the -v lines.
BOOKKEEPING = ("num-examples", "train_steps")

SiteMetrics = dict[str, dict[str, Any]]


class RoundProgress:
    """Use as a context manager around the round loop: the live bar (if any) is removed on the way out,
    whether the loop finished, failed or was interrupted."""

    def __init__(self, *, total_rounds: int, first_round: int = 1, metric: str) -> None:
        self.total_rounds = total_rounds
        self.first_round = first_round
        self.metric = metric
        self.started: float | None = None  # when the first round of this process began
        self._display: _LiveBar | None = None

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
        self.phase(server_round, "training")

    def phase(self, server_round: int, what: str) -> None:
        """The round's current phase (training, evaluating, ...), shown on the bar."""
        if self._display is not None:
            self._display.describe(f"round {server_round}/{self.total_rounds} · {what}")

    def report(self, server_round: int, *, train: SiteMetrics, evaluation: SiteMetrics) -> None:
        """Log the round's line (the global model's metric over the sites, or the training loss when the
        round did not evaluate) and, at debug level, one line per site with all its numbers."""
        if self.started is None:
            self.started = time.perf_counter()
        done = server_round - self.first_round + 1
        per_round = (time.perf_counter() - self.started) / max(done, 1)
        eta = per_round * (self.total_rounds - server_round)
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


def round_line(
    server_round: int,
    total_rounds: int,
    *,
    metric: str,
    train: SiteMetrics,
    evaluation: SiteMetrics,
    per_round: float,
    eta: float,
) -> str:
    """`round 3/40  dice mean 0.712 (site-a 0.700, site-b 0.730)  2.1 s/round  ETA 1.3 min`."""
    if evaluation:
        name, values = metric, {site: m.get(metric) for site, m in evaluation.items()}
    else:
        name, values = "loss", {site: m.get("train_loss") for site, m in train.items()}
    return (
        f"round {server_round}/{total_rounds}  {_over_sites(name, values)}  "
        f"{per_round:.1f} s/round  ETA {_duration(eta)}"
    )


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

    def advance(self, server_round: int, *, per_round: float, eta: float) -> None:
        self._progress.update(self._task, completed=server_round, pace=f"{per_round:.1f} s/round  ETA {_duration(eta)}")

    def _show_activity(self, text: str | None) -> None:
        self._progress.activity = text
