"""The spool's SQLite journal: which objects are stored, and where each one still has to go.

Every method here is synchronous SQL and runs on the spool's single journal thread (see
``gateway.spool``); the journal never touches object files, it only says which ones to delete. Times are
passed in by the caller (seconds since the epoch), so the SQL is deterministic under test.

Tables: ``instances`` (one row per stored object, ``id`` is also its file name), ``deliveries`` (one row
per instance and destination), ``attempts`` (an append-only log of forward attempts), ``schema_version``.
Write transactions are ``BEGIN IMMEDIATE`` so that another process (the ``queue`` CLI) waits on the
busy timeout instead of failing on a lock upgrade.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
OUTCOMES = frozenset({"delivered", "warning", "transient", "permanent"})
LOST_ERROR = "object file missing when the spool was opened (lost)"

_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    size INTEGER NOT NULL,
    dataset_offset INTEGER NOT NULL,
    path TEXT NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('routed', 'held', 'done', 'lost')),
    duplicate INTEGER NOT NULL DEFAULT 0,
    matched_rules TEXT NOT NULL DEFAULT '[]',
    has_file INTEGER NOT NULL DEFAULT 1,
    expires_at REAL,
    done_at REAL
);
CREATE INDEX instances_live_uid ON instances (sop_instance_uid) WHERE state IN ('routed', 'held');
CREATE INDEX instances_held ON instances (id) WHERE state = 'held';
CREATE INDEX instances_files ON instances (id) WHERE has_file = 1;
CREATE INDEX instances_expiry ON instances (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX instances_done ON instances (done_at) WHERE done_at IS NOT NULL;
CREATE TABLE deliveries (
    instance_id INTEGER NOT NULL REFERENCES instances (id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    last_status INTEGER,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (instance_id, destination)
) WITHOUT ROWID;
CREATE INDEX deliveries_queue ON deliveries (destination, state, instance_id);
CREATE INDEX deliveries_due ON deliveries (destination, next_attempt_at) WHERE state = 'pending';
CREATE TABLE attempts (
    instance_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    status INTEGER,
    detail TEXT NOT NULL
);
CREATE INDEX attempts_instance ON attempts (instance_id);
"""

_INSTANCE_COLUMNS = (
    "id, sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae, called_ae, source_ip, size,"
    " dataset_offset, path, received_at"
)


