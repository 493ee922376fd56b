"""The site's audit log: append-only JSON lines in a hash chain; an edited or removed record is found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmed.site.audit import AuditLog
from fedmed.site.audit_view import format_audit, format_check


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    log = AuditLog(tmp_path / "state" / "audit.jsonl")
    for server_round in (1, 2, 3):
        log.append(
            "message-sent",
            kind="model-update",
            run_id="run-1",
            round=server_round,
            bytes=1000 + server_round,
            sha256="ab" * 32,
            metrics={"metrics": {"train_loss": 0.5 / server_round, "num-examples": 4}},
        )
    return log


def test_records_chain_and_verify(log: AuditLog) -> None:
    assert log.path.stat().st_mode & 0o777 == 0o600
    records = log.records()
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[0]["prev"] == "0" * 64
    assert all(r["time"].endswith("+00:00") for r in records)
    check = log.verify()
    assert check.ok and check.records == 3
    table = format_audit(log)
    assert "model-update" in table and "train_loss=0.25" in table
    assert [json.loads(line)["round"] for line in format_audit(log, as_json=True).splitlines()] == [1, 2, 3]
    assert "intact, 3 record(s)" in format_check(log, check)


def test_an_edited_value_is_found_at_its_line(log: AuditLog) -> None:
    lines = log.path.read_bytes().split(b"\n")
    assert b'"bytes":1002' in lines[1]
    lines[1] = lines[1].replace(b'"bytes":1002', b'"bytes":1003')  # one byte of one value
    log.path.write_bytes(b"\n".join(lines))
    check = log.verify()
    assert not check.ok and check.line == 2 and check.records == 1
    assert "edited" in check.reason
    assert "BROKEN at line 2" in format_check(log, check)


def test_an_edit_with_a_recomputed_hash_is_found_by_the_next_record(log: AuditLog) -> None:
    from fedmed.site.audit import _record_hash

    lines = log.path.read_bytes().split(b"\n")
    record = json.loads(lines[0])
    record["bytes"] = 1
    record["hash"] = _record_hash(record)
    lines[0] = json.dumps(record, separators=(",", ":")).encode()
    log.path.write_bytes(b"\n".join(lines))
    check = log.verify()
    assert not check.ok and check.line == 2 and "edited, removed or moved" in check.reason


def test_a_deleted_line_is_found(log: AuditLog) -> None:
    lines = log.path.read_bytes().split(b"\n")
    del lines[1]
    log.path.write_bytes(b"\n".join(lines))
    check = log.verify()
    assert not check.ok and check.line == 2 and check.records == 1


def test_appending_after_a_check_keeps_the_chain(log: AuditLog) -> None:
    log.append("ledger-created", ledger_id="x", charges=0, digest="0" * 64)
    assert log.verify().ok and log.has_ledger_events()


def test_the_cli_lists_and_verifies(tmp_path: Path, log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmed.cli import site as site_cli

    class _Site:
        state_dir = log.path.parent

    monkeypatch.setattr("fedmed.config.load_site_config", lambda path: _Site())
    runner = CliRunner()
    listed = runner.invoke(site_cli.site_app, ["audit", str(tmp_path / "site.toml")])
    assert listed.exit_code == 0 and "3 record(s)" in listed.output
    assert runner.invoke(site_cli.site_app, ["audit", "x.toml", "--verify"]).exit_code == 0
    log.path.write_bytes(log.path.read_bytes().replace(b'"round":2', b'"round":9'))
    broken = runner.invoke(site_cli.site_app, ["audit", "x.toml", "--verify"])
    assert broken.exit_code == 1 and "BROKEN at line 2" in broken.output
    _keep_lines(log, 1)  # what the issue found: a cut tail read "intact"
    cut = runner.invoke(site_cli.site_app, ["audit", "x.toml", "--verify"])
    assert cut.exit_code == 1 and "BROKEN: the newest 2 record(s) were removed" in cut.output


# The tail and the whole log, against the anchor (fedmed.site.audit_anchor).


def _keep_lines(log: AuditLog, count: int) -> None:
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:count]))


def test_a_cut_tail_is_found_against_the_anchor(log: AuditLog) -> None:
    _keep_lines(log, 1)  # the newest two records removed: what is left is still a valid chain
    check = log.verify()
    assert not check.ok and check.records == 1 and check.line is None
    assert "the newest 2 record(s) were removed" in check.reason
    assert "BROKEN: the newest 2 record(s) were removed" in format_check(log, check)


def test_a_deleted_log_is_found_against_the_anchor(log: AuditLog) -> None:
    log.path.unlink()
    check = log.verify()
    assert not check.ok and "the audit log is missing" in check.reason


def test_appending_after_a_cut_keeps_the_finding(log: AuditLog) -> None:
    _keep_lines(log, 1)
    for _ in range(3):  # the log grows back past the anchored count from where it was cut
        log.append("message-sent", kind="metrics", run_id="run-2", round=1)
    check = log.verify()
    assert not check.ok and "record 3 is not the one the anchor remembers" in check.reason


def test_a_log_one_record_ahead_of_its_anchor_is_a_crash_not_tampering(log: AuditLog) -> None:
    anchor = log.anchor_path.read_bytes()
    log.append("message-sent", kind="metrics", run_id="run-1", round=4)
    log.anchor_path.write_bytes(anchor)  # the daemon died between the append and the anchor's update
    check = log.verify()
    assert check.ok and check.records == 4 and check.note is None
    log.append("message-sent", kind="metrics", run_id="run-1", round=5)  # the next append catches the anchor up
    assert log.verify().ok and json.loads(log.anchor_path.read_text())["records"] == 5


def test_a_deleted_anchor_of_an_anchored_log_is_found(log: AuditLog) -> None:
    log.anchor_path.unlink()
    _keep_lines(log, 2)
    log.append("message-sent", kind="metrics", run_id="run-2", round=1)  # does not re-anchor the cut log
    check = log.verify()
    assert not check.ok and "anchor audit.anchor.json is missing" in check.reason


def test_a_log_from_before_anchors_is_anchored_by_its_next_record(log: AuditLog) -> None:
    legacy = AuditLog(log.path.with_name("legacy.jsonl"))
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    for record in lines:  # rewrite the chain without the anchored mark, as an earlier fedmed wrote it
        record.pop("anchored")
    from fedmed.site.audit import GENESIS, _line_hash, _record_hash

    previous, out = GENESIS, []
    for record in lines:
        record["prev"] = previous
        record["hash"] = _record_hash(record)
        line = json.dumps(record, separators=(",", ":"))
        previous = _line_hash(line.encode())
        out.append(line)
    legacy.path.write_text("\n".join(out) + "\n")
    check = legacy.verify()
    assert check.ok and "not anchored yet" in check.note
    legacy.append("message-sent", kind="metrics", run_id="run-2", round=1)
    assert legacy.verify().ok and legacy.verify().note is None
    _keep_lines(legacy, 3)
    assert not legacy.verify().ok
