"""The site-owned privacy ledger: every DP-SGD charge against each dataset, in one SQLite file.

The site, not the coordinator, owns its budget. The ledger outlives runs and daemon restarts:
a run's noise multiplier σ is calibrated once (``plan_run``) and stored, every trained round is
appended (``record_round``), and ε is always recomputed from the whole per-dataset history.

Guarantees:
- Append-only: there is no API to delete or reset, and SQLite triggers reject UPDATE/DELETE on
  the charge tables, so a bug or a remote request cannot refund budget.
- Atomic: each write is one ``BEGIN IMMEDIATE … COMMIT`` transaction under the default rollback
  journal with ``synchronous=FULL``; a crash loses nothing already committed and never leaves a
  half row. The rollback journal (not WAL) keeps the committed ledger a single self-contained
  file, which is what operators back up.
- A corrupt or foreign file is refused with an error naming it; it is never silently recreated,
  since recreating it would silently refund the whole budget.

Retried rounds: each call to ``record_round`` is one training attempt and is charged as such,
keyed (dataset, run_id, round, attempt). A round retried after a crash trained again on the same
records, so it spent budget again; charging it once would under-count, which is a privacy breach,
while over-counting only costs utility. A *bookkeeping* retry (the same attempt recorded twice,
e.g. the daemon died between commit and acknowledgement) is made idempotent by passing the same
``charge_id``: a known charge_id returns the stored ε and charges nothing.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmed.core.log import logger
from fedmed.privacy.accounting import HistoryEntry, calibrate_noise_multiplier, epsilon_spent
from fedmed.privacy.errors import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyLedgerError,
    budget_exhausted_message,
)
from fedmed.privacy.ledger_anchor import LedgerIdentity, charge_digests
from fedmed.privacy.ledger_file import _RUN_COLUMNS, LEDGER_ID_KEY, _create_ledger_file, _open_existing
from fedmed.privacy.ledger_records import (
    BudgetCheck,
    LedgerSummaryRow,
    RunPlan,
    _check_plan_is_for,
    _check_steps,
    _reuse,
)

LEDGER_FILENAME = "privacy-ledger.sqlite"
_PLAN_ATTEMPTS = 3


class PrivacyLedger:
    """Append-only record of a site's DP spend per dataset (see module docstring)."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """Open the ledger at ``path``; a missing one is created unless ``create`` is false.

        A site opens its ledger through fedmed.site.ledger_guard, which creates it only on a site's
        first start and otherwise checks it against the site's anchor.
        """
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise PrivacyLedgerError(
                    f"privacy ledger {self.path} does not exist; restore it from the site's backup"
                )
            _create_ledger_file(self.path)
        self._connection = _open_existing(self.path)
        # One connection shared by the daemon's threads: the lock keeps one thread's reads from
        # seeing another's uncommitted transaction.
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- identity ------------------------------------------------------------------------------

    @property
    def ledger_id(self) -> str | None:
        """The random id the ledger was created with (None: a ledger from before ids existed)."""
        with self._lock:
            row = self._connection.execute("SELECT value FROM meta WHERE key = ?", (LEDGER_ID_KEY,)).fetchone()
        return None if row is None else str(row[0])

    def assign_id(self) -> str:
        """Give a ledger from before ids existed its id (once); returns the ledger's id."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (LEDGER_ID_KEY,)).fetchone()
            if row is not None:
                return str(row[0])
            ledger_id = uuid.uuid4().hex
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (LEDGER_ID_KEY, ledger_id))
        return ledger_id

    def charge_digests(self) -> list[str]:
        """The running digest after each charge (fedmed.privacy.ledger_anchor); element 0 covers none."""
        with self._lock:
            return charge_digests(self._connection)

    def identity(self) -> LedgerIdentity:
        digests = self.charge_digests()
        return LedgerIdentity(ledger_id=self.ledger_id or "", charges=len(digests) - 1, digest=digests[-1])

    # -- plans ---------------------------------------------------------------------------------

    def plan_run(
        self,
        *,
        dataset: str,
        run_id: str,
        target_epsilon: float,
        delta: float,
        accountant: str,
        sample_rate: float,
        planned_steps: int,
        site: str | None = None,
    ) -> RunPlan:
        """The run's fixed plan: the stored one after a restart, else σ calibrated on the dataset's prior spend.

        ``site`` only names the site in a refusal message.
        """
        requested: dict[str, Any] = {
            "target_epsilon": float(target_epsilon),
            "delta": float(delta),
            "accountant": accountant,
            "sample_rate": float(sample_rate),
            "planned_steps": int(planned_steps),
        }
        for _ in range(_PLAN_ATTEMPTS):
            existing = self.get_plan(dataset=dataset, run_id=run_id)
            if existing is not None:
                return _reuse(existing, requested)
            prior = self.history(dataset)
            # Calibrate outside the write lock: with PRV and several prior runs it takes seconds
            # to minutes, and recording other datasets' rounds must not wait for it.
            sigma = self._calibrate(site=site, prior=prior, **requested)
            with self._transaction() as db:
                existing = self._load_plan(db, dataset=dataset, run_id=run_id)
                if existing is not None:  # planned concurrently by another process
                    return _reuse(existing, requested)
                if self._history(db, dataset) != prior:
                    continue  # charges landed while calibrating: σ must cover them too
                plan = RunPlan(dataset=dataset, run_id=run_id, noise_multiplier=sigma, created_at=_now(), **requested)
                db.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        dataset,
                        run_id,
                        sigma,
                        plan.sample_rate,
                        plan.planned_steps,
                        plan.target_epsilon,
                        plan.delta,
                        plan.accountant,
                        plan.created_at,
                    ),
                )
            logger.info(
                "privacy: run %s on %s gets σ=%.4f for %d steps at q=%.4g (target ε %.2f, δ %.1e, %s)",
                run_id,
                dataset,
                sigma,
                planned_steps,
                sample_rate,
                target_epsilon,
                delta,
                accountant,
            )
            return plan
        raise PrivacyLedgerError(
            f"privacy ledger {self.path}: charges for {dataset!r} kept arriving while run {run_id!r} was being "
            "planned; plan the run when no other run trains on this dataset"
        )

    @staticmethod
    def _calibrate(
        *,
        site: str | None,
        prior: list[HistoryEntry],
        target_epsilon: float,
        delta: float,
        accountant: str,
        sample_rate: float,
        planned_steps: int,
    ) -> float:
        try:
            return calibrate_noise_multiplier(
                target_epsilon=target_epsilon,
                delta=delta,
                sample_rate=sample_rate,
                planned_steps=planned_steps,
                prior_history=prior,
                accountant=accountant,
            )
        except PrivacyBudgetExhaustedError:
            spent = epsilon_spent(prior, delta=delta, accountant=accountant)
            if site is None or spent < target_epsilon:
                raise  # no site name to report, or the "nearly exhausted" case with its own advice
            # The operator-facing wording, naming the site.
            raise PrivacyBudgetExhaustedError(
                budget_exhausted_message(site, spent=spent, target=target_epsilon)
            ) from None

    def get_plan(self, *, dataset: str, run_id: str) -> RunPlan | None:
        with self._lock:
            return self._load_plan(self._connection, dataset=dataset, run_id=run_id)

    # -- spend ---------------------------------------------------------------------------------

    def history(self, dataset: str) -> list[HistoryEntry]:
        """Every charge against ``dataset`` over all runs, as Opacus-style (σ, q, steps), oldest first."""
        with self._lock:
            return self._history(self._connection, dataset)

    def spent(self, dataset: str, *, delta: float, accountant: str) -> float:
        return epsilon_spent(self.history(dataset), delta=delta, accountant=accountant)

    def check_round(self, *, site: str, dataset: str, plan: RunPlan, steps: int) -> BudgetCheck:
        """Would ``steps`` more steps at the plan's (σ, q) keep the dataset within its target ε?"""
        _check_steps(steps)
        _check_plan_is_for(plan, dataset=dataset, run_id=plan.run_id)
        prior = self.history(dataset)
        spent = epsilon_spent(prior, delta=plan.delta, accountant=plan.accountant)
        after = epsilon_spent(
            [*prior, (plan.noise_multiplier, plan.sample_rate, steps)], delta=plan.delta, accountant=plan.accountant
        )
        allowed = after <= plan.target_epsilon
        message = None
        if not allowed:
            message = budget_exhausted_message(site, spent=spent, target=plan.target_epsilon, would_reach=after)
            logger.warning("privacy: %s", message)
        return BudgetCheck(
            allowed=allowed,
            site=site,
            dataset=dataset,
            epsilon_spent=spent,
            epsilon_after=after,
            target_epsilon=plan.target_epsilon,
            message=message,
        )

    def record_round(
        self,
        *,
        dataset: str,
        run_id: str,
        round: int,
        plan: RunPlan,
        steps: int,
        charge_id: str | None = None,
    ) -> float:
        """Charge one trained round; returns the dataset's ε after it. Always records: the spend happened.

        A new call for an already-charged round is a new attempt and a new charge (module
        docstring). Pass the same ``charge_id`` to make re-recording one attempt idempotent.
        """
        _check_steps(steps)
        _check_plan_is_for(plan, dataset=dataset, run_id=run_id)
        charge_id = charge_id or uuid.uuid4().hex
        with self._transaction() as db:
            stored = self._load_plan(db, dataset=dataset, run_id=run_id)
            fixed = None if stored is None else (stored.noise_multiplier, stored.sample_rate)
            if fixed != (plan.noise_multiplier, plan.sample_rate):
                raise PrivacyConfigError(
                    f"run {run_id!r} on {dataset!r} has no matching plan in {self.path}; call plan_run first and "
                    "train with the σ and sample rate it returns"
                )
            duplicate = db.execute(
                "SELECT dataset, run_id, round, steps, epsilon_after FROM rounds WHERE charge_id = ?", (charge_id,)
            ).fetchone()
            if duplicate is not None:
                if tuple(duplicate[:4]) != (dataset, run_id, round, steps):
                    raise PrivacyConfigError(
                        f"charge_id {charge_id!r} is already recorded for a different round in {self.path}; "
                        "use a fresh charge_id for each training attempt"
                    )
                return float(duplicate[4])
            attempt = db.execute(
                "SELECT COALESCE(MAX(attempt), 0) + 1 FROM rounds WHERE dataset = ? AND run_id = ? AND round = ?",
                (dataset, run_id, round),
            ).fetchone()[0]
            history = [*self._history(db, dataset), (plan.noise_multiplier, plan.sample_rate, steps)]
            after = epsilon_spent(history, delta=plan.delta, accountant=plan.accountant)
            db.execute(
                "INSERT INTO rounds (dataset, run_id, round, attempt, charge_id, noise_multiplier, sample_rate, steps,"
                " epsilon_after, delta, accountant, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset,
                    run_id,
                    round,
                    attempt,
                    charge_id,
                    plan.noise_multiplier,
                    plan.sample_rate,
                    steps,
                    after,
                    plan.delta,
                    plan.accountant,
                    _now(),
                ),
            )
        if attempt > 1:
            logger.warning("privacy: round %d of run %s retried (attempt %d); charged again", round, run_id, attempt)
        if after > plan.target_epsilon:
            logger.warning(
                "privacy: %s now at ε %.2f, above its target %.2f; refuse further rounds",
                dataset,
                after,
                plan.target_epsilon,
            )
        return after

    def summary(self) -> list[LedgerSummaryRow]:
        """One row per (dataset, run), oldest run first; ε is the dataset's cumulative spend."""
        with self._lock:
            runs = self._connection.execute(f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY rowid").fetchall()
            counts = {
                (dataset, run_id): (rounds, attempts, steps)
                for dataset, run_id, rounds, attempts, steps in self._connection.execute(
                    "SELECT dataset, run_id, COUNT(DISTINCT round), COUNT(*), SUM(steps) FROM rounds"
                    " GROUP BY dataset, run_id"
                )
            }
        spent_cache: dict[tuple[str, float, str], float] = {}
        rows = []
        for record in runs:
            plan = RunPlan(*record)
            key = (plan.dataset, plan.delta, plan.accountant)
            if key not in spent_cache:
                spent_cache[key] = self.spent(plan.dataset, delta=plan.delta, accountant=plan.accountant)
            rounds, attempts, steps = counts.get((plan.dataset, plan.run_id), (0, 0, 0))
            spent = spent_cache[key]
            rows.append(
                LedgerSummaryRow(
                    dataset=plan.dataset,
                    run_id=plan.run_id,
                    rounds=rounds,
                    attempts=attempts,
                    steps=steps,
                    noise_multiplier=plan.noise_multiplier,
                    epsilon_spent=spent,
                    target_epsilon=plan.target_epsilon,
                    remaining_epsilon=max(plan.target_epsilon - spent, 0.0),
                    delta=plan.delta,
                    accountant=plan.accountant,
                )
            )
        return rows

    # -- internals -----------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it (rollback on any exception)."""
        db = self._connection
        with self._lock:
            # IMMEDIATE takes SQLite's write lock up front, so read-then-insert (attempt numbers,
            # prior history) cannot interleave with another process's write.
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    @staticmethod
    def _history(db: sqlite3.Connection, dataset: str) -> list[HistoryEntry]:
        rows = db.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM rounds WHERE dataset = ? ORDER BY rowid",
            (dataset,),
        ).fetchall()
        return [(float(sigma), float(rate), int(steps)) for sigma, rate, steps in rows]

    @staticmethod
    def _load_plan(db: sqlite3.Connection, *, dataset: str, run_id: str) -> RunPlan | None:
        row = db.execute(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE dataset = ? AND run_id = ?", (dataset, run_id)
        ).fetchone()
        return None if row is None else RunPlan(*row)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
