"""Keep a group of processes running: restart each one that dies, stop them all on SIGTERM.

Each child starts in its own process group, so stopping it also stops what it started (Flower's
ServerApp and ClientApp processes), and it asks the kernel for a signal when the supervisor dies,
so a supervisor killed with SIGKILL leaves nothing running unsupervised. A child that exits is
restarted on its own, with a backoff: a refusal from the coordinator can be temporary (the node still
marked online, its key not yet registered), and the log says which it is. Only a lasting refusal that
a child's own hook recognises (a site whose certificate the coordinator revoked) is given up on: the
child is stopped and retried slowly, the reason said once, and after a bounded time the supervisor
stops everything and returns exit code 2 (a fault the admin must fix).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedmed.core.lifetime import die_with_parent
from fedmed.core.log import logger

STOP_GRACE_S = 10.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_AFTER_S = 120.0  # a child that ran this long before dying restarts promptly again
REFUSAL_CLEARED_AFTER_S = 30.0  # a child refused before that has run this long without it is accepted again
LOG_MODE = 0o600
GAVE_UP = 2  # the exit code of a supervisor that gave up on a lasting refusal (systemd: no restart)


@dataclass(frozen=True)
class Diagnosis:
    """What a child's failure means, said with its restart. `retry_within_s` caps the backoff while the cause
    clears by itself soon (the coordinator still counting a dead node online): doubling would overshoot it."""

    reason: str
    retry_within_s: float | None = None


@dataclass(frozen=True)
class Refusal:
    """A lasting refusal seen in a child's output, running or not: the child is stopped and retried every
    `retry_after_s`, `message` is said once, and after `give_up_after_s` of it the supervisor stops."""

    message: str
    retry_after_s: float
    give_up_after_s: float


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log_file: Path
    # What a failed run means, from its output and how long the child has been failing in a row.
    diagnose: Callable[[str, float], str | Diagnosis | None] | None = None
    # A lasting refusal in the output since the child started (checked while it runs, too).
    refusal: Callable[[str], Refusal | None] | None = None
    after_start: Callable[[], None] | None = None  # e.g. register the site keys once the SuperLink serves
    # Sent by the kernel if the supervisor dies. SIGKILL by default: the power-loss case that every part already
    # survives, and immediate (Flower's processes take many seconds to shut down on SIGTERM, long enough to
    # collide with the supervisor's successor over their ports).
    death_signal: signal.Signals = signal.SIGKILL
    process: subprocess.Popen | None = None
    log_offset: int = 0
    started_at: float = 0.0
    backoff_s: float = FIRST_BACKOFF_S
    restart_at: float | None = None
    failing_since: float | None = None
    refused: Refusal | None = None
    refused_since: float | None = None
    scanned_to: int = 0

    def output_since_start(self) -> str:
        with self.log_file.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode("utf-8", errors="replace")

    def diagnosis(self, now: float) -> Diagnosis | None:
        if self.diagnose is None:
            return None
        found = self.diagnose(self.output_since_start(), now - (self.failing_since or self.started_at))
        return Diagnosis(found) if isinstance(found, str) else found

    def lasting_refusal(self) -> Refusal | None:
        """The refusal hook on the output written since the last look (the log can grow for days)."""
        if self.refusal is None:
            return None
        with self.log_file.open("rb") as log:
            # A little overlap, so that a line written in two pieces is still seen whole.
            start = max(self.log_offset, self.scanned_to - 256)
            log.seek(start)
            new = log.read()
        self.scanned_to = start + len(new)
        return self.refusal(new.decode("utf-8", errors="replace"))


class Supervisor:
    def __init__(self, *, name: str, children: list[Child]) -> None:
        self.name = name
        self.children = children
        self._stopping = False

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (returns 0) or a lasting refusal outlasts its bound (returns GAVE_UP)."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        code = 0
        try:
            for child in self.children:
                self._start(child)
            while not code and not self._sleep(0.5):
                for child in self.children:
                    code = code or self._tend(child)
        finally:
            self._stop_all()
        logger.info("%s: stopped", self.name)
        return code

    def _tend(self, child: Child) -> int:
        """Look after one child; returns GAVE_UP when its lasting refusal outlasted its bound, else 0."""
        now = time.monotonic()
        if child.restart_at is not None:
            if child.refused is not None and now - child.refused_since >= child.refused.give_up_after_s:
                return self._give_up(child, now)
            if now >= child.restart_at:
                self._start(child)
            return 0
        if child.process is None:
            return 0
        refusal = child.lasting_refusal()
        if refusal is not None:
            self._refused(child, refusal, now)
            return 0
        if child.process.poll() is None:
            if child.refused is not None and now - child.started_at > REFUSAL_CLEARED_AFTER_S:
                logger.info("%s: %s is accepted again", self.name, child.name)
                child.refused = child.refused_since = None
            return 0
        _signal_group(child.process, signal.SIGKILL)  # what it started goes with it
        ran_for = now - child.started_at
        if ran_for > STABLE_AFTER_S:  # a new run of failures, if any, starts now
            child.backoff_s, child.failing_since = FIRST_BACKOFF_S, now
        else:
            child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
            child.failing_since = child.failing_since or child.started_at
        diagnosis = child.diagnosis(now)
        if diagnosis is not None and diagnosis.retry_within_s is not None:
            child.backoff_s = min(child.backoff_s, diagnosis.retry_within_s)
        logger.warning(
            "%s: %s exited with code %s after %.0f s%s; restarting it in %.0f s (log: %s)",
            self.name,
            child.name,
            child.process.returncode,
            ran_for,
            f": {diagnosis.reason}" if diagnosis else "",
            child.backoff_s,
            child.log_file,
        )
        child.restart_at = now + child.backoff_s
        return 0

    def _refused(self, child: Child, refusal: Refusal, now: float) -> None:
        """Stop the refused child (no more requests the other side turns away) and retry it slowly."""
        _signal_group(child.process, signal.SIGKILL)
        child.process.wait()
        if child.refused is None:  # said once, however many retries follow
            child.refused, child.refused_since = refusal, now
            logger.error(
                "%s: %s; retrying every %.0f s, giving up after %.0f s",
                self.name,
                refusal.message,
                refusal.retry_after_s,
                refusal.give_up_after_s,
            )
        child.restart_at = now + refusal.retry_after_s

    def _give_up(self, child: Child, now: float) -> int:
        logger.error(
            "%s: %s still refused after %.0f s; stopping (exit code %d): %s",
            self.name,
            child.name,
            now - child.refused_since,
            GAVE_UP,
            child.refused.message,
        )
        return GAVE_UP

    def _request_stop(self, signum: int, _frame: object) -> None:
        logger.info("%s: received %s, stopping", self.name, signal.Signals(signum).name)
        self._stopping = True

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when stopping."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stopping:
            time.sleep(min(0.2, seconds))
        return self._stopping

    def _start(self, child: Child) -> None:
        child.log_file.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only, like everything a daemon keeps: logs name files, nodes and runs. A log left by an
        # older version is narrowed too.
        descriptor = os.open(child.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, LOG_MODE)
        if os.fstat(descriptor).st_mode & 0o777 != LOG_MODE:
            os.fchmod(descriptor, LOG_MODE)
        with os.fdopen(descriptor, "ab") as log:
            child.log_offset = child.scanned_to = log.seek(0, os.SEEK_END)
            child.process = subprocess.Popen(
                child.command,
                env=child.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, parent_pid=os.getpid(), signum=child.death_signal),
            )
        child.started_at = time.monotonic()
        child.restart_at = None
        logger.info("%s: started %s (pid %d)", self.name, child.name, child.process.pid)
        if child.after_start is not None:
            try:
                child.after_start()
            except Exception as error:  # reported; the process keeps running and is watched as usual
                logger.error("%s: after starting %s: %s", self.name, child.name, error)

    def _stop_all(self) -> None:
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in reversed(running):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                logger.warning("%s: %s ignored SIGTERM for %.0f s; killing it", self.name, child.name, STOP_GRACE_S)
            # Whatever the child started (Flower's app processes) goes with it.
            _signal_group(child.process, signal.SIGKILL)
            child.process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
