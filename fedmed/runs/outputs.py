"""The files every finished (or stopped) run ends with, whatever ran it: summary.json, report.html, plots/."""

from __future__ import annotations

from typing import Any

from .report import write_report
from .run_dir import SUMMARY_FILE, RunDirectory
from .summary import build_summary


def write_outputs(run_dir: RunDirectory, *, primary_metric: str, higher_is_better: bool) -> dict[str, Any]:
    """Summarize what the run directory holds and draw its report; works on a partial run too."""
    summary = build_summary(run_dir, primary_metric=primary_metric, higher_is_better=higher_is_better)
    run_dir.write_json(SUMMARY_FILE, summary)
    write_report(run_dir)
    return summary
