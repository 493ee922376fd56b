"""How a site opens its privacy ledger: only the one it remembers, never a silently recreated one.

The anchor (fedmed.privacy.ledger_anchor) and the audit log both remember the ledger. A site with
neither a ledger nor an anchor nor any ledger event in its audit log is starting for the first time
and gets a new ledger; in every other case a missing, replaced or rolled-back ledger is refused,
and only ``reset_ledger`` (an admin's recorded decision) starts a new one.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from fedmed.core.log import logger
from fedmed.privacy import PrivacyLedger
from fedmed.privacy.ledger_anchor import (
    LedgerAnchorError,
    LedgerIdentity,
    anchor_lock,
    anchor_path,
    check_identity,
    missing_ledger_error,
    read_anchor,
    write_anchor,
)
from fedmed.site.audit import AuditLog, audit_path

ARCHIVE_DIR = "ledger-archive"


def site_audit_log(ledger_path: Path) -> AuditLog:
    """The audit log of the site that owns this ledger (both live in the site's state folder)."""
    return AuditLog(audit_path(Path(ledger_path).parent))


def open_site_ledger(ledger_path: Path) -> PrivacyLedger:
    """The site's ledger, checked against its anchor; created only on the site's first start."""
    ledger_path = Path(ledger_path)
    anchor_file = anchor_path(ledger_path)
    audit = site_audit_log(ledger_path)
    with anchor_lock(anchor_file):
        anchor = read_anchor(anchor_file)
        if anchor is None:
            return _first_use(ledger_path, audit=audit)
        if not ledger_path.exists():
            raise missing_ledger_error(ledger_path, anchor)
        ledger = PrivacyLedger(ledger_path, create=False)
        try:
            digests = ledger.charge_digests()
            check_identity(ledger_path=ledger_path, anchor=anchor, ledger_id=ledger.ledger_id, digests=digests)
            if len(digests) - 1 > anchor.charges:
                # Charged, then stopped before the anchor moved: catch the anchor up.
                _advance(ledger, anchor_file=anchor_file, audit=audit)
        except BaseException:
            ledger.close()
            raise
    return ledger


def record_charge(ledger: PrivacyLedger, *, run_id: str, server_round: int, epsilon: float) -> None:
    """Advance the anchor (and note it in the audit log) after a charge, before the update leaves."""
    anchor_file = anchor_path(ledger.path)
    with anchor_lock(anchor_file):
        _advance(
            ledger,
            anchor_file=anchor_file,
            audit=site_audit_log(ledger.path),
            run_id=run_id,
            round=server_round,
            epsilon=epsilon,
        )


def reset_ledger(ledger_path: Path, *, reason: str) -> tuple[LedgerIdentity, Path | None]:
    """Archive the current ledger (if any) and start a new one, recorded in the audit log.

    Returns the new ledger's identity and where the old one was archived.
    """
    if not reason.strip():
        raise LedgerAnchorError("a ledger reset needs a reason; pass --reason TEXT (it goes to the audit log)")
    ledger_path = Path(ledger_path)
    anchor_file = anchor_path(ledger_path)
    audit = site_audit_log(ledger_path)
    with anchor_lock(anchor_file):
        old = _old_identity(anchor_file)
        archived = None
        if ledger_path.exists():
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            archived = ledger_path.parent / ARCHIVE_DIR / f"{ledger_path.stem}.{stamp}{ledger_path.suffix}"
            archived.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(ledger_path, archived)
        with PrivacyLedger(ledger_path) as ledger:
            identity = ledger.identity()
        write_anchor(anchor_file, identity, ledger_path=ledger_path)
        audit.append(
            "ledger-reset",
            ledger=str(ledger_path),
            ledger_id=identity.ledger_id,
            reason=reason,
            previous_ledger_id=None if old is None else old.ledger_id,
            previous_charges=None if old is None else old.charges,
            previous_digest=None if old is None else old.digest,
            archived_to=None if archived is None else str(archived),
        )
    logger.warning("privacy: ledger %s reset (%s); the old one is at %s", ledger_path, reason, archived)
    return identity, archived


def _first_use(ledger_path: Path, *, audit: AuditLog) -> PrivacyLedger:
    anchor_file = anchor_path(ledger_path)
    if not ledger_path.exists():
        if audit.has_ledger_events():
            raise LedgerAnchorError(
                f"privacy ledger {ledger_path} and its anchor {anchor_file} are both missing, but the audit log "
                f"{audit.path} shows this site had a ledger: restore both from the site's backup, or start a new "
                "ledger on purpose with 'fedmed site ledger-reset SITE_CONFIG --reason TEXT'"
            )
        ledger = PrivacyLedger(ledger_path)
        event = "ledger-created"
    else:
        # A ledger from before anchors existed: adopt it as it is.
        ledger = PrivacyLedger(ledger_path, create=False)
        ledger.assign_id()
        event = "ledger-adopted"
    try:
        identity = ledger.identity()
        write_anchor(anchor_file, identity, ledger_path=ledger_path)
        audit.append(event, ledger=str(ledger_path), **_fields(identity))
    except BaseException:
        ledger.close()
        raise
    logger.info("privacy: %s %s (id %s)", event.replace("-", " "), ledger_path, identity.ledger_id)
    return ledger


def _advance(ledger: PrivacyLedger, *, anchor_file: Path, audit: AuditLog, **details: object) -> None:
    identity = ledger.identity()
    current = read_anchor(anchor_file)
    if current is not None and current.ledger_id == identity.ledger_id and current.charges >= identity.charges:
        return  # another process of this site already moved it at least this far
    write_anchor(anchor_file, identity, ledger_path=ledger.path)
    audit.append("ledger-charged", ledger=str(ledger.path), **_fields(identity), **details)


def _old_identity(anchor_file: Path) -> LedgerIdentity | None:
    try:
        return read_anchor(anchor_file)
    except LedgerAnchorError:
        return None  # an unreadable anchor is what a reset repairs


def _fields(identity: LedgerIdentity) -> dict[str, object]:
    return {"ledger_id": identity.ledger_id, "charges": identity.charges, "digest": identity.digest}
