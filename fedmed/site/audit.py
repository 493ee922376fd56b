"""The site's audit log: every message that left the site, and every change to its privacy ledger.

One JSON object per line in the site's state folder, append-only and tamper-evident: each record
holds the SHA-256 of the line before it (a hash chain) and of its own content, so editing a record,
removing one or reordering them is found by ``verify``. A record is on disk (flush + fsync) before
the message it describes leaves the site. Removing the *last* records cannot be told from a chain
alone; ``verify`` prints the head hash so that an admin can note it elsewhere.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmed.core.errors import FedmedError

AUDIT_FILENAME = "audit.jsonl"
GENESIS = "0" * 64
_FILE_MODE = 0o600
_TAIL_BLOCK = 64 * 1024
# Sent messages have a message kind; these are the ledger's own events.
LEDGER_EVENTS = ("ledger-created", "ledger-adopted", "ledger-charged", "ledger-reset")


class AuditLogError(FedmedError):
    """The audit log cannot be written or read."""


def audit_path(site_state: Path) -> Path:
    """The audit log sits beside the site's ledger, in the site's own state folder."""
    return Path(site_state) / AUDIT_FILENAME


def _record_hash(record: dict[str, Any]) -> str:
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@dataclass(frozen=True)
class AuditCheck:
    """The outcome of ``AuditLog.verify``: intact, or the first line where the chain breaks and why."""

    ok: bool
    records: int
    head: str  # hash of the last intact line
    line: int | None = None  # 1-based
    reason: str | None = None


class AuditLog:
    """Append-only JSON-lines log with a hash chain (see module docstring)."""

    _thread_lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one record (on disk when this returns) and return it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, _FILE_MODE)
        except OSError as error:
            raise self._write_error(error) from None
        with AuditLog._thread_lock, os.fdopen(descriptor, "r+b") as handle:
            try:
                # One writer at a time across the site's processes, so the chain never forks.
                fcntl.flock(handle, fcntl.LOCK_EX)
                if os.fstat(handle.fileno()).st_mode & 0o777 != _FILE_MODE:
                    os.fchmod(handle.fileno(), _FILE_MODE)
                last = _last_line(handle)
                previous = json.loads(last) if last else None
                record: dict[str, Any] = {
                    "seq": 0 if previous is None else int(previous.get("seq", -1)) + 1,
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "event": event,
                    **fields,
                    "prev": GENESIS if last is None else _line_hash(last),
                }
                record["hash"] = _record_hash(record)
                handle.seek(0, os.SEEK_END)
                handle.write((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
                handle.flush()
                os.fsync(handle.fileno())
            except (OSError, ValueError) as error:
                raise self._write_error(error) from None
        return record

    def records(self) -> list[dict[str, Any]]:
        """Every record, oldest first (unverified: see ``verify``)."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self._lines(), start=1):
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AuditLogError(
                    f"audit log {self.path}: line {number} is not JSON; run 'fedmed site audit SITE_CONFIG --verify' "
                    "to see where it was damaged"
                ) from None
        return records

    def has_ledger_events(self) -> bool:
        """Whether the site ever created a ledger (then a missing anchor is not a first start)."""
        if not self.path.exists():
            return False
        # A cheap text test first: the log grows with every message, ledger events are rare.
        return any(f'"event":"{event}"'.encode() in line for line in self._lines() for event in LEDGER_EVENTS)

    def verify(self) -> AuditCheck:
        """Walk the chain; report the first line whose content or link does not match."""
        head, count = GENESIS, 0
        if not self.path.exists():
            return AuditCheck(ok=True, records=0, head=head)
        for number, line in enumerate(self._lines(), start=1):
            reason = _check_line(line, previous_hash=head, expected_seq=count)
            if reason is not None:
                return AuditCheck(ok=False, records=count, head=head, line=number, reason=reason)
            head, count = _line_hash(line), count + 1
        return AuditCheck(ok=True, records=count, head=head)

    def _lines(self) -> list[bytes]:
        try:
            return [line for line in self.path.read_bytes().split(b"\n") if line]
        except OSError as error:
            raise AuditLogError(f"audit log {self.path} cannot be read ({error}); check its owner and mode") from None

    def _write_error(self, error: Exception) -> AuditLogError:
        return AuditLogError(
            f"audit log {self.path} cannot be written ({error}); nothing leaves the site unrecorded: free disk "
            "space or fix the state folder's owner and permissions"
        )


def _check_line(line: bytes, *, previous_hash: str, expected_seq: int) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return "the line is not JSON: it was edited or truncated"
    if not isinstance(record, dict):
        return "the line is not a record: it was edited"
    if record.get("hash") != _record_hash(record):
        return "the record's content does not match its hash: it was edited"
    if record.get("prev") != previous_hash:
        return "the record does not follow the one before it: a record before it was edited, removed or moved"
    if record.get("seq") != expected_seq:
        return f"sequence number {record.get('seq')} where {expected_seq} was expected: records were removed"
    return None


def _last_line(handle: Any) -> bytes | None:
    """The file's last non-empty line, read backwards in blocks (the log can be long)."""
    end = handle.seek(0, os.SEEK_END)
    position, tail = end, b""
    while position > 0:
        step = min(_TAIL_BLOCK, position)
        position -= step
        handle.seek(position)
        tail = handle.read(step) + tail
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped or position == 0:
            return stripped.rsplit(b"\n", 1)[-1] or None
    return None
