"""The site's audit log: every message that left the site, and every change to its privacy ledger.

One JSON object per line in the site's state folder, append-only and tamper-evident: each record
holds the SHA-256 of the line before it (a hash chain) and of its own content, so editing a record,
removing one or reordering them is found by ``verify``. A record is on disk (flush + fsync) before
the message it describes leaves the site. Removing the *last* records (or the whole log) cannot be
told from a chain alone: the log's anchor (fedmed.site.audit_anchor) remembers how many records it
held and its head, and ``verify`` compares the two; it also prints the head so an admin can note it
elsewhere (an anchor deleted together with the log's tail is found only against that).
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
from fedmed.core.log import logger
from fedmed.privacy.ledger import LEDGER_FILENAME
from fedmed.privacy.ledger_anchor import anchor_path as ledger_anchor_path

from .audit_anchor import (
    ANCHORED_FIELD,
    AuditAnchor,
    AuditAnchorError,
    audit_anchor_path,
    contradiction,
    missing_anchor,
    read_audit_anchor,
    write_audit_anchor,
)

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
    line: int | None = None  # 1-based; None when the chain is intact but the anchor contradicts it
    reason: str | None = None
    note: str | None = None  # worth saying about an intact log (not anchored yet, anchor older than the log)


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
                advance = self._may_advance_anchor(last, previous)
                record: dict[str, Any] = {
                    "seq": 0 if previous is None else int(previous.get("seq", -1)) + 1,
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "event": event,
                    **fields,
                    ANCHORED_FIELD: True,
                    "prev": GENESIS if last is None else _line_hash(last),
                }
                record["hash"] = _record_hash(record)
                line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
                handle.seek(0, os.SEEK_END)
                handle.write(line + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                # After the append: a crash in between leaves the log one record ahead, never behind.
                if advance:
                    write_audit_anchor(self.anchor_path, AuditAnchor(records=record["seq"] + 1, head=_line_hash(line)))
            except (OSError, ValueError) as error:
                raise self._write_error(error) from None
        return record

    @property
    def anchor_path(self) -> Path:
        return audit_anchor_path(self.path)

    def _may_advance_anchor(self, last: bytes | None, previous: dict[str, Any] | None) -> bool:
        """Whether the log, as it is before an append, agrees with its anchor (so the anchor may move on).

        A log the anchor contradicts is still appended to (nothing leaves the site unrecorded), but the
        anchor stays where it was, so that ``verify`` keeps reporting the loss until an admin has looked.
        """
        try:
            anchor = read_audit_anchor(self.anchor_path)
        except AuditAnchorError as error:
            logger.error("%s", error)
            return False
        held = 0 if previous is None else int(previous.get("seq", -1)) + 1
        if anchor is None:
            reason = missing_anchor(self._lines(), anchor_file=self.anchor_path) if held else None
        elif held == anchor.records and (last is None or _line_hash(last) == anchor.head):
            return True
        elif held == anchor.records + 1 and previous is not None and previous.get("prev") == anchor.head:
            return True  # the last append's anchor update was lost to a crash
        else:
            reason = contradiction(anchor, [_line_hash(line) for line in self._lines()])
        if reason is not None:
            logger.error(
                "audit log %s: %s; it is kept as found (its anchor is not moved): run 'fedmed site audit SITE_CONFIG "
                "--verify' and compare the log with the site's backup",
                self.path,
                reason,
            )
        return reason is None

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
        """Walk the chain, then hold it against the anchor: the first line whose content or link does not
        match, or the records the anchor remembers and the log no longer holds."""
        try:
            anchor = read_audit_anchor(self.anchor_path)  # before the log: an append in between only adds lines
        except AuditAnchorError as error:
            return AuditCheck(ok=False, records=0, head=GENESIS, reason=str(error))
        lines = self._lines() if self.path.exists() else []
        head, hashes = GENESIS, []
        for number, line in enumerate(lines, start=1):
            reason = _check_line(line, previous_hash=head, expected_seq=len(hashes))
            if reason is not None:
                return AuditCheck(ok=False, records=len(hashes), head=head, line=number, reason=reason)
            head = _line_hash(line)
            hashes.append(head)
        reason, note = self._against_anchor(anchor, hashes)
        return AuditCheck(ok=reason is None, records=len(hashes), head=head, reason=reason, note=note)

    def _against_anchor(self, anchor: AuditAnchor | None, hashes: list[str]) -> tuple[str | None, str | None]:
        """(why the intact chain is not the whole log, what else is worth saying)."""
        if anchor is not None:
            reason = contradiction(anchor, hashes)
            if reason is None and len(hashes) > anchor.records + 1:
                return None, (
                    f"its anchor remembers only {anchor.records} record(s): the anchor is older than the log "
                    "(restored from an older backup?); the next record moves it"
                )
            return reason, None
        if not hashes:
            ledger_anchor = ledger_anchor_path(self.path.parent / LEDGER_FILENAME)
            if ledger_anchor.exists():
                return (
                    f"the audit log and its anchor are missing, but this site has a privacy ledger "
                    f"({ledger_anchor.name}) whose creation the log recorded: the log was deleted"
                ), None
            return None, None
        reason = missing_anchor(self._lines(), anchor_file=self.anchor_path)
        return reason, None if reason else "not anchored yet (written by an earlier fedmed); the next record anchors it"

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
