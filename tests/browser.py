"""A real headless browser (Debian Chromium) for pages a person opens offline: the one way tests run it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_TIMEOUT_S = 60
# Chromium writes console messages to stderr as `[pid:tid:time:INFO:CONSOLE:<line>] "text", source: ...`
# (older builds: `CONSOLE(<line>)`), whatever the console level.
CONSOLE_LINE = re.compile(r"^\[[^\]]*:CONSOLE[(:]\d+\)?\] (?P<message>.*)$", re.MULTILINE)


def run_chromium(chromium: Path, page: Path, *, extra: list[str], scratch: Path) -> tuple[str, str]:
    """Run headless Chromium on a file:// page; return stdout and stderr. Nothing it started outlives the call."""
    profile = scratch / "profile"
    # Without the background-networking flags Chromium dials out at start-up; HOME under scratch keeps it off
    # the user's own profile.
    command = [
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        *extra,
        page.resolve().as_uri(),
    ]
    env = {**os.environ, "HOME": str(scratch), "XDG_CONFIG_HOME": str(scratch / "config")}
    env["XDG_CACHE_HOME"] = str(scratch / "cache")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
    finally:
        # The Debian launcher is a shell script; the browser, its zygote and crashpad are its children in the
        # session started here, so the whole group goes, also after a timeout.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=CHROMIUM_TIMEOUT_S)
    assert process.returncode == 0, f"chromium exited with {process.returncode}:\n{stderr[-3000:]}"
    leftovers = _processes_using(profile)
    assert not leftovers, f"chromium processes still running after the call: {leftovers}"
    return stdout, stderr


def _processes_using(profile: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(profile).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # the process ended while we looked
                continue
    return found
