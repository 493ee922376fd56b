"""The audit log's anchor: how many records the log held and the hash of its newest line.

A hash chain finds an edited, removed or reordered record, but not the newest records cut off (nor
the whole log deleted): what remains is still a valid chain. The anchor is a small JSON file beside
the log, rewritten (and on disk) after every append, under the log's lock. The append and the
anchor's update cannot be atomic together, so a crash between them leaves the log exactly one
record *ahead* of its anchor, which is fine; a log *behind* its anchor, or one whose record at the
anchored position is not the anchored one, lost records.

An append never moves an anchor that the log contradicts: the finding stays until an admin has
looked (the log keeps growing from where it was cut, and ``check`` keeps reporting it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedmed.core.errors import FedmedError
from fedmed.core.files import atomic_path
from fedmed.privacy.ledger_anchor import ANCHOR_SUFFIX

ANCHOR_FORMAT = "fedmed-audit-anchor"
ANCHORED_FIELD = "anchored"  # set on every record written while the log has an anchor


class AuditAnchorError(FedmedError):
    """The audit log's anchor cannot be read."""


@dataclass(frozen=True)
class AuditAnchor:
    records: int
    head: str  # hash of the newest line (fedmed.site.audit._line_hash)


def audit_anchor_path(log_path: Path) -> Path:
    """`audit.jsonl` → `audit.anchor.json`, beside the ledger's `privacy-ledger.anchor.json`."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.stem + ANCHOR_SUFFIX)


def read_audit_anchor(path: Path) -> AuditAnchor | None:
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != ANCHOR_FORMAT:
            raise ValueError("not a fedmed audit anchor")
        return AuditAnchor(records=int(data["records"]), head=str(data["head"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise AuditAnchorError(
            f"audit anchor {path} is unreadable ({error}); restore it from the site's backup, and compare the audit "
            "log with that backup"
        ) from None


def write_audit_anchor(path: Path, anchor: AuditAnchor) -> None:
    """Replace the anchor atomically and durably: after a power loss it is never behind an fsynced append."""
    path = Path(path)
    with atomic_path(path) as temporary, temporary.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({"format": ANCHOR_FORMAT, "records": anchor.records, "head": anchor.head}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def contradiction(anchor: AuditAnchor, line_hashes: list[str]) -> str | None:
    """Why a log whose lines hash to `line_hashes` (an intact chain) is not the anchored one; None if it is."""
    held = len(line_hashes)
    if held < anchor.records:
        what = "the audit log is missing" if held == 0 else f"the newest {anchor.records - held} record(s) were removed"
        return (
            f"{what}: the log holds {held} record(s), its anchor remembers {anchor.records} ending in head "
            f"{anchor.head}"
        )
    if anchor.records and line_hashes[anchor.records - 1] != anchor.head:
        return (
            f"record {anchor.records} is not the one the anchor remembers (head {anchor.head}): records were "
            "removed or the log was replaced, and new ones written after them"
        )
    return None


def missing_anchor(lines: list[bytes], *, anchor_file: Path) -> str | None:
    """Why a log without an anchor is suspect: it was anchored once (its records say so)."""
    # A text test, like has_ledger_events: a damaged line must not stop the next append.
    marker = f'"{ANCHORED_FIELD}":true'.encode()
    anchored = [number for number, line in enumerate(lines, start=1) if marker in line]
    if not anchored:
        return None  # written by a fedmed before anchors: the next record anchors it
    return (
        f"its anchor {anchor_file.name} is missing although the log was anchored from record {anchored[0]} on: the "
        "anchor was deleted, and the newest records may have been removed with it"
    )
