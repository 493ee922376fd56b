"""The site's privacy ledger: persistent, append-only, atomic, and refusing exactly at the budget."""

from __future__ import annotations

import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedmed.privacy import (
    LEDGER_FILENAME,
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyLedger,
    PrivacyLedgerError,
    RunPlan,
)

SITE = "hospital-a"
DATASET = "brain-mri@3f2a9c"
DELTA = 1e-5
# Plan: target ε 3 over 200 steps at q = 0.02, trained as 4 rounds of 50 steps.
PLAN_ARGS = {"target_epsilon": 3.0, "delta": DELTA, "sample_rate": 0.02, "planned_steps": 200}
# Computed once with Opacus 1.6.0: σ from get_noise_multiplier, ε after each round.
GOLDEN_SIGMA = {"rdp": 0.887451171875, "prv": 0.8270263671875}
GOLDEN_RDP_AFTER_ROUND = [2.179320001680972, 2.497402306039818, 2.7617010239162605, 2.9977340239542425]
GOLDEN_PRV_AFTER_4_ROUNDS = 2.9954897887369043


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """Where a site's ledger goes; nothing exists there yet, not even the folders."""
    return tmp_path / "site-state" / "nested" / LEDGER_FILENAME


@pytest.fixture(scope="module")
def template_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Calibrating run-1 once and copying the file keeps the suite fast; the golden tests below
    # check that this stored σ is the calibrated one.
    path = tmp_path_factory.mktemp("template") / LEDGER_FILENAME
    with PrivacyLedger(path) as ledger:
        _plan(ledger)
    return path


@pytest.fixture
def planned_path(ledger_path: Path, template_path: Path) -> Path:
    """A ledger file in which run-1 is planned (σ fixed) and nothing is charged yet."""
    ledger_path.parent.mkdir(parents=True)
    shutil.copy2(template_path, ledger_path)
    return ledger_path


@pytest.fixture
def ledger(planned_path: Path) -> PrivacyLedger:
    with PrivacyLedger(planned_path) as opened:
        yield opened


def _plan(ledger: PrivacyLedger, run_id: str = "run-1", accountant: str = "rdp", **overrides: object) -> RunPlan:
    arguments = {**PLAN_ARGS, **overrides}
    return ledger.plan_run(dataset=DATASET, run_id=run_id, accountant=accountant, site=SITE, **arguments)


def _record(ledger: PrivacyLedger, plan: RunPlan, server_round: int, steps: int = 50) -> float:
    return ledger.record_round(dataset=DATASET, run_id=plan.run_id, round=server_round, plan=plan, steps=steps)


def _opacus_epsilon(history: list[tuple[float, float, int]], accountant: str) -> float:
    engine = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    engine.history = list(history)
    return float(engine.get_epsilon(delta=DELTA))


def test_recorded_rdp_history_matches_opacus_and_golden(ledger: PrivacyLedger) -> None:
    plan = _plan(ledger)
    assert plan.noise_multiplier == pytest.approx(GOLDEN_SIGMA["rdp"], rel=1e-9)
    after = [_record(ledger, plan, server_round) for server_round in range(1, 5)]
    assert after == pytest.approx(GOLDEN_RDP_AFTER_ROUND, abs=1e-6)
    history = ledger.history(DATASET)
    assert history == [(plan.noise_multiplier, 0.02, 50)] * 4
    spent = ledger.spent(DATASET, delta=DELTA, accountant="rdp")
    assert spent == pytest.approx(_opacus_epsilon(history, "rdp"), abs=1e-9)
    assert 3.0 - 0.01 <= spent <= 3.0  # all planned steps land within tolerance below the target


