"""The ledger's anchor: what the site remembers about its ledger, so the ledger cannot vanish quietly.

A ledger is a plain file: deleting it, swapping in another site's or an empty one, or restoring last
week's backup would each refund budget already spent. The anchor is a small JSON file beside the
ledger holding the ledger's random id and a running digest over its charges (a hash chain, so it
fixes their order and content, not just their number). The ledger may be *ahead* of its anchor (the
daemon died between a charge and the anchor's update), never behind it and never a different one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from fedmed.core.files import write_text_atomic
from fedmed.privacy.errors import PrivacyLedgerError

ANCHOR_SUFFIX = ".anchor.json"
ANCHOR_FORMAT = "fedmed-privacy-ledger-anchor"
_GENESIS = "0" * 64
_CHARGE_COLUMNS = "charge_id, dataset, run_id, round, attempt, noise_multiplier, sample_rate, steps"


class LedgerAnchorError(PrivacyLedgerError):
    """The ledger is missing, replaced or rolled back relative to what the site remembers."""


@dataclass(frozen=True)
class LedgerIdentity:
    """Which ledger this is and how far its charges have come."""

    ledger_id: str
    charges: int  # rows in the ledger's charge table
    digest: str  # hash chain over those rows, oldest first


def anchor_path(ledger_path: Path) -> Path:
    """The anchor lives beside the ledger: `privacy-ledger.sqlite` → `privacy-ledger.anchor.json`."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.stem + ANCHOR_SUFFIX)


def charge_digests(db: sqlite3.Connection) -> list[str]:
    """The running digest after each charge; element i covers the first i charges (element 0: none)."""
    digests = [_GENESIS]
    for row in db.execute(f"SELECT {_CHARGE_COLUMNS} FROM rounds ORDER BY rowid"):
        # json of the row: floats by repr, so a digest never depends on formatting.
        line = json.dumps(list(row), separators=(",", ":"))
        digests.append(hashlib.sha256(f"{digests[-1]}{line}".encode()).hexdigest())
    return digests


def read_anchor(path: Path) -> LedgerIdentity | None:
    """The remembered identity, None when the site has never anchored a ledger."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != ANCHOR_FORMAT:
            raise ValueError("not a fedmed ledger anchor")
        return LedgerIdentity(
            ledger_id=str(data["ledger_id"]), charges=int(data["charges"]), digest=str(data["digest"])
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise LedgerAnchorError(
            f"ledger anchor {path} is unreadable ({error}); restore it from the site's backup, or start a new "
            "ledger on purpose with 'fedmed site ledger-reset SITE_CONFIG --reason TEXT'"
        ) from None


def write_anchor(path: Path, identity: LedgerIdentity, *, ledger_path: Path) -> None:
    record = {"format": ANCHOR_FORMAT, **asdict(identity), "ledger": str(ledger_path)}
    write_text_atomic(Path(path), json.dumps(record, indent=2) + "\n")


@contextmanager
def anchor_lock(path: Path) -> Iterator[None]:
    """Serialize anchor updates across the site's processes (one ClientApp per run)."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def check_identity(*, ledger_path: Path, anchor: LedgerIdentity, ledger_id: str | None, digests: list[str]) -> None:
    """Refuse a ledger that is not the anchored one, or that has lost charges the anchor has seen."""
    fix = (
        f"restore {ledger_path} from the site's backup taken after its last charge; if the budget really must "
        "start over, do it on purpose with 'fedmed site ledger-reset SITE_CONFIG --reason TEXT'"
    )
    if ledger_id != anchor.ledger_id:
        raise LedgerAnchorError(
            f"privacy ledger {ledger_path} was replaced: its id is {ledger_id or '(none)'}, the site's anchor "
            f"{anchor_path(ledger_path)} remembers {anchor.ledger_id}; {fix}"
        )
    charges = len(digests) - 1
    if charges < anchor.charges:
        raise LedgerAnchorError(
            f"privacy ledger {ledger_path} was rolled back: it holds {charges} charge(s), the site's anchor "
            f"{anchor_path(ledger_path)} remembers {anchor.charges}; {fix}"
        )
    if digests[anchor.charges] != anchor.digest:
        raise LedgerAnchorError(
            f"privacy ledger {ledger_path} was altered: its first {anchor.charges} charge(s) differ from those "
            f"the site's anchor {anchor_path(ledger_path)} remembers; {fix}"
        )


def missing_ledger_error(ledger_path: Path, anchor: LedgerIdentity) -> LedgerAnchorError:
    return LedgerAnchorError(
        f"privacy ledger {ledger_path} is missing, but the site's anchor {anchor_path(ledger_path)} remembers ledger "
        f"{anchor.ledger_id} with {anchor.charges} charge(s): a new ledger would forget the budget already spent. "
        f"Restore {ledger_path.name} from the site's backup, or start a new ledger on purpose with "
        "'fedmed site ledger-reset SITE_CONFIG --reason TEXT'"
    )
