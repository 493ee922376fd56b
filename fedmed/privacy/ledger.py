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

import math
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmed.log import logger
from fedmed.privacy.accounting import (
    HistoryEntry,
    calibrate_noise_multiplier,
    epsilon_spent,
)
from fedmed.privacy.errors import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyLedgerError,
    budget_exhausted_message,
)

LEDGER_FILENAME = "privacy-ledger.sqlite"
LEDGER_FORMAT = "fedmed-privacy-ledger"
SCHEMA_VERSION = 1
_FILE_MODE = 0o600
_BUSY_TIMEOUT_S = 30.0  # a write holds the lock for at most one ε computation (about a second)
_PLAN_ATTEMPTS = 3

_SCHEMA = f"""
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE runs (
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    planned_steps INTEGER NOT NULL CHECK (planned_steps >= 1),
    target_epsilon REAL NOT NULL CHECK (target_epsilon > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (dataset, run_id)
);
CREATE TABLE rounds (
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL CHECK (attempt >= 1),
    charge_id TEXT NOT NULL UNIQUE,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 1),
    epsilon_after REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (dataset, run_id, round, attempt),
    FOREIGN KEY (dataset, run_id) REFERENCES runs (dataset, run_id)
);
CREATE TRIGGER runs_no_update BEFORE UPDATE ON runs
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER runs_no_delete BEFORE DELETE ON runs
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER rounds_no_update BEFORE UPDATE ON rounds
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER rounds_no_delete BEFORE DELETE ON rounds
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
INSERT INTO meta (key, value) VALUES ('format', '{LEDGER_FORMAT}'), ('schema_version', '{SCHEMA_VERSION}');
"""

_RUN_COLUMNS = (
    "dataset, run_id, noise_multiplier, sample_rate, planned_steps, target_epsilon, delta, accountant, created_at"
)


@dataclass(frozen=True)
class RunPlan:
    """The DP parameters fixed for one run on one dataset; σ never changes within a run."""

    dataset: str
    run_id: str
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    delta: float
    accountant: str
    created_at: str


@dataclass(frozen=True)
class BudgetCheck:
    """Whether one more round of ``steps`` steps fits the dataset's budget, and why not if it does not."""

    allowed: bool
    site: str
    dataset: str
    epsilon_spent: float
    epsilon_after: float
    target_epsilon: float
    message: str | None  # the refusal, None when allowed

    def raise_if_refused(self) -> None:
        if not self.allowed:
            raise PrivacyBudgetExhaustedError(self.message)


@dataclass(frozen=True)
class LedgerSummaryRow:
    """One (dataset, run): its own rounds and steps, and the dataset's cumulative spend against its target."""

    dataset: str
    run_id: str
    rounds: int  # distinct rounds charged in this run
    attempts: int  # charges in this run (> rounds when rounds were retried)
    steps: int
    noise_multiplier: float
    epsilon_spent: float  # whole dataset, all runs, at this run's δ and accountant
    target_epsilon: float
    remaining_epsilon: float
    delta: float
    accountant: str


class PrivacyLedger:
    """Append-only record of a site's DP spend per dataset (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
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
                    (dataset, run_id, sigma, plan.sample_rate, plan.planned_steps, plan.target_epsilon,
                     plan.delta, plan.accountant, plan.created_at),
                )
            logger.info(
                "privacy: run %s on %s gets σ=%.4f for %d steps at q=%.4g (target ε %.2f, δ %.1e, %s)",
                run_id, dataset, sigma, planned_steps, sample_rate, target_epsilon, delta, accountant,
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
        round: int,  # noqa: A002 - the protocol's word for it
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
                (dataset, run_id, round, attempt, charge_id, plan.noise_multiplier, plan.sample_rate, steps,
                 after, plan.delta, plan.accountant, _now()),
            )
        if attempt > 1:
            logger.warning("privacy: round %d of run %s retried (attempt %d); charged again", round, run_id, attempt)
        if after > plan.target_epsilon:
            logger.warning(
                "privacy: %s now at ε %.2f, above its target %.2f; refuse further rounds",
                dataset, after, plan.target_epsilon,
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


def _create_ledger_file(path: Path) -> None:
    """Create a complete, empty ledger at ``path`` without ever exposing a half-initialised file.

    The schema is built in a private temporary file which is then hard-linked into place; link
    fails if another process created the ledger first, and an empty file at ``path`` can then
    only mean damage, which opening refuses.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE))
    try:
        os.chmod(temporary, _FILE_MODE)  # the umask may have narrowed it; never widened
        connection = _connect(temporary)
        try:
            connection.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nCOMMIT;")
        finally:
            connection.close()
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # created concurrently by another process: open theirs
        else:
            logger.info("privacy: created ledger %s", path)
    finally:
        temporary.unlink(missing_ok=True)


