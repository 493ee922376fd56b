"""`fedmed status` of a coordinator whose run quarantined a site: the JSON and the text name the site, the round
and evidence of its quarantine and the commands that re-admit it (the server down, so its folders are all there
is to go by; the sites' contributions come from rounds.jsonl alone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmed.cli.main import app
from fedmed.config import RunConfig, load_server_config
from fedmed.deploy.local import free_port
from fedmed.deploy.workspace import provision
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import FLOWER_RUNS, STATUS_FILE
from fedmed.runs.status import process_identity

EVIDENCE = "flagged in rounds round 1: update norm 8.5× the others' median; round 2: update norm 9× the others' median"


def _contribution(*, flagged: bool, left_out: str | None = None) -> dict:
    return {
        "update_norm": 8.5 if flagged else 1.0,
        "norm_ratio": 8.5 if flagged else 1.0,
        "cosine": 0.1 if flagged else 0.9,
        "score": 2.1 if flagged else 0.25,
        "flagged": flagged,
        "train_loss": 0.4,
        "claimed_cases": 12,
        "weight": 0.0 if left_out else 12.0,
        "left_out": left_out,
    }


@pytest.fixture
def server_file(tmp_path: Path) -> Path:
    """A provisioned coordinator that is not running, with one running run that quarantined site c."""
    server_file = provision(
        tmp_path / "fed",
        federation="hospitals",
        addresses=["127.0.0.1"],
        port=free_port(),
        sites=["a", "b", "c"],
        site_keys=True,
        app_digest="ab" * 32,
    ).server_config
    run_dir = RunDirectory.create(load_server_config(server_file).runs, "robust")
    run_dir.write_config(RunConfig.model_validate({"name": "robust", "task": {"kind": "segmentation"}}))
    (run_dir.path / FLOWER_RUNS).write_text(json.dumps({"flower_run_id": 7, "resume": False}) + "\n")
    run_dir.write_json(STATUS_FILE, {"state": "running", **process_identity()})
    for number, left_out in ((1, "flagged"), (2, "quarantined")):
        run_dir.append_round(
            {
                "round": number,
                "sites_trained": ["a", "b", "c"],
                "robust_rule": "norm_bound",
                "contribution_view": "plaintext",
                "contributions": {
                    "a": _contribution(flagged=False),
                    "b": _contribution(flagged=False),
                    "c": _contribution(flagged=True, left_out=left_out),
                },
                "sites_quarantined": ["c"] if number == 2 else [],
                "quarantine_events": (
                    [{"site": "c", "round": 2, "event": "quarantined", "evidence": EVIDENCE}] if number == 2 else []
                ),
            }
        )
    return server_file


def test_status_json_and_text_show_the_quarantine_and_how_to_readmit(server_file: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["status", "--json", "--server", str(server_file)])
    assert shown.exit_code == 0, shown.output
    [run] = json.loads(shown.output)["runs"]
    run_dir = load_server_config(server_file).runs / run["run"]
    assert run["contributions"]["round"] == 2 and run["contributions"]["sites"]["c"]["left_out"] == "quarantined"
    readmit = (
        f"fedmed stop {run['run']} --server {server_file}, then "
        f"fedmed run --resume {run_dir} --server {server_file} --readmit c"
    )
    assert run["quarantined"] == [{"site": "c", "round": 2, "evidence": EVIDENCE, "readmit": readmit}]
    text = runner.invoke(app, ["status", "--server", str(server_file)])
    assert text.exit_code == 0, text.output
    assert "site contributions, round 2 (rule norm_bound):" in text.output
    assert f"QUARANTINED c since round 2, left out of aggregation until re-admitted: {EVIDENCE}" in text.output
    assert f"re-admit: {readmit}" in text.output
