"""Where a deployed run writes is the coordinator's decision: one-use submission tokens.

`fedmed run` creates (or, to resume, picks) the run directory, records it under a fresh random token
in the coordinator's state folder and sends Flower only the token. The ServerApp exchanges the token
for the directory before it writes anything. A run submitted by anyone else (a forged token, a reused
one, or a run config naming a directory) finds nothing to exchange and is refused, so no submitted
value can choose, or reach, another run's files.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from fedmed.core.errors import FedmedError
from fedmed.core.files import write_text_atomic

SUBMISSIONS = "submissions"
USED = "used"
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)


class SubmissionError(FedmedError):
    """A deployed run's submission token does not lead to a run directory this coordinator made."""


def issue(state_dir: Path, run_dir: Path) -> str:
    """Record `run_dir` under a new token (file readable by the coordinator's user only); returns the token."""
    token = secrets.token_urlsafe(32)
    record = {"run_dir": str(Path(run_dir).resolve())}
    write_text_atomic(Path(state_dir) / SUBMISSIONS / f"{token}.json", json.dumps(record), private=True)
    return token


def claim(state_dir: Path, token: str, *, runs_root: Path) -> Path:
    """The run directory of `token`, which is then used up; refuses unknown, used or out-of-place ones."""
    fix = "submit runs with 'fedmed run' on the coordinator; it is the only way a run gets a directory"
    if not TOKEN_PATTERN.match(token or ""):
        raise SubmissionError(f"refusing the run: it carries no valid submission token; {fix}")
    folder = Path(state_dir) / SUBMISSIONS
    pending, used = folder / f"{token}.json", folder / USED / f"{token}.json"
    used.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The rename is the claim: of two runs presenting one token, exactly one gets it.
        os.rename(pending, used)
    except FileNotFoundError:
        state = "was used already" if used.exists() else "is unknown to this coordinator"
        raise SubmissionError(f"refusing the run: its submission token {state}; {fix}") from None
    run_dir = Path(json.loads(used.read_text())["run_dir"]).resolve()
    root = Path(runs_root).resolve()
    if not run_dir.is_relative_to(root) or run_dir == root or not (run_dir / "config.toml").is_file():
        raise SubmissionError(f"refusing the run: {run_dir} is not a run directory under {root}; {fix}")
    return run_dir
