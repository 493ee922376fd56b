"""The supervisor with real processes: it restarts what dies, explains why, and takes its children
with it even when it is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from fedmed.deploy.local import alive, descendants, wait_for


def _start_supervisor(tmp_path: Path, children: str) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from fedmed.core.log import configure_console_logging
        from fedmed.deploy.supervisor import Child, Diagnosis, Refusal, Supervisor
        configure_console_logging()
        log = Path({str(tmp_path / "children.log")!r})
        env = dict(os.environ)
        sys.exit(Supervisor(name="test", children=[{children}]).run())
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=(tmp_path / "supervisor.out").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_children_die_with_a_supervisor_killed_outright(tmp_path: Path) -> None:
    supervisor = _start_supervisor(
        tmp_path, "Child('one', ['sleep', '600'], env, log), Child('two', ['sleep', '601'], env, log)"
    )
    try:
        wait_for(lambda: len(descendants(supervisor.pid)) == 2, timeout=30, what="the supervisor's children")
        children = descendants(supervisor.pid)
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait()
        wait_for(lambda: not any(alive(pid) for pid in children), timeout=10, what="the children to die")
    finally:
        for pid in descendants(supervisor.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_child_that_dies_is_restarted_alone_with_the_reason(tmp_path: Path) -> None:
    supervisor = _start_supervisor(
        tmp_path,
        "Child('flaky', ['sh', '-c', 'echo could not be activated; exit 7'], env, log, "
        "diagnose=lambda output, failing_s: 'still online' if 'activated' in output and failing_s < 60 else None), "
        "Child('steady', ['sleep', '600'], env, log)",
    )
    output = tmp_path / "supervisor.out"
    try:
        wait_for(lambda: output.read_text().count("started flaky") >= 3, timeout=30, what="flaky to be restarted twice")
        text = output.read_text()
        assert "flaky exited with code 7" in text
        assert ": still online; restarting it in" in text
        assert text.count("started steady") == 1, "a healthy child is not restarted with a failing one"
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
    assert "test: stopped" in output.read_text()


def test_a_lasting_refusal_is_said_once_retried_slowly_and_given_up_on(tmp_path: Path) -> None:
    # The child keeps running while it is turned away, as Flower's SuperNode does on the proxy's 403s.
    supervisor = _start_supervisor(
        tmp_path,
        "Child('refused', ['sh', '-c', 'echo 403 for you; sleep 600'], env, log, "
        "refusal=lambda output: Refusal('turned away', retry_after_s=1, give_up_after_s=4) "
        "if '403' in output else None), "
        "Child('steady', ['sleep', '600'], env, log)",
    )
    output = tmp_path / "supervisor.out"
    try:
        assert supervisor.wait(timeout=60) == 2, output.read_text()
    finally:
        for pid in descendants(supervisor.pid):
            os.kill(pid, signal.SIGKILL)
    text = output.read_text()
    assert text.count("turned away; retrying every 1 s, giving up after 4 s") == 1, text
    assert text.count("started refused") >= 2, "retried while refused"
    assert "refused still refused after" in text and "stopping (exit code 2)" in text
    assert "test: stopped" in text


def test_a_cause_that_clears_soon_caps_the_backoff(tmp_path: Path) -> None:
    supervisor = _start_supervisor(
        tmp_path,
        "Child('flaky', ['sh', '-c', 'echo still online; exit 7'], env, log, "
        "diagnose=lambda output, failing_s: Diagnosis('still online', retry_within_s=1)), ",
    )
    output = tmp_path / "supervisor.out"
    try:
        wait_for(lambda: output.read_text().count("started flaky") >= 5, timeout=30, what="flaky's fifth start")
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
    # Doubling would have said 2, 4, 8, 16 s.
    assert output.read_text().count("still online; restarting it in 1 s") >= 4
