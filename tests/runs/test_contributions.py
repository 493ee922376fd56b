"""Each site's contribution and any quarantine, as `fedmed status` (JSON and text) and the report show them, from
rounds.jsonl rows in the shape fedmed.flower.server.robust writes; rows of older runs render as before."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from matplotlib import image as mpimg

from fedmed.cli.status_view import run_lines
from fedmed.config import RunConfig
from fedmed.runs import RunDirectory
from fedmed.runs.report import write_report
from fedmed.runs.run_dir import STATUS_FILE
from fedmed.runs.status import describe_run, process_identity, run_contribution_lines

SERVER_TOML = Path("/srv/fedmed/server.toml")
HONEST = ("site-a", "site-b", "site-c")
BAD = "site-d"
EVIDENCE = "flagged in rounds round 2: update norm 9.1× the others' median; round 3: cosine -0.80"


def _honest(server_round: int, index: int) -> dict[str, Any]:
    return {
        "update_norm": 1.0 + 0.1 * index,
        "norm_ratio": 1.0 + 0.05 * index,
        "cosine": 0.9 - 0.02 * server_round,
        "score": 0.1 + 0.05 * index + 0.01 * server_round,
        "flagged": False,
        "train_loss": 0.5 / server_round + 0.01 * index,
        "claimed_cases": 10,
        "weight": 10.0,
        "left_out": None,
    }


def _plaintext_row(server_round: int) -> dict[str, Any]:
    """Round 1 clean, rounds 2-3 the bad site flagged (quarantined after round 3), round 4 it is not asked."""
    contributions = {site: _honest(server_round, index) for index, site in enumerate(HONEST)}
    if server_round < 4:
        flagged = server_round >= 2
        contributions[BAD] = {
            "update_norm": 9.0 if flagged else 1.1,
            "norm_ratio": 9.1 if flagged else 1.05,
            "cosine": -0.8 if flagged else 0.85,
            "score": 3.4 if flagged else 0.2,
            "flagged": flagged,
            "train_loss": 2.3,
            "claimed_cases": 10,
            "weight": 0.0 if flagged else 10.0,
            "left_out": ("quarantined" if server_round == 3 else "flagged") if flagged else None,
        }
    quarantined = [BAD] if server_round >= 3 else []
    events = [{"site": BAD, "round": 3, "event": "quarantined", "evidence": EVIDENCE}] if server_round == 3 else []
    return {
        "round": server_round,
        "sites_trained": sorted(contributions),
        "sites_dropped": [],
        "sites_refused": {},
        "robust_rule": "norm_bound",
        "contribution_view": "plaintext",
        "contributions": contributions,
        "sites_quarantined": quarantined,
        "quarantine_events": events,
    }


def _secure_row(server_round: int, *, norm: float = 0.4) -> dict[str, Any]:
    return {
        "round": server_round,
        "sites_trained": list(HONEST),
        "contribution_view": "secure-aggregation",
        "contributions": {site: {"train_loss": 0.6 / server_round + 0.02 * i} for i, site in enumerate(HONEST)},
        "aggregate_update_norm": norm,
        "update_norm_bound": 1.0,
    }


def _run(tmp_path: Path, rows: list[dict[str, Any]], *, name: str = "robust") -> RunDirectory:
    run_dir = RunDirectory.create(tmp_path, name)
    run_dir.write_config(RunConfig.model_validate({"name": name, "task": {"kind": "segmentation"}}))
    for row in rows:
        run_dir.append_round(row)
    return run_dir


@pytest.fixture
def quarantined_run(tmp_path: Path) -> RunDirectory:
    run_dir = _run(tmp_path, [_plaintext_row(number) for number in range(1, 5)])
    run_dir.write_json(STATUS_FILE, {"state": "running", **process_identity()})
    return run_dir


# `fedmed status` -------------------------------------------------------------------------------------
def test_status_json_names_the_quarantined_site_its_evidence_and_the_readmit_command(
    quarantined_run: RunDirectory,
) -> None:
    entry = json.loads(json.dumps(describe_run(quarantined_run, flower_status="running", server_file=SERVER_TOML)))
    assert entry["state"] == "running"
    latest = entry["contributions"]
    assert latest["round"] == 4 and latest["rule"] == "norm_bound" and latest["view"] == "plaintext"
    assert sorted(latest["sites"]) == list(HONEST), "a quarantined site is not asked to train"
    assert latest["sites"]["site-b"]["score"] == pytest.approx(0.19)
    [quarantined] = entry["quarantined"]
    assert quarantined["site"] == BAD and quarantined["round"] == 3 and quarantined["evidence"] == EVIDENCE
    assert quarantined["readmit"] == (
        f"fedmed stop {quarantined_run.path.name} --server {SERVER_TOML}, then "
        f"fedmed run --resume {quarantined_run.path} --server {SERVER_TOML} --readmit {BAD}"
    )


def test_an_interrupted_run_is_resumed_with_the_site_readmitted_no_stop_needed(quarantined_run: RunDirectory) -> None:
    quarantined_run.write_json(STATUS_FILE, {"state": "interrupted", "reason": "killed"})
    entry = describe_run(quarantined_run, flower_status="finished:failed", server_file=SERVER_TOML)
    assert entry["quarantined"][0]["readmit"] == (
        f"fedmed run --resume {quarantined_run.path} --server {SERVER_TOML} --readmit {BAD}"
    )
    simulated = describe_run(quarantined_run)
    assert simulated["quarantined"][0]["readmit"] == f"fedmed simulate --resume {quarantined_run.path} --readmit {BAD}"


def test_status_text_shows_the_latest_round_as_a_table_and_the_quarantine(quarantined_run: RunDirectory) -> None:
    entry = describe_run(quarantined_run, flower_status="running", server_file=SERVER_TOML)
    text = "\n".join(run_lines(entry))
    assert "site contributions, round 4 (rule norm_bound):" in text
    header = next(line for line in text.splitlines() if "norm x" in line)
    assert all(column in header for column in ("flagged", "score", "cosine", "train loss", "weight", "left out"))
    site_b = next(line for line in text.splitlines() if line.strip().startswith("site-b"))
    assert site_b.split() == ["site-b", "-", "0.19", "1.05", "+0.82", "0.135", "10", "-"]
    assert f"QUARANTINED {BAD} since round 3, left out of aggregation until re-admitted: {EVIDENCE}" in text
    assert f"re-admit: fedmed stop {quarantined_run.path.name} --server {SERVER_TOML}, then fedmed run" in text


def test_status_text_marks_a_flagged_site_and_its_left_out_reason(tmp_path: Path) -> None:
    entry = describe_run(_run(tmp_path, [_plaintext_row(1), _plaintext_row(2)]), server_file=SERVER_TOML)
    text = "\n".join(run_lines(entry))
    site_d = next(line for line in text.splitlines() if line.strip().startswith(BAD))
    assert site_d.split() == [BAD, "FLAGGED", "3.40", "9.10", "-0.80", "2.300", "0", "flagged"]
    assert "QUARANTINED" not in text


def test_status_under_secure_aggregation_says_what_the_coordinator_cannot_see(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [_secure_row(1), _secure_row(2, norm=1.7) | {"aggregate_rejected": "over the bound"}])
    entry = describe_run(run_dir, server_file=SERVER_TOML)
    assert entry["contributions"]["view"] == "secure-aggregation"
    text = "\n".join(run_lines(entry))
    assert "per-site updates are hidden by secure aggregation" in text and "only the sum's norm is checked" in text
    assert "aggregate update norm 1.7, bound 1: OVER the bound, aggregate rejected" in text
    assert "norm x" not in text and "score" not in text, "nothing the coordinator cannot know"
    assert re.search(r"site-a\s+0\.300", text)


def test_rows_of_older_runs_show_no_contributions(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [{"round": 1, "sites_trained": ["a", "b"], "sites_dropped": [], "sites_refused": {}}])
    entry = describe_run(run_dir, server_file=SERVER_TOML)
    assert "contributions" not in entry and "quarantined" not in entry
    assert not any("contribution" in line or "QUARANTINED" in line for line in run_lines(entry))


def test_many_sites_list_only_those_something_happened_to(tmp_path: Path) -> None:
    row = _plaintext_row(2)
    row["contributions"] |= {f"site-{i:02d}": _honest(2, 0) for i in range(20)}
    text = run_lines(describe_run(_run(tmp_path, [row]), server_file=SERVER_TOML))
    assert [line.split()[0] for line in text if line.strip().startswith("site-")] == [BAD]
    assert any("and 23 more sites, none flagged or left out" in line for line in text)


# The report ------------------------------------------------------------------------------------------
def _section(page: str) -> str:
    start = page.index("<h2>Site contributions</h2>")
    return page[start : page.index("<h2>", start + 1)]


def test_report_plots_the_scores_and_lists_the_quarantine_event(quarantined_run: RunDirectory) -> None:
    section = _section(write_report(quarantined_run).read_text(encoding="utf-8"))
    assert '<img src="plots/contribution_scores.png"' in section
    figure = quarantined_run.path / "plots" / "contribution_scores.png"
    assert figure.stat().st_size > 5_000 and mpimg.imread(figure).std() > 0.05
    assert "Aggregation rule: <b>norm_bound</b>" in section
    assert f'<td>3</td><td class="text">{BAD}</td><td class="text">quarantined</td>' in section
    assert "update norm 9.1× the others&#x27; median" in section, "the evidence, escaped"
    assert f"{BAD}: rounds 2 (left out: flagged), 3 (left out: quarantined)" in section
    assert "No site was flagged" not in section


def test_report_of_a_clean_run_says_no_site_was_flagged(tmp_path: Path) -> None:
    section = _section(write_report(_run(tmp_path, [_plaintext_row(1)])).read_text(encoding="utf-8"))
    assert "No site was flagged." in section and "Quarantine events" not in section


def test_report_under_secure_aggregation_explains_and_plots_losses_and_the_bound(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [_secure_row(n) for n in range(1, 4)])
    section = _section(write_report(run_dir).read_text(encoding="utf-8"))
    assert "the coordinator receives only the masked sum" in section
    assert "does not protect against a site that runs modified code" in section
    assert re.findall(r'src="plots/(\w+)\.png"', section) == ["contribution_losses", "aggregate_norm"]
    assert "contribution_scores" not in section and "No site was flagged" not in section
    for name in ("contribution_losses", "aggregate_norm"):
        assert mpimg.imread(run_dir.path / "plots" / f"{name}.png").std() > 0.05


def test_report_of_an_older_run_has_no_contributions_table(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [{"round": 1, "sites_trained": ["a"], "sites_dropped": [], "sites_refused": {}}])
    section = _section(write_report(run_dir).read_text(encoding="utf-8"))
    assert "Not recorded for this run" in section and "<table>" not in section and "<img" not in section


def test_scores_beyond_any_scale_still_plot(tmp_path: Path) -> None:
    rows = [_plaintext_row(n) for n in range(1, 4)]
    rows[1]["contributions"][BAD] |= {"score": 250.0, "norm_ratio": None}
    rows[2]["contributions"][BAD] |= {"score": None}
    section = _section(write_report(_run(tmp_path, rows)).read_text(encoding="utf-8"))
    assert '<img src="plots/contribution_scores.png"' in section


def test_browser_loads_the_contribution_figures(quarantined_run: RunDirectory, browser_dom, tmp_path: Path) -> None:
    secure = _run(tmp_path / "secure", [_secure_row(n) for n in range(1, 3)], name="secure")
    for run_dir in (quarantined_run, secure):
        page = write_report(run_dir).read_text(encoding="utf-8")
        total = len(re.findall(r"<img ", page))
        dom, console = browser_dom(run_dir.report_html, tmp_path / run_dir.path.name)
        assert console == [], f"console messages: {console}"
        assert f'data-figures="{total}/{total}"' in dom and total >= 1


# The end of a simulation and `fedmed report` -----------------------------------------------------------
def test_a_clean_run_summarizes_its_contributions_in_one_line(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, [_plaintext_row(1)])
    assert run_contribution_lines(run_dir) == [
        "site contributions: no site was flagged in 1 round(s) (rule norm_bound)"
    ]
    assert run_contribution_lines(_run(tmp_path, [{"round": 1, "sites_trained": ["a"]}], name="old")) == []


def test_fedmed_report_prints_the_quarantine_of_a_simulated_run(quarantined_run: RunDirectory) -> None:
    from typer.testing import CliRunner

    from fedmed.cli.main import app

    quarantined_run.write_json("summary.json", {"primary_metric": "dice", "higher_is_better": True, "sites": {}})
    result = CliRunner().invoke(app, ["report", str(quarantined_run.path)])
    assert result.exit_code == 0, result.output
    assert f"QUARANTINED {BAD} since round 3" in result.output
    assert f"re-admit: fedmed simulate --resume {quarantined_run.path} --readmit {BAD}" in result.output
    assert "site contributions, round 4 (rule norm_bound):" in result.output
