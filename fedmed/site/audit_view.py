"""`fedmed site audit`: the site's audit log as a table a person reads, or as JSON lines."""

from __future__ import annotations

import json
from typing import Any

from fedmed.site.audit import AuditCheck, AuditLog

_HEADER = f"{'#':>5}  {'time':<23}  {'run':<20}{'round':>6}  {'kind':<26}{'bytes':>10}  {'sha256':<12}  details"


def format_audit(log: AuditLog, *, as_json: bool = False) -> str:
    records = log.records()
    if as_json:
        return "\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    if not records:
        return f"audit log {log.path}: nothing has left this site yet"
    lines = [f"audit log {log.path}: {len(records)} record(s)", _HEADER]
    lines += [_row(record) for record in records]
    return "\n".join(lines)


def format_check(log: AuditLog, check: AuditCheck) -> str:
    if check.ok:
        anchored = f"; {check.note}" if check.note else f", as its anchor {log.anchor_path.name} remembers"
        return (
            f"audit log {log.path}: intact, {check.records} record(s){anchored}; head {check.head} (note it "
            "elsewhere too: an anchor deleted together with the newest records is found only against it)"
        )
    if check.line is None:
        return (
            f"audit log {log.path}: BROKEN: {check.reason}. The {check.records} record(s) it holds form an intact "
            "chain. Keep the log and its anchor as evidence and compare them with the site's backup"
        )
    return (
        f"audit log {log.path}: BROKEN at line {check.line}: {check.reason}. The {check.records} record(s) before it "
        "are intact. Keep the file as evidence and compare it with the site's backup"
    )


def _row(record: dict[str, Any]) -> str:
    event = str(record.get("event", ""))
    kind = str(record.get("kind", event)) if event == "message-sent" else event
    run = str(record.get("run_id") or "")[:19]
    round_ = "" if record.get("round") is None else str(record["round"])
    size = "" if record.get("bytes") is None else str(record["bytes"])
    digest = str(record.get("sha256") or record.get("digest") or "")[:12]
    return (
        f"{record.get('seq', ''):>5}  {str(record.get('time', ''))[:23]:<23}  {run:<20}{round_:>6}  {kind:<26}"
        f"{size:>10}  {digest:<12}  {_details(record)}"
    )


def _details(record: dict[str, Any]) -> str:
    if record.get("event") != "message-sent":
        keys = ("ledger_id", "charges", "epsilon", "reason", "archived_to")
        return ", ".join(f"{key}={_short(record[key])}" for key in keys if record.get(key) is not None)
    if record.get("kind") == "refusal":
        return str(record.get("reason", ""))[:120]
    metrics = record.get("metrics") or {}
    parts = [
        f"{key}={_short(value)}" if name == "metrics" else f"{name}.{key}={_short(value)}"
        for name, values in metrics.items()
        for key, value in values.items()
    ]
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