def test_recorded_prv_history_matches_opacus_and_golden(ledger_path: Path) -> None:
    with PrivacyLedger(ledger_path) as ledger:  # a fresh ledger: σ calibrated here, with PRV
        plan = _plan(ledger, accountant="prv")
        assert plan.noise_multiplier == pytest.approx(GOLDEN_SIGMA["prv"], rel=1e-9)
        for server_round in range(1, 5):
            _record(ledger, plan, server_round)
        spent = ledger.spent(DATASET, delta=DELTA, accountant="prv")
        assert spent == pytest.approx(_opacus_epsilon(ledger.history(DATASET), "prv"), rel=1e-3)
        assert spent == pytest.approx(GOLDEN_PRV_AFTER_4_ROUNDS, rel=1e-3)
        assert spent <= 3.0


def test_refuses_exactly_the_round_that_would_exceed_the_target(ledger: PrivacyLedger) -> None:
    plan = _plan(ledger)
    for server_round in range(1, 4):
        assert ledger.check_round(site=SITE, dataset=DATASET, plan=plan, steps=50).allowed
        _record(ledger, plan, server_round)
    # 51 steps would reach ε 3.0023 > 3; the planned 50 reach 2.9977 and are allowed.
    over = ledger.check_round(site=SITE, dataset=DATASET, plan=plan, steps=51)
    assert not over.allowed
    assert over.message == (
        "site hospital-a: privacy budget exhausted (ε 2.76 spent of 3.00, this round would reach 3.00)"
    )
    with pytest.raises(PrivacyBudgetExhaustedError) as refused:
        over.raise_if_refused()
    assert str(refused.value) == over.message
    last = ledger.check_round(site=SITE, dataset=DATASET, plan=plan, steps=50)
    assert last.allowed and last.message is None
    assert last.epsilon_after == pytest.approx(GOLDEN_RDP_AFTER_ROUND[3], abs=1e-6)
    _record(ledger, plan, 4)
    fifth = ledger.check_round(site=SITE, dataset=DATASET, plan=plan, steps=50)
    assert fifth.message == (
        "site hospital-a: privacy budget exhausted (ε 3.00 spent of 3.00, this round would reach 3.22)"
    )


def test_ledger_survives_restart_and_reuses_the_run_plan(planned_path: Path) -> None:
    ledger_path = planned_path
    with PrivacyLedger(ledger_path) as first:
        plan = _plan(first)
        _record(first, plan, 1)
        _record(first, plan, 2)
    with PrivacyLedger(ledger_path) as restarted:  # daemon restart mid-run
        assert _plan(restarted) == plan  # σ reused, not recalibrated
        assert restarted.history(DATASET) == [(plan.noise_multiplier, 0.02, 50)] * 2
        assert _record(restarted, plan, 3) == pytest.approx(GOLDEN_RDP_AFTER_ROUND[2], abs=1e-6)
        with pytest.raises(PrivacyConfigError, match="σ is fixed per run, so start a new run id"):
            _plan(restarted, planned_steps=400)


def test_next_run_continues_from_the_prior_spend(planned_path: Path) -> None:
    ledger_path = planned_path
    with PrivacyLedger(ledger_path) as ledger:
        first = _plan(ledger)
        _record(ledger, first, 1)
        _record(ledger, first, 2)
    with PrivacyLedger(ledger_path) as ledger:
        second = _plan(ledger, run_id="run-2")  # same target, ε 2.50 already spent
        assert second.noise_multiplier > first.noise_multiplier
        for server_round in range(1, 5):
            _record(ledger, second, server_round)
        assert 3.0 - 0.01 <= ledger.spent(DATASET, delta=DELTA, accountant="rdp") <= 3.0
        # The last few thousandths of ε cannot pay for a full-batch run even with absurd noise.
        with pytest.raises(PrivacyBudgetExhaustedError, match="nearly exhausted"):
            _plan(ledger, run_id="run-3", sample_rate=1.0, planned_steps=1000)
        # Other datasets have their own budgets.
        other = ledger.plan_run(dataset="other@1", run_id="run-3", accountant="rdp", **PLAN_ARGS)
        assert other.noise_multiplier == pytest.approx(GOLDEN_SIGMA["rdp"], rel=1e-9)


