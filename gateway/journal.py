"""The spool's SQLite journal: which objects are stored, and where each one still has to go.

Every method here is synchronous SQL. The spool calls it from two threads (its journal thread and its
durability thread, see ``gateway.spool``), never at the same time: the spool holds one lock around every
call. The journal never touches object files, it only says which ones to delete. Times are passed in by
the caller (seconds since the epoch), so the SQL is deterministic under test.

Tables: ``instances`` (one row per stored object, ``id`` is also its file name), ``deliveries`` (one row
per instance and destination), ``attempts`` (an append-only log of forward attempts), ``schema_version``.
Write transactions are ``BEGIN IMMEDIATE`` so that another process (the ``queue`` CLI) waits on the
busy timeout instead of failing on a lock upgrade.

Durability: the journal runs in WAL mode. Transactions are ``synchronous=FULL`` (the WAL is fsync'd
before ``COMMIT`` returns) except forward-attempt records (``record_attempts``), which are
``synchronous=NORMAL``: committed, visible, safe from ``kill -9``, but durable against a power cut only
after the next FULL commit fsyncs the WAL. An attempt never releases a file by itself: a finished
instance keeps ``has_file = 1`` with ``expires_at`` set, and only ``expire_files`` (a FULL transaction)
hands its file over for deletion. See docs/spool.md ("Durability of journal transactions").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.retry import DONE_OUTCOMES

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 5000
LOST_ERROR = "object file missing when the spool was opened (lost)"
EXPIRE_CHUNK = 500  # files one ingest transaction releases at most (the rest: the next one)

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


class Delivery:
    """One pending delivery of one stored instance to one destination.

    The journal reads these by the thousand, so a row stays cheap: it keeps the file's path as the
    journal stores it (relative to the spool) and builds the ``Path`` on first use of ``path``.
    Treat it as read-only (it was a frozen dataclass; it is compared and hashed by value)."""

    __slots__ = ("_path", "_root", "attempts", "dataset_offset", "destination", "instance_id",
                 "received_at", "size", "sop_class_uid", "sop_instance_uid", "transfer_syntax")

    def __init__(  # noqa: PLR0917 - positional, in the order of the dataclass it replaced
        self,
        instance_id: int,
        destination: str,
        path: Path | str,
        size: int,
        dataset_offset: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        attempts: int,
        received_at: float,
        *,
        root: Path | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.destination = destination
        self._path = path  # a Path, or a str relative to ``root`` until ``path`` is first read
        self._root = root
        self.size = size
        self.dataset_offset = dataset_offset
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.attempts = attempts
        self.received_at = received_at

    @property
    def path(self) -> Path:
        """The object file (absolute when the journal made this delivery)."""
        path = self._path
        if isinstance(path, str):
            path = Path(path) if self._root is None else self._root / path
            self._path = path
        return path

    def _key(self) -> tuple[Any, ...]:
        return (self.instance_id, self.destination, self.path, self.size, self.dataset_offset,
                self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax, self.attempts,
                self.received_at)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Delivery):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Delivery(instance_id={self.instance_id!r}, destination={self.destination!r}, "
                f"path={self.path!r}, attempts={self.attempts!r})")


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
class AttemptRecord:
    """One forward attempt, as ``record_attempts`` writes it (``at``: when it was recorded)."""

    instance_id: int
    destination: str
    outcome: str
    status: int | None
    detail: str
    next_attempt_at: float | None
    dead: bool
    at: float


@dataclass(frozen=True, slots=True)
class ExpectedFile:
    """A journal row that says its object file exists."""

    id: int
    path: str
    state: str
    sop_instance_uid: str


class Journal:
    """The SQL of the spool. Not thread-safe: callers serialise every call (the spool holds a lock),
    and may make them from more than one thread."""

    def __init__(self, db_path: Path, root: Path, *, retention_seconds: float = 0.0) -> None:
        self._db_path = db_path
        self._root = root
        self._retention = retention_seconds
        self._conn: sqlite3.Connection | None = None
        self._durable = True  # the connection's current PRAGMA synchronous: FULL (True) or NORMAL

    # -- lifecycle -------------------------------------------------------------------------

    def open(self, *, create: bool) -> None:
        if not create and not self._db_path.exists():
            raise FileNotFoundError(self._db_path)
        conn = sqlite3.connect(self._db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)  # callers serialise; see the class doc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn = conn
            self._durable = True
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
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``durable=False`` commits it with ``synchronous=NORMAL``."""
        conn = self._db
        if durable != self._durable:
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
            self._durable = durable
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

    def expected_files(self) -> Iterator[ExpectedFile]:
        """Every row that says its file exists, one at a time (never the whole table in memory).
        Consume it before the next call on this journal."""
        for row in self._db.execute(
            "SELECT id, path, state, sop_instance_uid FROM instances WHERE has_file = 1"
        ):
            yield ExpectedFile(*row)

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
        self,
        items: Sequence[NewInstance],
        policy: Literal["forward", "ignore"],
        *,
        expire_before: float | None = None,
    ) -> tuple[list[Inserted], list[FileRef]]:
        """One durable transaction for every queued commit (group commit). With ``expire_before``
        it also releases the files of finished instances that expired by then (as
        ``expire_files``), so the WAL fsync this transaction pays anyway covers them too."""
        with self._write() as db:
            inserted = [self._insert(db, item, policy) for item in items]
            released = [] if expire_before is None else _expire(db, expire_before, EXPIRE_CHUNK)
            return inserted, released

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
        root = self._root
        return [
            Delivery(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], root=root)
            for r in self._db.execute(
                "SELECT d.instance_id, d.destination, i.path, i.size, i.dataset_offset,"
                " i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax, d.attempts, i.received_at"
                " FROM deliveries d JOIN instances i ON i.id = d.instance_id"
                " WHERE d.destination = ? AND d.state = 'pending' AND d.instance_id > ?"
                " AND d.next_attempt_at <= ? ORDER BY d.instance_id LIMIT ?",
                (destination, after_id, now, limit),
            )
        ]

    def next_due(self, destination: str) -> float | None:
        (due,) = self._db.execute(
            "SELECT MIN(next_attempt_at) FROM deliveries WHERE destination = ? AND state = 'pending'",
            (destination,),
        ).fetchone()
        return None if due is None else float(due)

    def record_attempts(self, records: Sequence[AttemptRecord]) -> int:
        """Log the attempts and move their deliveries on, in one ``synchronous=NORMAL`` transaction.

        An instance whose last delivery is now done becomes ``done`` but keeps its file
        (``has_file = 1``, ``expires_at`` = now + retention): ``expire_files`` releases it later, in a
        durable transaction. Returns how many files became due for release at once (retention 0).
        Every ``outcome`` is one of ``OUTCOMES`` (``Spool.record_attempt`` checks it)."""
        with self._write(durable=False) as db:
            return sum(self._record(db, record) for record in records)

    def _record(self, db: sqlite3.Connection, record: AttemptRecord) -> int:
        instance_id, destination, outcome, now = (
            record.instance_id, record.destination, record.outcome, record.at)
        db.execute(
            "INSERT INTO attempts (instance_id, destination, at, outcome, status, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (instance_id, destination, now, outcome, record.status, record.detail),
        )
        row = db.execute(
            "SELECT state FROM deliveries WHERE instance_id = ? AND destination = ?",
            (instance_id, destination),
        ).fetchone()
        if row is None or row[0] != "pending":
            return 0  # purged or already settled meanwhile (e.g. by the queue CLI)
        key = (instance_id, destination)
        if outcome in DONE_OUTCOMES:
            error = record.detail if outcome == "warning" else None
            _settle(db, key, "done", status=record.status, error=error, due=None, now=now)
            kept = self._finish_if_done(db, instance_id, now, keep=True)
            return int(kept is not None and self._retention <= 0)
        if record.dead:
            _settle(db, key, "dead", status=record.status, error=record.detail, due=None, now=now)
        else:
            due = now if record.next_attempt_at is None else record.next_attempt_at
            _settle(db, key, "pending", status=record.status, error=record.detail, due=due, now=now)
        return 0

    def _finish_if_done(
        self, db: sqlite3.Connection, instance_id: int, now: float, *, keep: bool
    ) -> FileRef | None:
        """When every delivery of the instance is done, finish it and return its file (if it has
        one). ``keep``: the file stays until ``expire_files`` releases it (after ``retention``,
        which may be 0); otherwise it is released by this transaction: delete it after the commit."""
        (open_count,) = db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE instance_id = ? AND state != 'done'",
            (instance_id,),
        ).fetchone()
        if open_count:
            return None
        row = db.execute(
            "SELECT path, size, has_file, state FROM instances WHERE id = ?", (instance_id,)
        ).fetchone()
        if row is None or row[3] in ("done", "held"):
            return None
        state = "lost" if row[3] == "lost" else "done"
        if keep and row[2]:
            db.execute(
                "UPDATE instances SET state = ?, done_at = ?, expires_at = ? WHERE id = ?",
                (state, now, now + self._retention, instance_id),
            )
        else:
            db.execute(
                "UPDATE instances SET state = ?, done_at = ?, has_file = 0, expires_at = NULL"
                " WHERE id = ?",
                (state, now, instance_id),
            )
        return FileRef(instance_id, row[0], row[1]) if row[2] else None

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
            finished = (self._finish_if_done(db, instance_id, now, keep=False) for instance_id in ids)
            return cursor.rowcount, [ref for ref in finished if ref is not None]

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
        """Finished instances whose retention has run out: their files may go once this durable
        transaction has committed (it also makes every earlier ``record_attempts`` durable)."""
        with self._write() as db:
            return _expire(db, now, limit)

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


def _expire(db: sqlite3.Connection, now: float, limit: int) -> list[FileRef]:
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