@dataclass(frozen=True, slots=True)
class NewInstance:
    """An object file already renamed into ``objects/``, about to get its journal row."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    source_ip: str
    size: int
    dataset_offset: int
    path: str
    received_at: float
    destinations: tuple[str, ...]
    matched_rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Inserted:
    """What ``insert_batch`` did with one ``NewInstance``. ``stored=False``: an ignored duplicate
    whose new file must be deleted; the other fields then describe the instance that was kept."""

    id: int
    path: str
    size: int
    dataset_offset: int
    held: bool
    duplicate: bool
    stored: bool


@dataclass(frozen=True, slots=True)
class FileRef:
    """An object file the journal no longer needs (delete it after the transaction committed)."""

    id: int
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """One pending delivery of one stored instance to one destination."""

    instance_id: int
    destination: str
    path: Path
    size: int
    dataset_offset: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    attempts: int
    received_at: float


@dataclass(frozen=True, slots=True)
class DestinationCounts:
    pending: int
    dead: int
    oldest_received_at: float | None  # of the pending deliveries; None when nothing is pending


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """One line of ``queue list``. Identifiers and delivery state only: no patient data."""

    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    calling_ae: str
    destination: str | None  # None for a held instance
    state: str
    attempts: int
    last_status: int | None
    last_error: str | None
    received_at: float
    next_attempt_at: float | None


@dataclass(frozen=True, slots=True)
class HeldItem:
    """A stored instance that no rule routed; enough to re-read its header and route it again."""

    id: int
    path: Path
    size: int
    dataset_offset: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    source_ip: str
    received_at: float


@dataclass(frozen=True, slots=True)
class ExpectedFile:
    """A journal row that says its object file exists."""

    id: int
    path: str
    state: str
    sop_instance_uid: str


class Journal:
    """The SQL of the spool. Not thread-safe: one thread creates it, opens it and calls it."""

    def __init__(self, db_path: Path, root: Path, *, retention_seconds: float = 0.0) -> None:
        self._db_path = db_path
        self._root = root
        self._retention = retention_seconds
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def open(self, *, create: bool) -> None:
        if not create and not self._db_path.exists():
            raise FileNotFoundError(self._db_path)
        conn = sqlite3.connect(self._db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn = conn
            self._ensure_schema(create=create)
        except BaseException:
            self._conn = None
            conn.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the journal is not open")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _ensure_schema(self, *, create: bool) -> None:
        with self._write() as db:
            exists = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            if exists is None:
                if not create:
                    raise sqlite3.DatabaseError(f"{self._db_path} holds no spool journal")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return
            (version,) = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if version != SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"{self._db_path} has journal schema version {version}; this gateway reads "
                    f"version {SCHEMA_VERSION} (run the matching gateway version)"
                )

    # -- recovery --------------------------------------------------------------------------

    def max_id(self) -> int:
        """The highest instance id ever used (AUTOINCREMENT keeps it after rows are pruned)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'instances'").fetchone()
        (top,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM instances").fetchone()
        return max(int(top), int(row[0]) if row else 0)

    def stored_bytes(self) -> int:
        (total,) = self._db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM instances WHERE has_file = 1"
        ).fetchone()
        return int(total)

    def expected_files(self) -> list[ExpectedFile]:
        rows = self._db.execute(
            "SELECT id, path, state, sop_instance_uid FROM instances WHERE has_file = 1"
        )
        return [ExpectedFile(*row) for row in rows]

    def mark_missing(self, missing: Sequence[ExpectedFile], now: float) -> int:
        """Rows whose file is gone: undelivered ones become ``lost`` (deliveries dead). Returns how
        many undelivered instances were lost."""
        lost = 0
        with self._write() as db:
            for item in missing:
                if item.state in ("routed", "held"):
                    lost += 1
                    db.execute(
                        "UPDATE instances SET state = 'lost', has_file = 0, expires_at = NULL"
                        " WHERE id = ?",
                        (item.id,),
                    )
                    db.execute(
                        "UPDATE deliveries SET state = 'dead', last_error = ?, next_attempt_at = NULL,"
                        " updated_at = ? WHERE instance_id = ? AND state = 'pending'",
                        (LOST_ERROR, now, item.id),
                    )
                else:
                    db.execute(
                        "UPDATE instances SET has_file = 0, expires_at = NULL WHERE id = ?",
                        (item.id,),
                    )
        return lost

    def pending_count(self) -> int:
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE state = 'pending'"
        ).fetchone()
        return int(count)

    # -- ingest ----------------------------------------------------------------------------

    def insert_batch(
        self, items: Sequence[NewInstance], policy: Literal["forward", "ignore"]
    ) -> list[Inserted]:
        """One transaction for every queued commit (group commit)."""
        with self._write() as db:
            return [self._insert(db, item, policy) for item in items]

    def _insert(
        self, db: sqlite3.Connection, item: NewInstance, policy: Literal["forward", "ignore"]
    ) -> Inserted:
        first = db.execute(
            "SELECT id, path, size, dataset_offset, state FROM instances"
            " WHERE sop_instance_uid = ? AND state IN ('routed', 'held') ORDER BY id LIMIT 1",
            (item.sop_instance_uid,),
        ).fetchone()
        if first is not None and policy == "ignore":
            return Inserted(first[0], first[1], first[2], first[3], first[4] == "held", True, False)
        state = "routed" if item.destinations else "held"
        db.execute(
            "INSERT INTO instances (id, sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae,"
            " called_ae, source_ip, size, dataset_offset, path, received_at, state, duplicate,"
            " matched_rules) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                item.id,
                item.sop_instance_uid,
                item.sop_class_uid,
                item.transfer_syntax,
                item.calling_ae,
                item.called_ae,
                item.source_ip,
                item.size,
                item.dataset_offset,
                item.path,
                item.received_at,
                state,
                int(first is not None),
                json.dumps(list(item.matched_rules)),
            ),
        )
        _add_deliveries(db, item.id, item.destinations, item.received_at)
        return Inserted(
            item.id, item.path, item.size, item.dataset_offset, state == "held", first is not None,
            True,
        )

    # -- forwarding ------------------------------------------------------------------------

    def pending(self, destination: str, after_id: int, limit: int, now: float) -> list[Delivery]:
        rows = self._db.execute(
            "SELECT d.instance_id, d.destination, i.path, i.size, i.dataset_offset, i.sop_class_uid,"
            " i.sop_instance_uid, i.transfer_syntax, d.attempts, i.received_at"
            " FROM deliveries d JOIN instances i ON i.id = d.instance_id"
            " WHERE d.destination = ? AND d.state = 'pending' AND d.instance_id > ?"
            " AND d.next_attempt_at <= ? ORDER BY d.instance_id LIMIT ?",
            (destination, after_id, now, limit),
        )
        return [
            Delivery(r[0], r[1], self._root / r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])
            for r in rows
        ]

    def next_due(self, destination: str) -> float | None:
        (due,) = self._db.execute(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE destination = ? AND state = 'pending'",
            (destination,),
        ).fetchone()
        return None if due is None else float(due)

    def record_attempt(
        self,
        instance_id: int,
        destination: str,
        outcome: str,
        status: int | None,
        detail: str,
        *,
        next_attempt_at: float | None,
        dead: bool,
        now: float,
    ) -> list[FileRef]:
        """Log the attempt and move the delivery on. Returns the files to delete (if any)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {sorted(OUTCOMES)}")
        with self._write() as db:
            db.execute(
                "INSERT INTO attempts (instance_id, destination, at, outcome, status, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (instance_id, destination, now, outcome, status, detail),
            )
            row = db.execute(
                "SELECT state FROM deliveries WHERE instance_id = ? AND destination = ?",
                (instance_id, destination),
            ).fetchone()
            if row is None or row[0] != "pending":
                return []  # purged or already settled meanwhile (e.g. by the queue CLI)
            key = (instance_id, destination)
            if outcome in ("delivered", "warning"):
                error = detail if outcome == "warning" else None
                _settle(db, key, "done", status=status, error=error, due=None, now=now)
                return self._finish_if_done(db, instance_id, now, keep=self._retention > 0)
            if dead:
                _settle(db, key, "dead", status=status, error=detail, due=None, now=now)
            else:
                due = now if next_attempt_at is None else next_attempt_at
                _settle(db, key, "pending", status=status, error=detail, due=due, now=now)
            return []

    def _finish_if_done(
        self, db: sqlite3.Connection, instance_id: int, now: float, *, keep: bool
    ) -> list[FileRef]:
        (open_count,) = db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE instance_id = ? AND state != 'done'",
            (instance_id,),
        ).fetchone()
        if open_count:
            return []
        row = db.execute(
            "SELECT path, size, has_file, state FROM instances WHERE id = ?", (instance_id,)
        ).fetchone()
        if row is None or row[3] in ("done", "held"):
            return []
        state = "lost" if row[3] == "lost" else "done"
        if keep and row[2]:
            db.execute(
                "UPDATE instances SET state = ?, done_at = ?, expires_at = ? WHERE id = ?",
                (state, now, now + self._retention, instance_id),
            )
            return []
        db.execute(
            "UPDATE instances SET state = ?, done_at = ?, has_file = 0, expires_at = NULL"
            " WHERE id = ?",
            (state, now, instance_id),
        )
        return [FileRef(instance_id, row[0], row[1])] if row[2] else []

    # -- operator views and actions -----------------------------------------------------------

    def counts(self) -> dict[str, DestinationCounts]:
        rows = self._db.execute(
            "SELECT destination, state, COUNT(*), MIN(instance_id) FROM deliveries"
            " WHERE state IN ('pending', 'dead') GROUP BY destination, state"
        ).fetchall()
        pending: dict[str, tuple[int, int]] = {}
        dead: dict[str, int] = {}
        for destination, state, count, first in rows:
            if state == "pending":
                pending[destination] = (count, first)
            else:
                dead[destination] = count
        result: dict[str, DestinationCounts] = {}
        for destination in sorted(pending.keys() | dead.keys()):
            count, first = pending.get(destination, (0, 0))
            oldest = None
            if count:
                (oldest,) = self._db.execute(
                    "SELECT received_at FROM instances WHERE id = ?", (first,)
                ).fetchone()
            result[destination] = DestinationCounts(count, dead.get(destination, 0), oldest)
        return result

    def held_count(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM instances WHERE state = 'held'").fetchone()
        return int(count)

    def list_items(
        self, *, destination: str | None, dead: bool, held: bool, limit: int
    ) -> list[ItemInfo]:
        if held and dead:
            raise ValueError("list either held instances or dead deliveries, not both")
        if held:
            rows = self._db.execute(
                "SELECT id, sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae, NULL,"
                " 'held', 0, NULL, NULL, received_at, NULL FROM instances WHERE state = 'held'"
                " ORDER BY id LIMIT ?",
                (limit,),
            )
            return [ItemInfo(*row) for row in rows]
        rows = self._db.execute(
            "SELECT i.id, i.sop_instance_uid, i.sop_class_uid, i.transfer_syntax, i.calling_ae,"
            " d.destination, d.state, d.attempts, d.last_status, d.last_error, i.received_at,"
            " d.next_attempt_at FROM deliveries d JOIN instances i ON i.id = d.instance_id"
            " WHERE d.state = ? AND (? IS NULL OR d.destination = ?)"
            " ORDER BY d.instance_id, d.destination LIMIT ?",
            ("dead" if dead else "pending", destination, destination, limit),
        )
        return [ItemInfo(*row) for row in rows]

    def retry_dead(self, destination: str | None, now: float) -> int:
        """Dead deliveries whose file still exists go back to pending, due now, attempts reset."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                " updated_at = ? WHERE state = 'dead' AND (? IS NULL OR destination = ?)"
                " AND instance_id IN (SELECT id FROM instances WHERE has_file = 1)",
                (now, now, destination, destination),
            )
            return cursor.rowcount

    def purge_dead(self, destination: str | None, now: float) -> tuple[int, list[FileRef]]:
        """Delete dead deliveries; instances nothing else needs are finished (file deleted now)."""
        with self._write() as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT DISTINCT instance_id FROM deliveries WHERE state = 'dead'"
                    " AND (? IS NULL OR destination = ?)",
                    (destination, destination),
                )
            ]
            cursor = db.execute(
                "DELETE FROM deliveries WHERE state = 'dead' AND (? IS NULL OR destination = ?)",
                (destination, destination),
            )
            refs: list[FileRef] = []
            for instance_id in ids:
                refs += self._finish_if_done(db, instance_id, now, keep=False)
            return cursor.rowcount, refs

    def held_items(self, limit: int, after_id: int) -> list[HeldItem]:
        rows = self._db.execute(
            "SELECT id, path, size, dataset_offset, sop_class_uid, sop_instance_uid,"
            " transfer_syntax, calling_ae, called_ae, source_ip, received_at FROM instances"
            " WHERE state = 'held' AND id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [HeldItem(r[0], self._root / r[1], *r[2:]) for r in rows]

    def reroute(
        self, instance_id: int, destinations: Sequence[str], matched_rules: Sequence[str], now: float
    ) -> bool:
        """Route a held instance. Does nothing (returns False) when it is no longer held or no
        destination is given."""
        with self._write() as db:
            row = db.execute("SELECT state FROM instances WHERE id = ?", (instance_id,)).fetchone()
            if row is None or row[0] != "held" or not destinations:
                return False
            db.execute(
                "UPDATE instances SET state = 'routed', matched_rules = ? WHERE id = ?",
                (json.dumps(list(matched_rules)), instance_id),
            )
            _add_deliveries(db, instance_id, destinations, now)
            return True

    # -- housekeeping ------------------------------------------------------------------------

    def expire_files(self, now: float, limit: int) -> list[FileRef]:
        """Delivered instances whose retention has run out: their files may go now."""
        with self._write() as db:
            rows = db.execute(
                "SELECT id, path, size FROM instances"
                " WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE instances SET has_file = 0, expires_at = NULL WHERE id = ?",
                [(row[0],) for row in rows],
            )
        return [FileRef(*row) for row in rows]

    def prune(self, finished_before: float, limit: int) -> int:
        """Forget finished instances (no file left) older than ``finished_before``."""
        with self._write() as db:
            ids = [
                (row[0],)
                for row in db.execute(
                    "SELECT id FROM instances WHERE done_at IS NOT NULL AND done_at <= ?"
                    " AND has_file = 0 LIMIT ?",
                    (finished_before, limit),
                )
            ]
            db.executemany("DELETE FROM attempts WHERE instance_id = ?", ids)
            db.executemany("DELETE FROM deliveries WHERE instance_id = ?", ids)
            db.executemany("DELETE FROM instances WHERE id = ?", ids)
        return len(ids)


def _add_deliveries(
    db: sqlite3.Connection, instance_id: int, destinations: Sequence[str], now: float
) -> None:
    db.executemany(
        "INSERT OR IGNORE INTO deliveries (instance_id, destination, state, attempts,"
        " next_attempt_at, updated_at) VALUES (?, ?, 'pending', 0, ?, ?)",
        [(instance_id, destination, now, now) for destination in destinations],
    )


def _settle(
    db: sqlite3.Connection,
    key: tuple[int, str],
    state: str,
    *,
    status: int | None,
    error: str | None,
    due: float | None,
    now: float,
) -> None:
    db.execute(
        "UPDATE deliveries SET state = ?, attempts = attempts + 1, last_status = ?, last_error = ?,"
        " next_attempt_at = ?, updated_at = ? WHERE instance_id = ? AND destination = ?",
        (state, status, error, due, now, *key),
    )
