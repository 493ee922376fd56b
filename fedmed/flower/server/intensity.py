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

from fedmed.core.errors import FedmedError
from fedmed.data.normalization import STREAMED_MODES, average_landmarks
from fedmed.flower.records import decode_summary
from fedmed.flower.wire import CONFIG, INTENSITY_APPLY, INTENSITY_FIT, STANDARD_LANDMARKS, SUMMARY, MessageType
from fedmed.runs.run_dir import NORMALIZATION_FILE

from .context import RunContext
from .exchange import ask_every_site


class HarmonizationError(FedmedError):
    """No site shared the landmarks that Nyúl harmonization needs."""


def fit_intensities(run: RunContext) -> list[float] | None:
    """Run the exchange; returns the federation's Nyúl landmarks (None for other normalizations)."""
    config = run.config
    if config.task.scan_geometry and config.task.intensity not in STREAMED_MODES:
        # Per-image normalization inside each site's pipeline; histograms would mean reading every case once more.
        return None
    summaries = _ask(run, message_type=INTENSITY_FIT, extra={})
    standard = None
    if config.task.intensity == "nyul":
        shared = [
            (summary["landmarks"], int(summary["num_images"]))
            for summary in summaries.values()
            if "landmarks" in summary
        ]
        if not shared:
            raise HarmonizationError(
                "no site shared its intensity landmarks, so Nyúl harmonization has no common scale; fix the sites' "
                "errors above or choose another task.intensity"
            )
        try:
            # Scan geometry shares one landmark list per channel, concatenated: each is averaged on its own.
            standard = average_landmarks(shared, block=len(config.normalization.landmarks))
        except ValueError as error:
            raise HarmonizationError(f"the sites' landmarks cannot be averaged: {error}") from error
        after = _ask(run, message_type=INTENSITY_APPLY, extra={STANDARD_LANDMARKS: standard})
        for site, summary in after.items():
            summaries.setdefault(site, {}).update(summary)
    run.run_dir.write_json(
        NORMALIZATION_FILE,
        {
            "method": config.task.intensity,
            "foreground": config.normalization.foreground,
            "standard_landmarks": standard,
            "sites": {site: summaries[site] for site in sorted(summaries)},
        },
    )
    return standard


def _ask(run: RunContext, *, message_type: MessageType, extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    content = RecordDict({CONFIG: ConfigRecord(extra)})
    replies = ask_every_site(run, content, message_type=message_type, purpose="intensity normalization")
    return {site: decode_summary(content[SUMMARY]) for site, content in replies.items()}
