"""A site's long steps made visible: local epochs and validation that take more than a few seconds.

Short steps stay quiet (debug lines only), so a quick simulation prints one line per round. An epoch or a
validation past SLOW_STEP_S is shown on the live display when one is on screen in this process (the
in-process engine under a terminal: fedmed.core.terminal), else it gets an INFO line when it ends (a Ray
actor, a deployed site's daemon log).

The training loop (fedmed.tasks.train_local) reports each step through its `on_step` hook.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from fedmed.core.log import logger
from fedmed.core.terminal import display_on, show_activity

SLOW_STEP_S = 5.0


class TrainingWatch:
    """Counts the batches of one local training; use through `watch_training`."""

    def __init__(self, *, label: str, epochs: int, batches_per_epoch: int) -> None:
        self.label = label
        self.epochs = epochs
        self.batches_per_epoch = max(batches_per_epoch, 1)
        self.slow_s = SLOW_STEP_S
        self.started = time.perf_counter()
        self._epoch_started = self.started
        self._shown = False

    def step(self, epoch: int, batch: int) -> None:
        """train_local's `on_step` hook: `batch` (0-based) of `epoch` is about to run."""
        if batch == 0 and epoch > 0:
            self._epoch_done(epoch)  # the first step of the next epoch: the previous one ended
        now = time.perf_counter()
        if now - self.started > self.slow_s:
            self._shown = show_activity(
                f"{self.label}: epoch {epoch + 1}/{self.epochs}, batch {batch + 1}/{self.batches_per_epoch}, "
                f"{now - self.started:.0f} s"
            )

    def finish(self) -> None:
        """The training ended: report its last epoch."""
        self._epoch_done(self.epochs)

    def _epoch_done(self, epoch: int) -> None:
        now = time.perf_counter()
        seconds, self._epoch_started = now - self._epoch_started, now
        slow = seconds > self.slow_s and not self._shown
        (logger.info if slow else logger.debug)("%s: epoch %d/%d took %.1f s", self.label, epoch, self.epochs, seconds)


@contextlib.contextmanager
def watch_training(*, label: str, epochs: int, batches_per_epoch: int) -> Iterator[TrainingWatch]:
    """Around one call of the training loop, with `watch.step` as its `on_step` hook."""
    watch = TrainingWatch(label=label, epochs=epochs, batches_per_epoch=batches_per_epoch)
    try:
        yield watch
        watch.finish()
    finally:
        if watch._shown:
            show_activity(None)


@contextlib.contextmanager
def watch_validation(*, label: str, cases: int) -> Iterator[None]:
    """Around one validation: on the live display once it has run SLOW_STEP_S, in the log if it was slow."""
    shown = threading.Event()

    def show() -> None:
        if show_activity(f"{label}: validating {cases} case(s), more than {SLOW_STEP_S:.0f} s"):
            shown.set()

    timer = threading.Timer(SLOW_STEP_S, show) if display_on() else None
    started = time.perf_counter()
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()  # after this the timer can no longer show anything: clearing below is final
        if shown.is_set():
            show_activity(None)
    seconds = time.perf_counter() - started
    slow = seconds > SLOW_STEP_S and not shown.is_set()
    (logger.info if slow else logger.debug)("%s: validation of %d case(s) took %.1f s", label, cases, seconds)
