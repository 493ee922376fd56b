"""Keep a group of processes running: restart them with backoff, stop them all on SIGTERM.

Each child starts in its own process group, so stopping it also stops what it started (Flower's
ServerApp and ClientApp processes). A child whose last output holds a fatal marker (e.g. Flower's
"Exit Code: 305" when the SuperLink refuses this site's key) stops the group with an explanation
instead of a restart loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmed.core.log import logger

STOP_GRACE_S = 10.0
FATAL_STRIKES = 4
MAX_BACKOFF_S = 60.0


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log_file: Path
    fatal_markers: dict[str, str] = field(default_factory=dict)  # text in the child's output -> explanation
    process: subprocess.Popen | None = None
    log_offset: int = 0
    marker_strikes: int = 0

    def output_since_start(self) -> str:
        with self.log_file.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode("utf-8", errors="replace")


class FatalChildError(Exception):
    """A child exited in a way that restarting cannot fix."""


class Supervisor:
    def __init__(self, *, name: str, children: list[Child], after_start: Callable[[], None] | None = None) -> None:
        self.name = name
        self.children = children
        self.after_start = after_start  # runs after every (re)start, e.g. to register site keys
        self._stopping = False

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal child exit (exit 3)."""
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        backoff = 1.0
        try:
            self._start_all()
            started = time.monotonic()
            while not self._stopping:
                time.sleep(0.5)
                failed = [child for child in self.children if child.process and child.process.poll() is not None]
                if not failed or self._stopping:
                    continue
                for child in failed:
                    code = child.process.returncode
                    output = child.output_since_start()
                    marked = [text for marker, text in child.fatal_markers.items() if marker in output]
                    child.marker_strikes = child.marker_strikes + 1 if marked else 0
                    # A refusal can be a race (the server still registering keys): believe it on repetition.
                    if marked and child.marker_strikes >= FATAL_STRIKES:
                        raise FatalChildError(f"{child.name} exited ({code}): {marked[0]}")
                    logger.warning(
                        "%s: %s exited with code %s; restarting everything in %.0f s (log: %s)",
                        self.name,
                        child.name,
                        code,
                        backoff,
                        child.log_file,
                    )
                self._stop_all()
                if self._sleep(backoff):
                    break
                # A child that ran a good while before failing restarts promptly next time.
                backoff = 1.0 if time.monotonic() - started > 5 * MAX_BACKOFF_S else min(backoff * 2, MAX_BACKOFF_S)
                self._start_all()
                started = time.monotonic()
        except FatalChildError as error:
            logger.error("%s: %s", self.name, error)
            self._stop_all()
            return 3
        self._stop_all()
        logger.info("%s: stopped", self.name)
        return 0

    def _request_stop(self, signum: int, _frame: object) -> None:
        logger.info("%s: received %s, stopping", self.name, signal.Signals(signum).name)
        self._stopping = True

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when stopping."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stopping:
            time.sleep(0.2)
        return self._stopping

    def _start_all(self) -> None:
        for child in self.children:
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
                )
            logger.info("%s: started %s (pid %d)", self.name, child.name, child.process.pid)
        if self.after_start is not None:
            try:
                self.after_start()
            except Exception as error:  # reported; the processes keep running
                logger.error("%s: %s", self.name, error)

    def _stop_all(self) -> None:
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
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
