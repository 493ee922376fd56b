"""The privacy ledger's SQLite file: its schema, its atomic creation, and opening it only if it is intact.

Kept apart from PrivacyLedger so that the rules about the file itself (owner-only permissions, commits
that are on disk, refusing a damaged or foreign file rather than recreating it) sit in one place.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

from fedmed.core.log import logger
from fedmed.privacy.errors import PrivacyLedgerError

LEDGER_FORMAT = "fedmed-privacy-ledger"
SCHEMA_VERSION = 1
LEDGER_ID_KEY = "ledger_id"
_FILE_MODE = 0o600
_BUSY_TIMEOUT_S = 30.0  # a write holds the lock for at most one ε computation (about a second)

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
CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
INSERT INTO meta (key, value) VALUES ('format', '{LEDGER_FORMAT}'), ('schema_version', '{SCHEMA_VERSION}');
"""

_RUN_COLUMNS = (
    "dataset, run_id, noise_multiplier, sample_rate, planned_steps, target_epsilon, delta, accountant, created_at"
)


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
            # The id is born with the file: a ledger swapped for another one (or a fresh one) shows a
            # different id from the one the site's anchor remembers.
            identity = f"INSERT INTO meta (key, value) VALUES ('{LEDGER_ID_KEY}', '{uuid.uuid4().hex}');"
            connection.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\n{identity}\nCOMMIT;")
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
    # isolation_level=None: no implicit transactions; every write goes through PrivacyLedger._transaction.
    connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA synchronous = FULL")  # a commit is on disk before it returns
    except sqlite3.DatabaseError:
        connection.close()
        raise
    return connection