def _open_existing(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise PrivacyLedgerError(f"privacy ledger {path} is not a file; move it aside or point the site at its ledger")
    if path.stat().st_size == 0:
        raise _corrupt(path, "the file is empty")
    mode = path.stat().st_mode & 0o777
    if mode != _FILE_MODE:
        # Only the site's service account may write its budget.
        logger.warning("privacy: ledger %s had mode %o; restricting it to %o", path, mode, _FILE_MODE)
        os.chmod(path, _FILE_MODE)
    try:
        connection = _connect(path)
    except sqlite3.DatabaseError as error:
        raise _corrupt(path, str(error)) from error
    try:
        _verify(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


def _verify(connection: sqlite3.Connection, path: Path) -> None:
    try:
        check = connection.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise _corrupt(path, "; ".join(str(row[0]) for row in check[:3]))
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "runs", "rounds"} <= tables:
            raise _corrupt(path, "it is an SQLite database but not a fedmed privacy ledger")
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as error:
        raise _corrupt(path, str(error)) from error
    if meta.get("format") != LEDGER_FORMAT:
        raise _corrupt(path, "it is an SQLite database but not a fedmed privacy ledger")
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise PrivacyLedgerError(
            f"privacy ledger {path} has schema version {meta.get('schema_version')}, this fedmed reads "
            f"{SCHEMA_VERSION}; run the fedmed version that wrote it"
        )


def _corrupt(path: Path, reason: str) -> PrivacyLedgerError:
    return PrivacyLedgerError(
        f"privacy ledger {path} is corrupt or unreadable ({reason}); restore it from the site's backup. "
        "Do not delete it: a new ledger would forget the privacy budget already spent"
    )


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write goes through _transaction.
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = FULL")  # a commit is on disk before it returns
    except sqlite3.DatabaseError:
        connection.close()
        raise
    return connection


def _reuse(existing: RunPlan, requested: dict[str, object]) -> RunPlan:
    _check_same_plan(existing, requested)
    logger.info(
        "privacy: reusing σ=%.4f fixed for run %s on %s", existing.noise_multiplier, existing.run_id, existing.dataset
    )
    return existing


def _check_same_plan(existing: RunPlan, requested: dict[str, object]) -> None:
    differences = [
        f"{name} {getattr(existing, name)!r} → {value!r}"
        for name, value in requested.items()
        if not _same(getattr(existing, name), value)
    ]
    if differences:
        raise PrivacyConfigError(
            f"run {existing.run_id!r} on {existing.dataset!r} was planned with other privacy settings "
            f"({', '.join(differences)}); σ is fixed per run, so start a new run id to change them"
        )


def _same(stored: object, requested: object) -> bool:
    if isinstance(stored, float) and isinstance(requested, float):
        return math.isclose(stored, requested, rel_tol=1e-12, abs_tol=0.0)
    return stored == requested


def _check_plan_is_for(plan: RunPlan, *, dataset: str, run_id: str) -> None:
    if (plan.dataset, plan.run_id) != (dataset, run_id):
        raise PrivacyConfigError(
            f"plan is for run {plan.run_id!r} on {plan.dataset!r}, not run {run_id!r} on {dataset!r}; "
            "pass the plan returned by plan_run for this run and dataset"
        )


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise PrivacyConfigError(f"a round must charge ≥ 1 DP-SGD step, got {steps}; check the local epochs")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
