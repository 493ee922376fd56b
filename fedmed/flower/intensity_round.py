"""The run's first exchange: every site fits its intensity normalization and reports summaries.

Sites fit their statistics from their own training images and keep them. What comes back is small
and aggregate: the image count, a histogram of foreground intensities before and after normalization
(for the report) and, for Nyúl harmonization, the site's mean standardized landmarks. The server
averages the landmarks (weighted by image count) and sends the average back; it also travels with
every round's messages, so a site that joins late or restarts maps onto the same scale.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedmed.config import RunConfig
from fedmed.errors import FedmedError
from fedmed.runs import RunDirectory

from .exchange import ask_every_site
from .protocol import CONFIG

FIT_MESSAGE_TYPE = "query.intensity_fit"
APPLY_MESSAGE_TYPE = "query.intensity_apply"
SUMMARY = "intensity"  # ConfigRecord with a site's shared summaries
STANDARD_LANDMARKS = "intensity-landmarks"  # round config: the federation's Nyúl landmarks
RUN_FILE = "normalization.json"


class HarmonizationError(FedmedError):
    """No site shared the landmarks that Nyúl harmonization needs."""


def encode_summary(summary: dict[str, Any]) -> ConfigRecord:
    """Histograms as flat fields: ConfigRecord holds scalars and flat lists only."""
    record: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):  # a histogram
            record[f"{key}-counts"] = [int(count) for count in value["counts"]]
            record[f"{key}-range"] = [float(value["low"]), float(value["high"])]
        elif isinstance(value, list):
            record[key] = [float(item) for item in value]
        else:
            record[key] = value
    return ConfigRecord(record)


def decode_summary(record: ConfigRecord) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, value in record.items():
        if key.endswith("-counts"):
            name = key.removesuffix("-counts")
            low, high = record[f"{name}-range"]
            summary[name] = {"counts": list(value), "low": float(low), "high": float(high)}
        elif not key.endswith("-range"):
            summary[key] = list(value) if isinstance(value, list) else value
    return summary


def fit_intensities(grid: Grid, *, config: RunConfig, run_dir: RunDirectory,
                    site_names: dict[int, str]) -> list[float] | None:
    """Run the exchange; returns the federation's Nyúl landmarks (None for other normalizations)."""
    from fedmed.data.normalization import average_landmarks

    nyul = config.task.intensity == "nyul"
    summaries = _ask(grid, message_type=FIT_MESSAGE_TYPE, config=config, site_names=site_names, extra={})
    standard = None
    if nyul:
        shared = [(summary["landmarks"], int(summary["num_images"])) for summary in summaries.values()
                  if "landmarks" in summary]
        if not shared:
            raise HarmonizationError(
                "no site shared its intensity landmarks, so Nyúl harmonization has no common scale; fix the sites' "
                "errors above or choose another task.intensity"
            )
        try:
            standard = average_landmarks(shared)
        except ValueError as error:
            raise HarmonizationError(f"the sites' landmarks cannot be averaged: {error}") from error
        after = _ask(grid, message_type=APPLY_MESSAGE_TYPE, config=config, site_names=site_names,
                     extra={STANDARD_LANDMARKS: standard})
        for site, summary in after.items():
            summaries.setdefault(site, {}).update(summary)
    run_dir.write_json(RUN_FILE, {
        "method": config.task.intensity,
        "foreground": config.normalization.foreground,
        "standard_landmarks": standard,
        "sites": {site: summaries[site] for site in sorted(summaries)},
    })
    return standard


def _ask(grid: Grid, *, message_type: str, config: RunConfig, site_names: dict[int, str],
         extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    replies = ask_every_site(grid, RecordDict({CONFIG: ConfigRecord(extra)}), message_type=message_type,
                             timeout=config.strategy.round_timeout_s, site_names=site_names,
                             purpose="intensity normalization")
    return {site: decode_summary(content[SUMMARY]) for site, content in replies.items()}
