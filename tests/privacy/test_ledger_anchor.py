"""A site's ledger cannot vanish quietly: deleted, replaced or rolled-back ledgers are refused, and
only an explicit, audited reset starts a new one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedmed.privacy import LEDGER_FILENAME, PrivacyLedger, PrivacyLedgerError
from fedmed.privacy.ledger_anchor import LedgerAnchorError, anchor_path
from fedmed.site.audit import AuditLog, audit_path
from fedmed.site.ledger_guard import open_site_ledger, record_charge, reset_ledger

DATASET = "brain"
PLAN = {"target_epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", "sample_rate": 0.02, "planned_steps": 200}


@pytest.fixture
def site_state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def ledger_file(site_state: Path) -> Path:
    return site_state / LEDGER_FILENAME


def _charge(ledger_file: Path, server_round: int) -> None:
    with open_site_ledger(ledger_file) as ledger:
        plan = ledger.plan_run(dataset=DATASET, run_id="run-1", **PLAN)
        epsilon = ledger.record_round(dataset=DATASET, run_id="run-1", round=server_round, plan=plan, steps=50)
        record_charge(ledger, run_id="run-1", server_round=server_round, epsilon=epsilon)


def _events(site_state: Path) -> list[str]:
    return [record["event"] for record in AuditLog(audit_path(site_state)).records()]


def test_a_first_start_creates_the_ledger_its_anchor_and_an_audit_entry(ledger_file: Path, site_state: Path) -> None:
    with open_site_ledger(ledger_file) as ledger:
        ledger_id = ledger.ledger_id
    anchor = json.loads(anchor_path(ledger_file).read_text())
    assert anchor["ledger_id"] == ledger_id and len(ledger_id) == 32
    assert anchor["charges"] == 0
    assert _events(site_state) == ["ledger-created"]
    _charge(ledger_file, 1)
    anchor = json.loads(anchor_path(ledger_file).read_text())
    assert anchor["charges"] == 1, "the anchor advances with every charge"
    records = AuditLog(audit_path(site_state)).records()
    assert [r["event"] for r in records] == ["ledger-created", "ledger-charged"]
    assert records[-1]["digest"] == anchor["digest"] and records[-1]["round"] == 1
    with open_site_ledger(ledger_file):  # the same ledger opens again
        pass


def test_a_deleted_ledger_is_refused_and_not_recreated(ledger_file: Path) -> None:
    _charge(ledger_file, 1)
    ledger_file.unlink()
    with pytest.raises(LedgerAnchorError, match=rf"privacy ledger {ledger_file} is missing.*ledger-reset"):
        open_site_ledger(ledger_file)
    assert not ledger_file.exists(), "never silently recreated"


def test_a_deleted_ledger_and_anchor_are_refused_while_the_audit_log_remembers(ledger_file: Path) -> None:
    _charge(ledger_file, 1)
    ledger_file.unlink()
    anchor_path(ledger_file).unlink()
    with pytest.raises(LedgerAnchorError, match="both missing, but the audit log"):
        open_site_ledger(ledger_file)
    assert not ledger_file.exists()


def test_a_replaced_ledger_is_refused(ledger_file: Path, tmp_path: Path) -> None:
    _charge(ledger_file, 1)
    other = tmp_path / "other" / LEDGER_FILENAME
    PrivacyLedger(other).close()  # an empty ledger with its own id
    shutil.copy2(other, ledger_file)
    with pytest.raises(LedgerAnchorError, match=rf"privacy ledger {ledger_file} was replaced: its id is \w+"):
        open_site_ledger(ledger_file)


def test_a_rolled_back_ledger_is_refused(ledger_file: Path, tmp_path: Path) -> None:
    _charge(ledger_file, 1)
    backup = tmp_path / "backup.sqlite"
    shutil.copy2(ledger_file, backup)
    _charge(ledger_file, 2)
    shutil.copy2(backup, ledger_file)  # last week's backup
    with pytest.raises(LedgerAnchorError, match=r"was rolled back: it holds 1 charge\(s\).*remembers 2"):
        open_site_ledger(ledger_file)


def test_a_ledger_ahead_of_its_anchor_is_caught_up(ledger_file: Path) -> None:
    """The daemon died between the charge and the anchor's update: nothing was refunded, go on."""
    _charge(ledger_file, 1)
    with PrivacyLedger(ledger_file, create=False) as ledger:
        plan = ledger.get_plan(dataset=DATASET, run_id="run-1")
        ledger.record_round(dataset=DATASET, run_id="run-1", round=2, plan=plan, steps=50)
    with open_site_ledger(ledger_file):
        pass
    assert json.loads(anchor_path(ledger_file).read_text())["charges"] == 2


def test_an_explicit_reset_archives_the_old_ledger_and_is_audited(ledger_file: Path, site_state: Path) -> None:
    _charge(ledger_file, 1)
    with PrivacyLedger(ledger_file, create=False) as ledger:
        old_id = ledger.ledger_id
    ledger_file.unlink()  # lost: the site refuses until the admin decides
    with pytest.raises(LedgerAnchorError):
        open_site_ledger(ledger_file)
    with pytest.raises(LedgerAnchorError, match="needs a reason"):
        reset_ledger(ledger_file, reason="  ")
    identity, archived = reset_ledger(ledger_file, reason="disk replaced, backup lost (ticket 42)")
    assert archived is None and identity.ledger_id != old_id and identity.charges == 0
    with open_site_ledger(ledger_file) as ledger:
        assert ledger.ledger_id == identity.ledger_id and ledger.history(DATASET) == []
    reset = AuditLog(audit_path(site_state)).records()[-1]
    assert reset["event"] == "ledger-reset"
    assert reset["reason"] == "disk replaced, backup lost (ticket 42)"
    assert (reset["previous_ledger_id"], reset["previous_charges"]) == (old_id, 1)

    _, archived = reset_ledger(ledger_file, reason="new data set version")
    assert archived is not None and archived.exists() and archived.stat().st_mode & 0o777 == 0o600
    assert AuditLog(audit_path(site_state)).verify().ok


def test_a_ledger_from_before_anchors_is_adopted(ledger_file: Path, site_state: Path) -> None:
    with PrivacyLedger(ledger_file) as ledger:
        plan = ledger.plan_run(dataset=DATASET, run_id="run-1", **PLAN)
        ledger.record_round(dataset=DATASET, run_id="run-1", round=1, plan=plan, steps=50)
        ledger_id = ledger.ledger_id
    with open_site_ledger(ledger_file) as ledger:
        assert ledger.ledger_id == ledger_id
    assert json.loads(anchor_path(ledger_file).read_text())["charges"] == 1
    assert _events(site_state) == ["ledger-adopted"]


def test_opening_without_create_never_makes_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILENAME
    with pytest.raises(PrivacyLedgerError, match="does not exist"):
        PrivacyLedger(path, create=False)
    assert not path.exists()
