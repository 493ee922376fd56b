"""The round line, and the live bar: drawn only for a command that asked for it on a terminal, with the log
lines printed above it and the console handed back afterwards."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from fedmed.core.log import configure_console_logging, logger
from fedmed.core.terminal import show_activity
from fedmed.runs.progress import RoundProgress, round_line


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def console(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTerminal]:
    """A fake terminal for fedmed's console logging (set up by the test); the logger restored afterwards."""
    saved = (list(logger.handlers), logger.level, logger.propagate)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    monkeypatch.setenv("TERM", "xterm-256color")
    yield FakeTerminal()
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handlers, level, propagate = saved
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def _log_to(terminal: FakeTerminal, level: int, *, live: bool = False) -> None:
    configure_console_logging(level, live=live)
    # Only fedmed's console handler: pytest may have its log-capture handler on the logger too.
    (handler,) = [h for h in logger.handlers if getattr(h, "_fedmed", False)]
    handler.setStream(terminal)  # stderr itself is pytest's capture


def _two_rounds() -> None:
    with RoundProgress(total_rounds=2, metric="dice") as progress:
        for number in (1, 2):
            progress.start_round(number)
            show_activity("site a: round 1: epoch 1/1, batch 1/1, 6 s")
            progress.report(number, train={"a": {"train_loss": 0.5}}, evaluation={"a": {"dice": 0.25 * number}})


def test_round_line_names_few_sites_and_summarizes_many() -> None:
    few = round_line(
        3, 40, metric="dice", train={}, evaluation={"b": {"dice": 0.6}, "a": {"dice": 0.8}}, per_round=2.0, eta=74.0
    )
    assert few == "round 3/40  dice mean 0.700 (a 0.800, b 0.600)  2.0 s/round  ETA 74 s"
    sites = {f"site-{index}": {"train_loss": 0.1 * index} for index in range(1, 7)}
    many = round_line(1, 10, metric="dice", train=sites, evaluation={}, per_round=30.0, eta=270.0)
    assert many == (
        "round 1/10  loss mean 0.350 over 6 sites (min site-1 0.100, max site-6 0.600)  30.0 s/round  ETA 4.5 min"
    )


def test_a_live_command_on_a_terminal_draws_a_bar_under_the_log_lines(console: FakeTerminal) -> None:
    _log_to(console, logging.INFO, live=True)
    _two_rounds()
    output = console.getvalue()
    assert "\x1b[" in output and "━" in output, "no bar drawn"
    assert output.count("INFO round 1/2  dice mean 0.250") == 1 and output.count("INFO round 2/2") == 1
    assert "epoch 1/1, batch 1/1" in output  # a site's step, shown under the bar
    (handler,) = [h for h in logger.handlers if getattr(h, "_fedmed", False)]
    assert handler.stream is console, "the log handler writes to the terminal again once the bar is gone"


def test_a_command_without_a_live_display_writes_plain_lines_even_on_a_terminal(console: FakeTerminal) -> None:
    _log_to(console, logging.INFO)  # e.g. a server or site daemon sharing the terminal
    _two_rounds()
    lines = console.getvalue().splitlines()
    assert [line.split(" ", 1)[1][:17] for line in lines] == ["INFO round 1/2  d", "INFO round 2/2  d"]
    assert "\x1b" not in console.getvalue() and "\r" not in console.getvalue()


def test_per_site_details_only_at_debug(console: FakeTerminal) -> None:
    _log_to(console, logging.DEBUG)
    _two_rounds()
    assert "round 1  site a  train_loss 0.500, dice 0.250" in console.getvalue()