def test_new_run_on_a_spent_dataset_is_refused_with_the_site_message(ledger: PrivacyLedger) -> None:
    plan = _plan(ledger)
    for server_round in range(1, 6):  # one round past plan: training happened, so it is recorded
        _record(ledger, plan, server_round)
    with pytest.raises(PrivacyBudgetExhaustedError) as refused:
        _plan(ledger, run_id="run-2")
    assert str(refused.value) == "site hospital-a: privacy budget exhausted (ε 3.22 spent of 3.00)"


def test_retried_round_is_a_new_charge_but_a_repeated_record_is_not(ledger: PrivacyLedger) -> None:
    plan = _plan(ledger)
    first = ledger.record_round(dataset=DATASET, run_id="run-1", round=1, plan=plan, steps=50, charge_id="a1")
    again = ledger.record_round(dataset=DATASET, run_id="run-1", round=1, plan=plan, steps=50, charge_id="a1")
    assert again == first and len(ledger.history(DATASET)) == 1  # same attempt: idempotent
    retried = ledger.record_round(dataset=DATASET, run_id="run-1", round=1, plan=plan, steps=50)
    assert retried == pytest.approx(GOLDEN_RDP_AFTER_ROUND[1], abs=1e-6)  # trained again: charged again
    with pytest.raises(PrivacyConfigError, match="charge_id 'a1' is already recorded for a different round"):
        ledger.record_round(dataset=DATASET, run_id="run-1", round=2, plan=plan, steps=50, charge_id="a1")
    (row,) = ledger.summary()
    assert (row.run_id, row.rounds, row.attempts, row.steps) == ("run-1", 1, 2, 100)
    assert row.epsilon_spent == pytest.approx(GOLDEN_RDP_AFTER_ROUND[1], abs=1e-6)
    assert row.remaining_epsilon == pytest.approx(3.0 - GOLDEN_RDP_AFTER_ROUND[1], abs=1e-6)


def test_recording_needs_the_stored_plan(ledger: PrivacyLedger) -> None:
    plan = _plan(ledger)
    forged = RunPlan(**{**plan.__dict__, "noise_multiplier": plan.noise_multiplier * 2})
    with pytest.raises(PrivacyConfigError, match="no matching plan"):
        _record(ledger, forged, 1)
    assert ledger.history(DATASET) == []


def test_summary_reports_dataset_cumulative_spend_per_run(ledger: PrivacyLedger) -> None:
    first = _plan(ledger)
    _record(ledger, first, 1)
    second = _plan(ledger, run_id="run-2", target_epsilon=5.0)
    _record(ledger, second, 1)
    rows = ledger.summary()
    assert [(row.run_id, row.rounds, row.steps) for row in rows] == [("run-1", 1, 50), ("run-2", 1, 50)]
    spent = ledger.spent(DATASET, delta=DELTA, accountant="rdp")
    assert [row.epsilon_spent for row in rows] == [spent, spent]
    assert spent > 3.0  # run-2 raised the target, so run-1's target is overspent: remaining clamps at 0
    assert [row.remaining_epsilon for row in rows] == pytest.approx([0.0, 5.0 - spent])


def test_new_ledger_is_private_and_in_created_folders(ledger_path: Path) -> None:
    PrivacyLedger(ledger_path).close()
    assert stat.S_IMODE(ledger_path.stat().st_mode) == 0o600
    assert [path.name for path in ledger_path.parent.iterdir()] == [LEDGER_FILENAME]  # no temporary left


