"""A site's slow steps: an epoch or a validation past the threshold is logged at INFO, or shown on the live
display when one is on screen; quick ones only at DEBUG."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from fedmed.core.log import logger
from fedmed.core.terminal import activity_display
from fedmed.site import step_watch


@pytest.fixture
def lines() -> Iterator[list[tuple[int, str]]]:
    """(level, message) of what fedmed logs, whether or not its logger propagates to pytest's."""
    records: list[tuple[int, str]] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append((record.levelno, record.getMessage()))  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _train(*, epochs: int = 2, batches: int = 3) -> None:
    with step_watch.watch_training(label="site a: round 4", epochs=epochs, batches_per_epoch=batches) as watch:
        for epoch in range(epochs):
            for batch in range(batches):
                watch.step(epoch, batch)  # what train_local's on_step hook calls


def test_slow_epochs_get_an_info_line_each(lines: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_watch, "SLOW_STEP_S", 0.0)  # every epoch counts as slow
    _train()
    info = [message.split(" took ")[0] for level, message in lines if level == logging.INFO]
    assert info == ["site a: round 4: epoch 1/2", "site a: round 4: epoch 2/2"]


def test_quick_epochs_stay_at_debug(lines: list[tuple[int, str]]) -> None:
    _train()
    assert [level for level, _ in lines] == [logging.DEBUG, logging.DEBUG]


def test_on_a_live_display_slow_epochs_are_shown_not_logged(
    lines: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_watch, "SLOW_STEP_S", 0.0)
    shown: list[str | None] = []
    with activity_display(shown.append):
        _train()
    assert shown[0].startswith("site a: round 4: epoch 1/2, batch 1/3")
    assert shown[-2].startswith("site a: round 4: epoch 2/2, batch 3/3")
    assert shown[-1] is None, "the display's line is cleared when the training ends"
    assert not [message for level, message in lines if level == logging.INFO]


def test_slow_validation_is_logged_or_shown(lines: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step_watch, "SLOW_STEP_S", 0.0)
    with step_watch.watch_validation(label="site a", cases=3):
        pass
    assert [level for level, message in lines if message.startswith("site a: validation of 3 case(s) took")] == [
        logging.INFO
    ]

    lines.clear()
    shown: list[str | None] = []
    on_screen = threading.Event()

    def sink(text: str | None) -> None:
        shown.append(text)
        on_screen.set()

    with activity_display(sink), step_watch.watch_validation(label="site a", cases=3):
        assert on_screen.wait(timeout=30), "the display never showed the validation"
    assert shown[0].startswith("site a: validating 3 case(s)") and shown[-1] is None
    assert [level for level, _ in lines] == [logging.DEBUG]
