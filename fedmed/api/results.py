"""What a run left behind, read back: `RunResults` (from `simulate`, `resume`, `open_run`) and `Prediction`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmed.config import RunConfig, load_run_config
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import STATUS_FILE, SUMMARY_FILE
from fedmed.runs.summary import format_summary
from fedmed.workflows.predict import CaseOutcome
from fedmed.workflows.results import existing_run


@dataclass(frozen=True)
class RunResults:
    """What a run directory holds, read when the object is made (`simulate`, `resume`, `open_run`).

    Attributes:
        run_dir: The run directory.
        config: The resolved run config: generated sites listed, input channels filled in from the data.
        summary: The per-site comparison (summary.json): the federated model against the local-only and
            pooled baselines, privacy spent; empty while the run has none (it stopped before its end).
        metrics: One row per round, site and phase ("train" or "evaluate"), as metrics.jsonl holds them.
        rounds: One row per round: wall time, the sites that trained, dropped out or refused.
        status: The run's state (status.json: running, completed, failed or interrupted, and why).
        final_model: checkpoints/final.pt, or None while the run has not finished.
        report: report.html, or None while the run has none.
    """

    run_dir: Path
    config: RunConfig
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    status: dict[str, Any]
    final_model: Path | None
    report: Path | None

    @property
    def scores(self) -> dict[str, dict[str, Any]]:
        """Per site, each model's metrics on the site's validation cases.

        Keys of a site's entry: "federated" (the global model), "personalized" and "delivered" where the
        sites trained their own, "local_only" and "pooled" where the baselines ran; each maps a metric
        name (the task's primary metric, "num-examples", ...) to its value.
        """
        return self.summary.get("sites", {})

    @property
    def table(self) -> str:
        """The per-site summary table that `fedmed simulate` prints (empty while there is no summary)."""
        return format_summary(self.summary) if self.summary else ""


@dataclass(frozen=True)
class Prediction:
    """The outcome of `predict`.

    Attributes:
        out_dir: The output folder: one file per case, cases.csv, and predictions.csv for a classifier.
        model: Which model was applied, e.g. "global model of run demo-... after 40 round(s)".
        cases: One outcome per case, in input order; a failed case has `error` set and `ok` False.
    """

    out_dir: Path
    model: str
    cases: list[CaseOutcome]

    @property
    def failed(self) -> list[CaseOutcome]:
        """The cases that could not be predicted, each with the reason and the fix."""
        return [outcome for outcome in self.cases if not outcome.ok]


def open_run(run_dir: str | os.PathLike[str]) -> RunResults:
    """Read a run's results: simulated or deployed, finished or not.

    Args:
        run_dir: A run directory that `simulate`, `fedmed simulate` or `fedmed run` made.

    Returns:
        Its config, per-round per-site metrics, summary, status and where its final model and report are.

    Raises:
        FedmedError: The folder holds no run (no config.toml).
    """
    directory = existing_run(Path(run_dir))
    return read_results(directory, config=load_run_config(directory.config_file))


def read_results(directory: RunDirectory, *, config: RunConfig, summary: dict[str, Any] | None = None) -> RunResults:
    """The results in `directory`, with `config` (the resolved one a simulation ran with, or config.toml's) and
    `summary` (the one a simulation returned; default: summary.json's)."""
    final = directory.checkpoints / "final.pt"
    return RunResults(
        run_dir=directory.path,
        config=config,
        summary=(summary if summary is not None else directory.read_json(SUMMARY_FILE)) or {},
        metrics=directory.read_metrics(),
        rounds=directory.read_rounds(),
        status=directory.read_json(STATUS_FILE) or {},
        final_model=final if final.is_file() else None,
        report=directory.report_html if directory.report_html.is_file() else None,
    )