class Clock:
    """The progress module's clock, moved by hand: each phase of a round takes the seconds a test gives it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr("fedmed.runs.progress.time.perf_counter", lambda: self.now)

    def round(self, progress: RoundProgress, number: int, *, train_s: float, validate_s: float = 0.0) -> None:
        progress.start_round(number)
        self.now += train_s
        evaluation = {}
        if validate_s:
            progress.phase(number, "evaluating")
            self.now += validate_s
            evaluation = {"a": {"dice": 0.5}}
        progress.report(number, train={"a": {"train_loss": 0.5}}, evaluation=evaluation)


def _round_lines(terminal: FakeTerminal) -> list[str]:
    return [line for line in terminal.getvalue().splitlines() if " INFO round " in line]


def test_a_round_that_fills_the_disk_cache_is_announced_and_not_extrapolated(
    console: FakeTerminal, monkeypatch: pytest.MonkeyPatch
) -> None:
    _log_to(console, logging.INFO)
    clock = Clock(monkeypatch)
    with RoundProgress(total_rounds=10, metric="dice", eval_every=5, cache="disk") as progress:
        clock.round(progress, 1, train_s=300.0)  # preprocessing every case on the way
        clock.round(progress, 2, train_s=10.0)
        clock.round(progress, 3, train_s=10.0)
    output = console.getvalue()
    assert "fill their disk caches of preprocessed cases in round 1 (unless an earlier run" in output
    assert "slower than later rounds; the ETA waits for the next one" in output
    lines = _round_lines(console)
    assert lines[0].endswith("300.0 s/round  ETA estimating"), lines
    # 8 rounds of 10 s left; two of them (5 and 10) evaluate and no validation was timed yet.
    assert lines[1].endswith("10.0 s/round  ETA 80 s + validation"), lines


def test_the_eta_costs_validation_only_in_the_rounds_that_validate(
    console: FakeTerminal, monkeypatch: pytest.MonkeyPatch
) -> None:
    _log_to(console, logging.INFO)
    clock = Clock(monkeypatch)
    with RoundProgress(total_rounds=6, metric="dice", eval_every=2) as progress:
        clock.round(progress, 1, train_s=10.0)
        clock.round(progress, 2, train_s=10.0, validate_s=30.0)
    assert "fill their" not in console.getvalue()  # a fixed-grid run has no cache to fill
    lines = _round_lines(console)
    assert lines[0].endswith("ETA 50 s + validation"), lines
    assert lines[1].endswith("25.0 s/round  ETA 100 s"), lines  # 4 x 10 s + 2 x 30 s (rounds 4 and 6)


def test_validation_longer_than_training_names_the_eval_every_that_fixes_it(
    console: FakeTerminal, monkeypatch: pytest.MonkeyPatch
) -> None:
    _log_to(console, logging.INFO)
    clock = Clock(monkeypatch)
    with RoundProgress(total_rounds=40, metric="dice", eval_every=2) as progress:
        clock.round(progress, 1, train_s=6.0)
        clock.round(progress, 2, train_s=6.0, validate_s=5.0)  # shorter than training: nothing to say
        assert "WARNING" not in console.getvalue()
        clock.round(progress, 3, train_s=6.0)
        clock.round(progress, 4, train_s=6.0, validate_s=48.0)
        clock.round(progress, 6, train_s=6.0, validate_s=48.0)
    (warning,) = [line for line in console.getvalue().splitlines() if "WARNING" in line]  # once a run
    assert "round 4: validation took 48 s and training 6 s" in warning
    assert "set train.eval_every = 16 to keep validation under a third of the run" in warning  # 2 x 48 / 6


def test_an_interval_long_enough_already_gets_no_advice(console: FakeTerminal, monkeypatch: pytest.MonkeyPatch) -> None:
    _log_to(console, logging.INFO)
    clock = Clock(monkeypatch)
    with RoundProgress(total_rounds=10, metric="dice", eval_every=10) as progress:
        clock.round(progress, 10, train_s=6.0, validate_s=20.0)  # needs every 7: every 10 is enough
    assert "WARNING" not in console.getvalue()
    with RoundProgress(total_rounds=10, metric="dice", eval_every=1) as progress:
        clock.round(progress, 1, train_s=6.0, validate_s=600.0)
    assert "set train.eval_every = 10 (the last round only)" in console.getvalue()


def test_a_deployed_runs_rows_give_the_same_estimate() -> None:
    """`fedmed run --wait` prints its lines from rounds.jsonl: the same rule, from the rows' phase times."""
    from fedmed.runs.progress import RoundTiming, estimate_pace

    rows = [
        {"round": 1, "train_phase_s": 300.0, "evaluate_phase_s": 0.0, "sites_evaluated": []},
        {"round": 2, "train_phase_s": 10.0, "evaluate_phase_s": 60.0, "sites_evaluated": ["a"]},
        {"round": 3, "train_phase_s": 10.0, "evaluate_phase_s": 0.0, "sites_evaluated": []},
    ]
    timings = [RoundTiming.from_row(row) for row in rows]
    pace = {"total_rounds": 10, "eval_every": 2, "first_filled_cache": True}
    assert estimate_pace(timings[:1], server_round=1, **pace) == (300.0, None)
    per_round, eta = estimate_pace(timings, server_round=3, **pace)
    assert per_round == 40.0 and eta == 7 * 10.0 + 4 * 60.0  # rounds 4-10; 4, 6, 8 and 10 evaluate
    assert estimate_pace(timings, server_round=3, **{**pace, "first_filled_cache": False})[0] == pytest.approx(380 / 3)
