"""The model card: written and read back as the predict workflow reads it, and shown in the run report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fedmed.runs import RunDirectory
from fedmed.runs.model_card import (
    ALL_SITES,
    MODEL_CARD_FILE,
    ModelCard,
    ModelCardError,
    read_model_card,
    write_model_card,
)
from fedmed.runs.report import write_report


def _bins(correct: list[float]) -> dict[str, list[float]]:
    count = [0.0] * 10 + [10.0] * 5
    confidence = [0.0] * 10 + [10 * (0.7 + 0.0667 * i) for i in range(5)]
    return {"count": count, "confidence": confidence, "correct": [0.0] * 10 + correct}


def _card() -> ModelCard:
    before = _bins([5.0, 5.0, 6.0, 6.0, 7.0])
    after = _bins([7.0, 8.0, 8.0, 9.0, 9.0])
    entry = {"cases": 50, "ece_before": 0.21, "ece_after": 0.028, "bins_before": before, "bins_after": after}
    return ModelCard(
        temperature=1.7,
        ood_mean=[0.1, 0.2, 0.3],
        ood_var=[1.0, 0.5, float("nan")],
        ood_threshold=3.2,
        calibration={"site-a": {**entry, "ece_after": math.nan}, ALL_SITES: entry},
        notes=["OOD threshold: 95th percentile of 50 validation case score(s) from 1 site(s)"],
    )


def test_a_card_reads_back_as_written_with_non_finite_numbers_as_null(tmp_path: Path) -> None:
    assert read_model_card(tmp_path) is None
    path = write_model_card(tmp_path, _card())
    assert path == tmp_path / MODEL_CARD_FILE
    assert json.loads(path.read_text())["ood_var"][2] is None, "strict JSON: NaN is written as null"
    card = read_model_card(tmp_path)
    assert card is not None and card.temperature == 1.7 and card.ood_threshold == 3.2
    assert card.ood_mean == [0.1, 0.2, 0.3] and card.calibration[ALL_SITES]["ece_after"] == 0.028
    (tmp_path / MODEL_CARD_FILE).write_text("{not json")
    with pytest.raises(ModelCardError, match=MODEL_CARD_FILE):
        read_model_card(tmp_path)


@pytest.fixture
def report(tmp_path: Path) -> RunDirectory:
    run_dir = RunDirectory.create(tmp_path, "card-test")
    write_model_card(run_dir.path, _card())
    write_report(run_dir)
    return run_dir


def test_the_report_shows_ece_per_site_the_reliability_diagram_and_the_threshold(report: RunDirectory) -> None:
    page = report.report_html.read_text(encoding="utf-8")
    section = page[page.index("<h2>Calibration") :]
    assert "T = 1.7" in section and "OOD threshold: <b>3.2</b>" in section
    rows = dict(re.findall(r"<tr><td>(?:<b>)?([^<]+)(?:</b>)?</td>(.*?)</tr>", section))
    assert re.findall(r"<td[^>]*>([^<]*)</td>", rows["site-a"]) == ["50", "0.2100", "n/a"]
    assert re.findall(r"<td[^>]*>([^<]*)</td>", rows[ALL_SITES]) == ["50", "0.2100", "0.0280"]
    assert 'src="plots/reliability.svg"' in section
    svg = (report.path / "plots" / "reliability.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and len(svg) > 5_000


def test_a_run_without_a_card_says_so(tmp_path: Path) -> None:
    run_dir = RunDirectory.create(tmp_path, "no-card")
    write_report(run_dir)
    assert "no model_card.json" in run_dir.report_html.read_text(encoding="utf-8")
    assert not (run_dir.path / "plots" / "reliability.svg").exists()


def test_the_browser_loads_the_reliability_diagram(report: RunDirectory, browser_dom, tmp_path: Path) -> None:
    dom, console = browser_dom(report.report_html, tmp_path)
    assert console == [], f"console messages: {console}"
    assert 'data-figures="1/1"' in dom, re.search(r"<body[^>]*>", dom).group(0)
