"""MkDocs hook: a warning above every benchmark table made before the run defaults last changed.

A benchmark page includes each table with a snippet line, `--8<-- "docs/benchmarks/tables/NAME.md"`, and that
file opens with the stamp experiments/benchmark_tables.py writes (the commit it was made at, the command, the
command that reruns it). For every such include this hook asks git whether fedmed/config/, where the defaults
live, changed in a commit after the stamp's; if so it puts a warning above the table that names those commits
and the rerun command. Where git cannot tell (no git, not a checkout, a shallow clone without the stamp's
commit) it adds nothing: the stamp itself still says when the table was made.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any

DEFAULTS = "fedmed/config/"
INCLUDE = re.compile(r'^(?P<indent>[ \t]*)--8<--\s+"(?P<path>docs/benchmarks/tables/[\w.-]+\.md)"[ \t]*$', re.MULTILINE)
STAMP = re.compile(r"<!-- benchmark-stamp\n(?P<body>.*?)\n-->", re.DOTALL)
SHOWN_COMMITS = 5


def read_stamp(text: str) -> dict[str, str]:
    """The stamp's fields ({} when the text has no stamp)."""
    match = STAMP.search(text)
    if match is None:
        return {}
    fields = (line.split(":", 1) for line in match.group("body").splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in fields}


@functools.cache
def changes_since(commit: str, repo: Path, path: str = DEFAULTS) -> tuple[str, ...] | None:
    """Commits after `commit` that touched `path`, newest first; None when git cannot tell."""
    try:
        known = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if known.returncode != 0:
            return None
        log = subprocess.run(
            ["git", "-C", str(repo), "log", "--format=%h", f"{commit}..HEAD", "--", path],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return tuple(log.stdout.split()) if log.returncode == 0 else None


def staleness_warning(stamp: dict[str, str], repo: Path, indent: str = "") -> str:
    """A warning admonition for a table whose defaults changed after its commit; "" otherwise or when unknown."""
    commit = stamp.get("commit", "")
    changed = changes_since(commit, repo) if commit else None
    if not changed:
        return ""
    shown = ", ".join(f"`{sha}`" for sha in changed[:SHOWN_COMMITS])
    more = f" and {len(changed) - SHOWN_COMMITS} more" if len(changed) > SHOWN_COMMITS else ""
    rerun = stamp.get("rerun", "")
    how = f"Rerun it: `{rerun}`." if rerun.startswith("python ") else f"To rerun it: {rerun}."
    lines = [
        '!!! warning "Made before the defaults last changed"',
        f"    `{DEFAULTS}` (the run defaults) changed in {len(changed)} commit(s) after `{commit}`, the commit this",
        f"    table was made at: {shown}{more}. Its numbers may not be what the current defaults give. {how}",
    ]
    return "".join(f"{indent}{line}\n" for line in lines) + "\n"


def with_warnings(markdown: str, repo: Path) -> str:
    """The page's markdown with a warning above each included table that is stale."""

    def warn(match: re.Match[str]) -> str:
        table = repo / match.group("path")
        stamp = read_stamp(table.read_text(encoding="utf-8")) if table.is_file() else {}
        return staleness_warning(stamp, repo, match.group("indent")) + match.group(0)

    return INCLUDE.sub(warn, markdown)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    return with_warnings(markdown, Path(config["config_file_path"]).resolve().parent)
