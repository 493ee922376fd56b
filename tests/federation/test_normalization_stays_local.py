"""Site-level intensity statistics stay at the site: under `site_zscore` and `site_percentile` nothing a site
sends lets the server read its fitted mean and std or percentiles; under `nyul` the landmarks do travel.

Every reply is captured where the ServerApp receives it: the in-process grid's `pull_messages`, which all
exchanges (intensity fit, rounds, evaluation) go through. The grid is the real one, only observed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedmed.data.normalization import foreground_mask, intensity_histogram
from fedmed.flower.engines.inprocess import InProcessGrid
from fedmed.site.session import SiteSession, SiteSpec
from fedmed.workflows.simulate import SimulationResult, simulate

pytestmark = pytest.mark.integration

# Two scanners far apart, so each site's statistics are distinct numbers.
SITES = [{"name": "site-a"}, {"name": "site-b", "intensity_scale": 3.0, "intensity_offset": 50.0, "gamma": 0.6}]
# What a site's reply may hold, by record: nothing else crosses to the server in these runs.
REPLY_RECORDS = {
    "query.intensity_fit": {"intensity", "site"},
    "query.intensity_apply": {"intensity", "site"},
    "train": {"arrays", "metrics", "site"},
    "evaluate": {"metrics", "site"},
    # the model card at the end of the run: sums and counts of the global model's outputs and features
    "query.model_card_reference": {"model-card", "site"},
    "query.model_card_calibrate": {"model-card", "site"},
}
SUMMARY_FIELDS = {"num_images", "before-counts", "before-range", "after-counts", "after-range"}


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """Every reply the ServerApp receives from a site during the test."""
    replies: list[Message] = []
    pull = InProcessGrid.pull_messages

    def pull_and_keep(grid: InProcessGrid, message_ids: Any) -> list[Message]:
        arrived = list(pull(grid, message_ids))
        replies.extend(arrived)
        return arrived

    monkeypatch.setattr(InProcessGrid, "pull_messages", pull_and_keep)
    return replies


def _run(tiny_config, intensity: str, **normalization: Any) -> SimulationResult:
    config = tiny_config(
        task={"intensity": intensity},
        normalization=normalization,
        synth={"sites": SITES},
        train={"rounds": 1},
        evaluation={"cross_site": False},
    )
    return simulate(config)


def _raw_foreground(result: SimulationResult, site: str) -> np.ndarray:
    """The site's training foreground voxels (the "mean" rule), read from its own data, not its state."""
    spec = next(s for s in result.config.sites if s.name == site)
    session = SiteSession(
        SiteSpec(name=site, data_path=spec.path, state_dir=result.run_dir.site_dir(site)), result.config
    )
    images = [sample["image"] for sample in session.raw_data.train]
    return torch.cat([image[foreground_mask(image, rule="mean")] for image in images]).double().numpy()


def _fitted_state(result: SimulationResult, site: str) -> dict[str, Any]:
    return json.loads((result.run_dir.site_dir(site) / "normalization.json").read_text())["stats"]["values"]


