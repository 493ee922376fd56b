"""The coordinator's side without a live federation: `fedmed status` with the server down, a run the
coordinator stopped, the proxy's request-body limit, owner-only state, and how status shows nodes
nobody enrolled (issue 24: 6, 8, 11, 7b)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

from fedmed.cli import status_view
from fedmed.config import RunConfig, load_server_config
from fedmed.deploy import proxy
from fedmed.deploy.local import free_port
from fedmed.deploy.server import make_owner_only
from fedmed.deploy.workspace import provision
from fedmed.runs import RunDirectory
from fedmed.runs.run_dir import STATUS_FILE, STOPPED_FILE
from fedmed.runs.status import describe_run, process_identity
from fedmed.workflows import deployed_run

DIGEST = "ab" * 32


@pytest.fixture
def server_file(tmp_path: Path) -> Path:
    """A provisioned coordinator that is not running (its ports are free ones nobody listens on)."""
    workspace = provision(
        tmp_path / "fed",
        federation="hospitals",
        addresses=["127.0.0.1", "localhost"],
        port=free_port(),
        sites=["a", "b"],
        site_keys=True,
        app_digest=DIGEST,
    )
    return workspace.server_config


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _run(root: Path, name: str) -> RunDirectory:
    run_dir = RunDirectory.create(root, name)
    run_dir.write_config(RunConfig.model_validate({"name": name, "task": {"kind": "segmentation"}}))
    run_dir.append_round({"round": 1, "sites_trained": ["a", "b"]})
    (run_dir.path / "flower-runs.jsonl").write_text(json.dumps({"flower_run_id": 7, "resume": False}) + "\n")
    return run_dir


# 11. Status with the server down -------------------------------------------------------------------------
def test_status_with_the_server_down_shows_the_runs_from_their_folders(server_file: Path) -> None:
    server = load_server_config(server_file)
    crashed = _run(server.runs, "crashed")
    crashed.write_json(STATUS_FILE, {"state": "running", **process_identity(), "pid": _dead_pid()})
    alive = _run(server.runs, "alive")
    alive.write_json(STATUS_FILE, {"state": "running", **process_identity()})  # this process: still running
    report = deployed_run.status(server, server_file=server_file)
    assert report["server"]["state"] == "down" and "fedmed server start" in report["server"]["reason"]
    runs = {run["run"]: run for run in report["runs"]}
    assert set(runs) == {crashed.path.name, alive.path.name}
    assert runs[crashed.path.name]["state"] == "interrupted"
    assert runs[crashed.path.name]["reason"] == "running per its folder, but its process is gone; the server is down"
    assert runs[crashed.path.name]["resume"].startswith("fedmed run --resume")
    assert runs[alive.path.name]["state"] == "running" and "server is down" in runs[alive.path.name]["reason"]
    assert {site["status"] for site in report["sites"]} == {"server down"}
    lines = "\n".join(status_view.report_lines(report))
    assert "server: DOWN" in lines and "its process is gone" in lines


def test_the_status_command_reports_instead_of_failing_when_the_server_is_down(server_file: Path) -> None:
    server = load_server_config(server_file)
    _run(server.runs, "r").write_json(STATUS_FILE, {"state": "running", **process_identity(), "pid": _dead_pid()})
    fedmed = str(Path(sys.executable).with_name("fedmed"))
    shown = subprocess.run([fedmed, "status", "--server", str(server_file)], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "server: DOWN" in shown.stdout and "its process is gone; the server is down" in shown.stdout


# 11. A run the coordinator stopped -----------------------------------------------------------------------
@pytest.mark.parametrize("left_by_the_server_app", ["failed", "interrupted"])
def test_a_stopped_run_says_the_coordinator_stopped_it(tmp_path: Path, left_by_the_server_app: str) -> None:
    run_dir = _run(tmp_path, "stopped")
    run_dir.write_json(STATUS_FILE, {"state": left_by_the_server_app, "reason": "Run 7 is not running"})
    run_dir.write_json(STOPPED_FILE, {"flower_run_id": 7, "time": "2026-01-02T03:04:05", "by": "fedmed stop"})
    entry = describe_run(run_dir, flower_status="finished:stopped", server_file=Path("server.toml"))
    assert entry["state"] == "interrupted"
    assert entry["reason"] == "stopped by the coordinator ('fedmed stop' at 2026-01-02T03:04:05)"
    assert "resume" in entry
    # Without the record it is a crash, as before.
    (run_dir.path / STOPPED_FILE).unlink()
    crashed = describe_run(run_dir, flower_status="finished:stopped", server_file=Path("server.toml"))
    assert "coordinator" not in str(crashed["reason"])


# 6. The proxy's request-body limit -----------------------------------------------------------------------
def test_the_proxy_limits_request_bodies_to_what_flower_sends(server_file: Path) -> None:
    server = load_server_config(server_file)
    text = proxy.render_config(server).read_text()
    limit = re.search(r"client_max_body_size (\d+)k;", text)
    assert limit is not None, "no finite body limit in nginx.conf"
    limit_bytes = int(limit.group(1)) * 1024
    # Flower pushes one object per request, arrays in chunks of at most this size: a chunk and its envelope fit.
    assert 2 * FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE <= limit_bytes <= 64 * 1024 * 1024
    assert "client_max_body_size 0" not in text


def test_server_toml_can_raise_the_body_limit(server_file: Path) -> None:
    text = server_file.read_text().replace("[superlink]\n", "[superlink]\nmax_request_mb = 100\n")
    server_file.write_text(text)
    server = load_server_config(server_file)
    assert "client_max_body_size 102400k;" in proxy.render_config(server).read_text()


# 8. Owner-only state -------------------------------------------------------------------------------------
def test_files_left_readable_by_an_older_version_become_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    (folder / "proxy").mkdir(parents=True)
    for path in (folder / "superlink.db", folder / "proxy" / "access.log"):
        path.write_text("x")
        path.chmod(0o644)
    folder.chmod(0o755)
    make_owner_only(folder)
    for path in (folder, folder / "proxy", folder / "superlink.db", folder / "proxy" / "access.log"):
        assert os.stat(path).st_mode & 0o077 == 0, path


# 7b. Nodes nobody enrolled -------------------------------------------------------------------------------
def test_status_view_flags_nodes_that_are_not_enrolled() -> None:
    report = {
        "federation": "fed",
        "server": {"state": "up"},
        "sites": [{"site": "a", "status": "online", "node_id": 7}],
        "unenrolled_nodes": [{"node_id": 99, "status": "online", "name": "evil"}],
        "runs": [],
    }
    lines = status_view.report_lines(report)
    flagged = [line for line in lines if "99" in line]
    assert flagged and "online" in flagged[0] and "evil" in flagged[0]
    assert any(line.startswith("NOT ENROLLED") for line in lines)
