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
