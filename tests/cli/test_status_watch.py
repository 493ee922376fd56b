"""`fedmed status --watch`: the report again while a run is running, printed only when it changed when the
output is not a terminal, redrawn in place on one; it stops when no run is running, or cleanly on Ctrl-C."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedmed.cli import status_view
from fedmed.cli.main import app
from fedmed.core.errors import FedmedError

runner = CliRunner()


def _report(state: str, rounds_done: int) -> dict[str, Any]:
    return {
        "federation": "fed",
        "sites": [{"site": "a", "status": "online", "node_id": 7}],
        "runs": [{"run": "run-1", "state": state, "reason": None, "rounds_done": rounds_done, "rounds": 3}],
    }


def _fetcher(*reports: dict[str, Any] | BaseException) -> Callable[[], dict[str, Any]]:
    queue = list(reports)

    def fetch() -> dict[str, Any]:
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return fetch


def test_piped_watch_prints_each_change_once_and_stops_when_no_run_runs() -> None:
    printed: list[str] = []
    naps: list[float] = []
    fetch = _fetcher(
        _report("running", 1),
        _report("running", 1),  # unchanged: not printed again
        FedmedError("SuperLink not reachable"),  # the server restarting: shown, retried
        _report("running", 2),
        _report("completed", 3),
    )
    last = status_view.watch(fetch, interval=5, echo=printed.append, live=False, sleep=naps.append)
    assert last["runs"][0]["state"] == "completed"
    assert naps == [5, 5, 5, 5]
    reports = [text for text in printed if text.startswith("[")]
    assert [text.split("round ")[1][:3] for text in reports] == ["1/3", "2/3", "3/3"]
    assert any("status unavailable" in text and "SuperLink not reachable" in text for text in printed)
    assert printed[-1] == "no run is running; stopped watching"
    assert all("\x1b" not in text and "\r" not in text for text in printed)


def test_live_watch_redraws_in_place_and_leaves_the_last_report(capsys: pytest.CaptureFixture[str]) -> None:
    printed: list[str] = []
    fetch = _fetcher(_report("running", 2), _report("completed", 3))
    status_view.watch(fetch, interval=1, echo=printed.append, live=True, sleep=lambda seconds: None)
    assert "run-1" in capsys.readouterr().out
    assert printed == ["no run is running; stopped watching"]


def test_watch_command_stops_cleanly_on_ctrl_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmed import config
    from fedmed.workflows import deployed_run

    fetch = _fetcher(_report("running", 1), KeyboardInterrupt())
    monkeypatch.setattr(config, "load_server_config", lambda path: None)
    monkeypatch.setattr(deployed_run, "status", lambda server, server_file: fetch())
    result = runner.invoke(app, ["status", "--watch", "--interval", "0.5", "--server", str(tmp_path / "server.toml")])
    assert result.exit_code == 0, result.output
    assert "run-1" in result.output and "round 1/3" in result.output
    assert "stopped watching (Ctrl-C)" in result.output


def test_watch_and_json_do_not_mix(tmp_path: Path) -> None:
    result = runner.invoke(app, ["status", "--watch", "--json", "--server", str(tmp_path / "server.toml")])
    assert result.exit_code == 2 and "drop --json" in result.output