def test_ledger_offers_no_way_to_refund_budget(ledger: PrivacyLedger, ledger_path: Path) -> None:
    public = {name for name in dir(ledger) if not name.startswith("_")}
    assert not {name for name in public if any(word in name for word in ("delete", "reset", "remove", "clear"))}
    _record(ledger, _plan(ledger), 1)
    raw = sqlite3.connect(ledger_path)
    try:
        for statement in ("DELETE FROM rounds", "UPDATE rounds SET steps = 1", "DELETE FROM runs"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                raw.execute(statement)
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"this is not sqlite at all" * 100, "file is not a database"),
        (b"", "the file is empty"),
    ],
)
def test_corrupt_ledger_is_refused_not_recreated(ledger_path: Path, content: bytes, reason: str) -> None:
    ledger_path.parent.mkdir(parents=True)
    ledger_path.write_bytes(content)
    with pytest.raises(PrivacyLedgerError) as refused:
        PrivacyLedger(ledger_path)
    message = str(refused.value)
    assert str(ledger_path) in message and reason in message and "restore it from the site's backup" in message
    assert ledger_path.read_bytes() == content


def test_damaged_pages_are_detected(planned_path: Path) -> None:
    ledger_path = planned_path
    with PrivacyLedger(ledger_path) as ledger:
        _record(ledger, _plan(ledger), 1)
    data = bytearray(ledger_path.read_bytes())
    data[200:4096] = b"\xff" * (4096 - 200)  # clobber the schema page after the header
    ledger_path.write_bytes(bytes(data))
    with pytest.raises(PrivacyLedgerError, match=r"is corrupt or unreadable.*restore it from the site's backup"):
        PrivacyLedger(ledger_path)


def test_foreign_sqlite_database_is_refused(ledger_path: Path) -> None:
    ledger_path.parent.mkdir(parents=True)
    other = sqlite3.connect(ledger_path)
    other.execute("CREATE TABLE notes (text TEXT)")
    other.commit()
    other.close()
    with pytest.raises(PrivacyLedgerError, match="not a fedmed privacy ledger"):
        PrivacyLedger(ledger_path)


def test_exception_inside_a_write_leaves_no_partial_row(ledger: PrivacyLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(ledger)
    with pytest.raises(RuntimeError), ledger._transaction() as db:  # noqa: PT012 - it must fail mid-transaction
        db.execute(
            "INSERT INTO rounds (dataset, run_id, round, attempt, charge_id, noise_multiplier, sample_rate, steps,"
            " epsilon_after, delta, accountant, recorded_at) VALUES (?, 'run-1', 1, 1, 'x', 1.0, 0.02, 50, 1.0,"
            " 1e-5, 'rdp', 'now')",
            (DATASET,),
        )
        raise RuntimeError("crash between insert and commit")
    assert ledger.history(DATASET) == []

    def failing_calibration(**_: object) -> float:
        raise RuntimeError("calibration crashed")

    monkeypatch.setattr("fedmed.privacy.ledger.calibrate_noise_multiplier", failing_calibration)
    with pytest.raises(RuntimeError):
        _plan(ledger, run_id="run-2")
    assert ledger.get_plan(dataset=DATASET, run_id="run-2") is None
    assert _record(ledger, plan, 1) == pytest.approx(GOLDEN_RDP_AFTER_ROUND[0], abs=1e-6)  # ledger still usable


def test_process_killed_mid_write_loses_nothing_committed(planned_path: Path) -> None:
    ledger_path = planned_path
    with PrivacyLedger(ledger_path) as ledger:
        plan = _plan(ledger)
        _record(ledger, plan, 1)
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from fedmed.privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger(Path({str(ledger_path)!r}))
        with ledger._transaction() as db:
            db.execute(
                "INSERT INTO rounds (dataset, run_id, round, attempt, charge_id, noise_multiplier, sample_rate,"
                " steps, epsilon_after, delta, accountant, recorded_at)"
                " VALUES ({DATASET!r}, 'run-1', 2, 1, 'killed', 1.0, 0.02, 50, 1.0, 1e-5, 'rdp', 'now')"
            )
            os._exit(9)  # power cut: no rollback, no commit
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    with PrivacyLedger(ledger_path) as reopened:
        assert reopened.history(DATASET) == [(plan.noise_multiplier, 0.02, 50)]
        assert _record(reopened, plan, 2) == pytest.approx(GOLDEN_RDP_AFTER_ROUND[1], abs=1e-6)
