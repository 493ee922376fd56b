"""Keep a group of processes running: restart each one that dies, stop them all on SIGTERM.

Each child starts in its own process group, so stopping it also stops what it started (Flower's
ServerApp and ClientApp processes), and it asks the kernel for a signal when the supervisor dies,
so a supervisor killed with SIGKILL leaves nothing running unsupervised. A child that exits is
restarted on its own, with a backoff, and never given up on: a refusal from the coordinator can be
temporary (the node still marked online, its key not yet registered), and the log says which it is.
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


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log_file: Path
    # What a failed run means, from its output and how long the child has been failing in a row.
    diagnose: Callable[[str, float], str | None] | None = None
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

    def output_since_start(self) -> str:
        with self.log_file.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode("utf-8", errors="replace")

    def diagnosis(self, now: float) -> str | None:
        if self.diagnose is None:
            return None
        return self.diagnose(self.output_since_start(), now - (self.failing_since or self.started_at))


class Supervisor:
    def __init__(self, *, name: str, children: list[Child]) -> None:
        self.name = name
        self.children = children
        self._stopping = False

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns 0."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        try:
            for child in self.children:
                self._start(child)
            while not self._sleep(0.5):
                for child in self.children:
                    self._tend(child)
        finally:
            self._stop_all()
        logger.info("%s: stopped", self.name)
        return 0

    def _tend(self, child: Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                self._start(child)
            return
        if child.process is None or child.process.poll() is None:
            return
        _signal_group(child.process, signal.SIGKILL)  # what it started goes with it
        ran_for = now - child.started_at
        if ran_for > STABLE_AFTER_S:  # a new run of failures, if any, starts now
            child.backoff_s, child.failing_since = FIRST_BACKOFF_S, now
        else:
            child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
            child.failing_since = child.failing_since or child.started_at
        diagnosis = child.diagnosis(now)
        logger.warning(
            "%s: %s exited with code %s after %.0f s%s; restarting it in %.0f s (log: %s)",
            self.name,
            child.name,
            child.process.returncode,
            ran_for,
            f": {diagnosis}" if diagnosis else "",
            child.backoff_s,
            child.log_file,
        )
        child.restart_at = now + child.backoff_s

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
        with child.log_file.open("ab") as log:
            child.log_offset = log.tell()
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