def _numbers(value: Any) -> Iterator[float]:
    """Every number a record value holds, however it is dressed: scalars, lists, text, raw bytes."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, str):
        yield from (float(match) for match in re.findall(r"-?\d+\.?\d*(?:[eE][-+]?\d+)?", value))
    elif isinstance(value, bytes):
        for dtype in ("<f4", "<f8"):
            if len(value) % np.dtype(dtype).itemsize == 0:
                yield from np.frombuffer(value, dtype=dtype).astype(np.float64).tolist()


def _sent_numbers(replies: list[Message]) -> np.ndarray:
    values: list[float] = []
    for reply in replies:
        for record in reply.content.values():
            if isinstance(record, ArrayRecord):
                for array in record.values():
                    values.extend(array.numpy().astype(np.float64).ravel().tolist())
            else:
                for item in record.values():
                    values.extend(_numbers(item))
    numbers = np.asarray(values, dtype=np.float64)
    return numbers[np.isfinite(numbers)]


def _contains(numbers: np.ndarray, value: float) -> bool:
    # Relative 1e-6: a statistic sent as float32 still counts as sent.
    return bool(np.isclose(numbers, value, rtol=1e-6, atol=0.0).any())


def _summaries(replies: list[Message]) -> dict[str, dict[str, Any]]:
    return {
        str(reply.content["site"]["name"]): dict(reply.content["intensity"].items())
        for reply in replies
        if reply.metadata.message_type == "query.intensity_fit"
    }


def _check_only_expected_records(replies: list[Message]) -> None:
    assert replies and not any(reply.has_error() for reply in replies)
    for reply in replies:
        kind = reply.metadata.message_type
        assert kind in REPLY_RECORDS, f"unexpected reply type {kind}"
        assert set(reply.content.keys()) <= REPLY_RECORDS[kind], (kind, sorted(reply.content.keys()))
        for record in reply.content.values():
            assert isinstance(record, (ArrayRecord, ConfigRecord, MetricRecord)), type(record)


def _affine_from_ranges(summary: dict[str, Any]) -> tuple[float, float]:
    """The normalization x -> (x - shift) / scale the server would read off the two histogram ranges
    (percentiles move with an affine map, so matching ranges of the same voxels give it exactly)."""
    (before_low, before_high), (after_low, after_high) = summary["before-range"], summary["after-range"]
    scale = (before_high - before_low) / (after_high - after_low)
    return before_low - after_low * scale, scale


@pytest.mark.parametrize(
    ("intensity", "normalization"),
    # Percentiles outside the histograms' 0.5-99.5 range leave the normalized range unclipped: the hard case.
    [("site_zscore", {}), ("site_percentile", {"percentiles": [0.2, 99.8]})],
)
def test_site_level_statistics_never_reach_the_server(
    tiny_config, received: list[Message], intensity: str, normalization: dict[str, Any]
) -> None:
    result = _run(tiny_config, intensity, **normalization)
    _check_only_expected_records(received)
    summaries = _summaries(received)
    assert set(summaries) == {"site-a", "site-b"}
    assert all(set(summary) == SUMMARY_FIELDS for summary in summaries.values())
    # The after-histograms' range is one for every site: it carries nothing about any of them.
    assert len({tuple(summary["after-range"]) for summary in summaries.values()}) == 1
    for site in ("site-a", "site-b"):
        voxels = _raw_foreground(result, site)
        if intensity == "site_zscore":
            stats = {"mean": float(voxels.mean()), "std": float(voxels.std())}
        else:
            low, high = np.percentile(voxels, normalization["percentiles"])
            stats = {"low": float(low), "high": float(high)}
        assert _fitted_state(result, site) == pytest.approx(stats, rel=1e-5), "the site fitted what we computed"
        sent = _sent_numbers([reply for reply in received if reply.content["site"]["name"] == site])
        for name, value in stats.items():
            assert not _contains(sent, value), f"{site}'s {name} ({value}) reached the server"
        shift, scale = _affine_from_ranges(summaries[site])
        derived = {"mean": shift, "std": scale} if intensity == "site_zscore" else {"low": shift, "high": shift + scale}
        for name, value in stats.items():
            assert derived[name] != pytest.approx(value, rel=1e-3), (
                f"{site}'s {name} ({value}) can be read off the histogram ranges it sent ({derived[name]})"
            )


def test_the_capture_sees_nyul_landmarks_which_are_meant_to_travel(tiny_config, received: list[Message]) -> None:
    result = _run(tiny_config, "nyul")
    assert {"query.intensity_fit", "query.intensity_apply", "train", "evaluate"} <= {
        reply.metadata.message_type for reply in received
    }
    _check_only_expected_records(received)
    for site in ("site-a", "site-b"):
        landmarks = _fitted_state(result, site)["landmarks"]
        sent = _sent_numbers([reply for reply in received if reply.content["site"]["name"] == site])
        # The same scan that finds nothing above finds each of these site statistics.
        assert all(_contains(sent, value) for value in landmarks if value != 0.0), site


def test_a_fixed_histogram_range_counts_every_voxel_and_says_nothing_of_the_data() -> None:
    images = [torch.linspace(-9.0, 9.0, 64).reshape(1, 8, 8), torch.full((1, 8, 8), 0.5)]
    masks = [torch.ones(1, 8, 8, dtype=torch.bool)] * 2
    histogram = intensity_histogram(images, bins=8, rule="all", masks=masks, value_range=(-4.0, 4.0))
    assert (histogram["low"], histogram["high"]) == (-4.0, 4.0)
    assert sum(histogram["counts"]) == 128  # the tails beyond the range land in the end bins
    with pytest.raises(ValueError, match="must be increasing"):
        intensity_histogram(images, bins=8, rule="all", value_range=(1.0, 1.0))
