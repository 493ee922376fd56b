"""What `fedmed status` and the report say about a run: interrupted runs, refusals, stale metrics,
broken folders, and resume without duplicate rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed.config import RunConfig
from fedmed.runs import RunDirectory
from fedmed.runs.report import write_report
from fedmed.runs.run_dir import STATUS_FILE, RunFileError
from fedmed.runs.status import (
    describe_run,
    effective_state,
    latest_metrics,
    process_identity,
    round_history,
)

SERVER_TOML = Path("/srv/fedmed/server.toml")


def _run(tmp_path: Path, *, rounds: int = 3) -> RunDirectory:
    run_dir = RunDirectory.create(tmp_path, "status")
    run_dir.write_config(RunConfig.model_validate({"name": "status", "task": {"kind": "segmentation"}}))
    for number in range(1, rounds + 1):
        refused = {"c": "site c refused app 1234: not among its approved apps"} if number == 2 else {}
        run_dir.append_round(
            {
                "round": number,
                "sites_trained": ["a", "b"],
                "sites_dropped": ["c"] if number == 1 else [],
                "sites_refused": refused,
            }
        )
        sites = ["a", "b", "c"] if number == 1 else ["a", "b"]
        run_dir.append_metrics(
            [{"round": number, "site": site, "phase": "evaluate", "dice": 0.5 + number / 10} for site in sites]
        )
    return run_dir


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_running_status_is_believed_only_while_its_server_app_lives() -> None:
    alive = {"state": "running", **process_identity()}
    assert effective_state(alive, flower_status="running") == "running"
    dead = {**alive, "pid": _dead_pid()}
    assert effective_state(dead, flower_status="running") == "interrupted", "the coordinator crashed"
    for flower_status in ("finished:failed", "finished:stopped", "unknown"):
        assert effective_state(alive, flower_status=flower_status) == "interrupted"
    assert effective_state({"state": "completed"}, flower_status="finished:completed") == "completed"
    assert effective_state({}, flower_status="pending") == "submitted"
    assert effective_state({}, flower_status="finished:failed") == "interrupted", "its ServerApp never started"


def test_an_interrupted_run_names_the_command_that_resumes_it(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    run_dir.write_json(STATUS_FILE, {"state": "running", **process_identity(), "pid": _dead_pid()})
    entry = describe_run(run_dir, flower_status="running", server_file=SERVER_TOML)
    assert entry["state"] == "interrupted"
    assert entry["resume"] == f"fedmed run --resume {run_dir.path} --server {SERVER_TOML}"
    assert entry["rounds_done"] == 3 and entry["rounds"] == 5


def test_rounds_show_who_trained_dropped_and_refused_with_the_reason(tmp_path: Path) -> None:
    history = round_history(_run(tmp_path).read_rounds())
    assert history[0] == {
        "round": 1,
        "trained": ["a", "b"],
        "dropped": ["c"],
        "why_dropped": {},
        "refused": {},
        "upload_bytes": {},
        "download_bytes": {},
        "proxy_bytes": {},
    }
    assert history[1]["refused"] == {"c": "site c refused app 1234: not among its approved apps"}
    assert round_history([{"round": 1, "sites_trained": ["a"]}])[0]["refused"] == {}, "rows of older runs"


def test_metrics_of_a_site_that_missed_the_latest_evaluation_are_stale(tmp_path: Path) -> None:
    latest = latest_metrics(_run(tmp_path).read_metrics())
    assert latest["c"]["stale"] is True and latest["c"]["round"] == 1
    assert latest["a"]["stale"] is False and latest["a"]["round"] == 3


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda run: run.config_file.write_text("name = [broken"), "config.toml: not valid TOML"),
        (lambda run: run.rounds_jsonl.open("a").write('{"round": 4, "sites_tr\n'), "rounds.jsonl: line 4 is not JSON"),
        (lambda run: (run.path / STATUS_FILE).write_text("{"), "status.json: not valid JSON"),
    ],
    ids=["config", "rounds", "status"],
)
def test_a_broken_run_folder_is_reported_not_raised(tmp_path: Path, damage, reason: str) -> None:
    run_dir = _run(tmp_path)
    damage(run_dir)
    entry = describe_run(run_dir, flower_status="finished:completed", server_file=SERVER_TOML)
    assert entry["state"] == "broken" and reason in entry["reason"]


def test_corrupt_lines_name_the_file_and_line(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    run_dir.metrics_jsonl.open("a").write("not json\n")
    with pytest.raises(RunFileError, match=r"metrics.jsonl: line \d+ is not JSON.*delete that line"):
        run_dir.read_metrics()


def test_rows_after_the_checkpoint_are_dropped_before_a_resume(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    run_dir._write_csv(run_dir.read_metrics())
    run_dir.drop_rounds_after(1)
    assert [row["round"] for row in run_dir.read_rounds()] == [1]
    assert {row["round"] for row in run_dir.read_metrics()} == {1}
    assert run_dir.metrics_csv.read_text().count("\n") == 1 + 3
    run_dir.drop_rounds_after(0)
    assert run_dir.read_rounds() == [] and run_dir.read_metrics() == []


def test_the_report_lists_rounds_sites_missed(tmp_path: Path) -> None:
    run_dir = _run(tmp_path)
    run_dir.write_json(STATUS_FILE, {"state": "interrupted", "reason": "stopped with Ctrl-C"})
    page = write_report(run_dir).read_text(encoding="utf-8")
    section = page[page.index("<h2>Participation</h2>") :]
    assert "<b>interrupted</b> (stopped with Ctrl-C)" in section
    assert "c: site c refused app 1234: not among its approved apps" in section
    assert json.dumps(run_dir.read_rounds()[2]["sites_refused"]) == "{}"
    assert section.count("<tr>") == 1 + 2, "only the rounds a site missed"
