"""The task journal: every task in SQLite, so a restarted daemon picks them up again.

SQLite runs in a worker thread (WAL mode; one connection owned by this
module, in exclusive locking mode: the WAL index lives in our heap instead of
a shared-memory `-shm` file, so a broken `-shm` cannot SIGBUS the process).
Writers never wait: `record()` only remembers the newest row of a task and
wakes the flusher, which writes the pending rows in one transaction.
A task that changes ten times between two flushes costs one write. `flush()`
waits until everything recorded so far is on disk, or raises
`JournalUnavailable` with SQLite's own reason when the write failed (POST
/generate answers 503 then: nothing is accepted that is not journalled).

A task row that cannot be read is moved, once, to `unreadable_tasks` (as it
was, with the reason and when), and the warning says so: it is kept there for
an operator to inspect for `UNREADABLE_KEPT_FOR`, never read again.

The journal also keeps the prompts the daemon gave up on in a ComfyUI that was
away (`abandoned_prompts`: backend URL, prompt id, when), so that a restarted
daemon still removes them there once it is back; each row goes once its prompt
is removed, or after `ABANDONED_KEPT_FOR`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

from protocol import task

log = logging.getLogger(__name__)
_T = TypeVar("_T")

UNREADABLE_TABLE: Final = "unreadable_tasks"
UNREADABLE_KEPT_FOR: Final = 30 * 86400.0  # seconds an unreadable row is kept for inspection
UNREADABLE_KEPT_AT_MOST: Final = 1000  # rows; the oldest go first
ABANDONED_KEPT_FOR: Final = 7 * 86400.0  # seconds a prompt is still removed after a restart
FLUSH_TIMEOUT: Final = 5.0  # seconds a caller of flush() waits before it gives up on the disk
TASK_COLUMNS: Final = (
    "task_id, prompt_id, phase, version, submitted, created_at, finished_at, spec, state, backend"
)

TASKS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    prompt_id   TEXT NOT NULL,
    phase       TEXT NOT NULL,
    version     INTEGER NOT NULL,
    submitted   INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    finished_at REAL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    backend     TEXT,
    client      TEXT
)"""
SCHEMA: Final = f"""{TASKS_TABLE};
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    task_id     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    fingerprint TEXT NOT NULL,
    outcome     TEXT
);
CREATE TABLE IF NOT EXISTS unreadable_tasks (
    task_id     TEXT,
    prompt_id   TEXT,
    phase       TEXT,
    version     INTEGER,
    submitted   INTEGER,
    created_at  REAL,
    finished_at REAL,
    spec        TEXT,
    state       TEXT,
    backend     TEXT,
    reason      TEXT NOT NULL,
    set_aside   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS abandoned_prompts (
    backend      TEXT NOT NULL,
    prompt_id    TEXT NOT NULL,
    abandoned_at REAL NOT NULL,
    PRIMARY KEY (backend, prompt_id)
);
"""


def _migrate(db: sqlite3.Connection, path: Path, now: float) -> None:
    """Bring an older journal's tables up to SCHEMA (before the first read)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    if "backend" not in columns:
        # Written before pools: NULL is "not dispatched yet, or dispatched to the
        # only backend there was"; such a task goes through the queue.
        db.execute("ALTER TABLE tasks ADD COLUMN backend TEXT")
    if "client" not in columns:
        # Written before the per-client limit was kept: such a task counts for no client.
        db.execute("ALTER TABLE tasks ADD COLUMN client TEXT")
    # Journals from before outcomes were kept: NULL, the outcome of such a key is unknown.
    key_columns = {row[1] for row in db.execute("PRAGMA table_info(idempotency)")}
    if "outcome" not in key_columns:
        db.execute("ALTER TABLE idempotency ADD COLUMN outcome TEXT")
    if "message" in columns:
        _migrate_messages_to_state(db, path, now)


def _migrate_messages_to_state(db: sqlite3.Connection, path: Path, now: float) -> None:
    """Journals that kept each task's last published message (`message`) get its
    state's fields (`state`) instead, in one transaction. A row whose message
    cannot be read is set aside with it in its `state` column."""
    rows = db.execute(
        "SELECT task_id, prompt_id, phase, version, submitted, created_at, finished_at,"
        " spec, message, backend FROM tasks"
    ).fetchall()
    set_aside: list[tuple[object, str]] = []
    db.execute("BEGIN")
    try:
        db.execute("ALTER TABLE tasks RENAME TO tasks_before_state")
        db.execute(TASKS_TABLE)
        for row in rows:
            try:
                state = state_json_from_message(
                    spec=json.loads(row[7]),
                    phase=row[2],
                    submitted=bool(row[4]),
                    version=int(row[3]),
                    created_at=float(row[5]),
                    finished_at=None if row[6] is None else float(row[6]),
                    message=json.loads(row[8]),
                )
            except (KeyError, ValueError, TypeError) as exc:
                reason = f"{exc} (its state column holds its older message)"
                _set_aside(db, row, reason, now)
                set_aside.append((row[0], reason))
                continue
            db.execute(
                "INSERT INTO tasks (task_id, prompt_id, phase, version, submitted, created_at,"
                " finished_at, spec, state, backend) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row[:8], json.dumps(state), row[9]),
            )
        db.execute("DROP TABLE tasks_before_state")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    for task_id, reason in set_aside:
        _said_set_aside(path, task_id, reason)


def _set_aside(db: sqlite3.Connection, row: Sequence[Any], reason: str, now: float) -> None:
    """Keep a task row that cannot be read in `unreadable_tasks`, as it was (the
    caller deletes it from `tasks` in the same transaction, and then says so)."""
    db.execute(
        f"INSERT INTO {UNREADABLE_TABLE} ({TASK_COLUMNS}, reason, set_aside)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*row, reason, now),
    )


def _said_set_aside(path: Path, task_id: object, reason: str) -> None:
    """The one warning about an unreadable row, once it is set aside for good."""
    log.warning(
        "moved an unreadable journal row for task %s to the table %s of %s"
        " (kept %d days for inspection, never read again): %s",
        task_id, UNREADABLE_TABLE, path, UNREADABLE_KEPT_FOR // 86400, reason,
        extra={"task_id": str(task_id)},
    )  # fmt: skip


def _prune_unreadable(db: sqlite3.Connection, now: float) -> int:
    """Unreadable rows go after UNREADABLE_KEPT_FOR, and beyond the newest
    UNREADABLE_KEPT_AT_MOST; how many went."""
    deleted: int = db.execute(
        f"DELETE FROM {UNREADABLE_TABLE} WHERE set_aside < ?", (now - UNREADABLE_KEPT_FOR,)
    ).rowcount
    deleted += db.execute(
        f"DELETE FROM {UNREADABLE_TABLE} WHERE rowid NOT IN"
        f" (SELECT rowid FROM {UNREADABLE_TABLE} ORDER BY set_aside DESC, rowid DESC LIMIT ?)",
        (UNREADABLE_KEPT_AT_MOST,),
    ).rowcount
    return deleted


def state_json_from_message(
    *,
    spec: Mapping[str, Any],
    phase: str,
    submitted: bool,
    version: int,
    created_at: float,
    finished_at: float | None,
    message: Mapping[str, Any],
) -> dict[str, Any]:
    """The `state` of a record kept in the older format, from its last message
    (the journal's migration and the shared store's older records use it)."""
    state = task.state_from_message(
        task.spec_from_json(spec),
        stage=task.stage_of(task.Phase(phase), submitted=submitted),
        version=version,
        created_at=created_at,
        finished_at=finished_at,
        message=message,
    )
    return task.state_to_json(state)


class JournalUnavailable(Exception):
    """The journal cannot write (disk full, read-only, I/O error); the message says why."""


class JournalUnusable(OSError):
    """The journal cannot be opened or read at start-up (not a database, damaged, not
    openable). An OSError: the daemon stops with one line naming the file, as for a
    data directory it cannot make, not with SQLite's traceback."""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One task as the journal keeps it."""

    task_id: str
    prompt_id: str
    phase: str
    version: int
    submitted: bool
    created_at: float
    finished_at: float | None
    spec: Mapping[str, Any] = field(hash=False)  # protocol.task.spec_to_json
    state: Mapping[str, Any] = field(hash=False)  # protocol.task.state_to_json
    backend: str | None = None  # the backend the task was dispatched to (its URL)
    # The key max_queued_per_client counts an unfinished task by (daemon/api/clients.py).
    client: str | None = None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What an Idempotency-Key was used for."""

    task_id: str
    created_at: float
    fingerprint: str  # a hash of the request body: the same key must mean the same request
    # How its task ended (the final snapshot's payload), once it has: a retry after the
    # task was forgotten, even across a restart, gets this instead of a taskId that 404s.
    outcome: Mapping[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True, slots=True)
class AbandonedPrompt:
    """A prompt to remove from a ComfyUI once it is connected (BackendPool.abandon)."""

    backend: str  # the backend's URL
    prompt_id: str
    abandoned_at: float  # wall clock


@dataclass
class _Changes:
    """What record() and its kin asked for since the last write: one transaction."""

    tasks: dict[str, TaskRecord | None] = field(default_factory=dict)  # None: delete
    keys: dict[str, KeyRecord | None] = field(default_factory=dict)  # None: delete
    # (backend, prompt id) -> when it was abandoned; None: removed there, delete.
    abandoned: dict[tuple[str, str], float | None] = field(default_factory=dict)
    aside: dict[str, str] = field(default_factory=dict)  # task id -> why its row is unusable

    def __bool__(self) -> bool:
        return bool(self.tasks or self.keys or self.abandoned or self.aside)

    def under(self, newer: _Changes) -> _Changes:
        """These changes with `newer` ones on top (a failed write put back)."""
        return _Changes(
            {**self.tasks, **newer.tasks},
            {**self.keys, **newer.keys},
            {**self.abandoned, **newer.abandoned},
            {**self.aside, **newer.aside},
        )


class Journal:
    def __init__(self, path: Path, *, wall_clock: Callable[[], float] = time.time) -> None:
        """`wall_clock`: when an unreadable row is set aside or a prompt abandoned (and
        how old those kept are)."""
        self.path = path
        self.wall_clock = wall_clock
        self._db: sqlite3.Connection | None = None
        self._pending = _Changes()
        self._wakeup = trio.Event()
        # Every record() gets a sequence number; flush() waits for its own.
        self._recorded = 0
        self._written = 0
        self._batch_written = trio.Event()
        self._lock = trio.Lock()  # one thread at a time uses the connection
        # The newest failed write: (the last record() it covered, SQLite's reason).
        self._failure: tuple[int, str] | None = None
        self._closed = False
        self.writes = 0
        self.epoch = 0  # how many times the daemon has started on this journal

    # -- setup and reads (at start-up)

    async def open(self) -> None:
        await self._at_start(self._open_sync)

    async def _at_start(self, read: Callable[[], _T]) -> _T:
        """`read` in the worker thread; SQLite's refusal as JournalUnusable."""
        try:
            return await trio.to_thread.run_sync(read)
        except sqlite3.Error as exc:
            raise JournalUnusable(
                f"cannot use the task journal {self.path}: {exc} (if it is damaged, move it"
                " aside: the daemon then starts with an empty journal)"
            ) from exc

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        # Before WAL: with an exclusive lock SQLite keeps the WAL index in memory (no -shm).
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
        db.executescript(SCHEMA)
        _migrate(db, self.path, self.wall_clock())
        # A new epoch per start, written before anything is served: snapshot ids
        # of restored tasks start above everything an earlier run can have sent.
        db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('epoch', 0)")
        db.execute("UPDATE meta SET value = value + 1 WHERE name = 'epoch'")
        self.epoch = int(db.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()[0])
        self._db = db

    async def load(self) -> list[TaskRecord]:
        async with self._lock:
            return await self._at_start(self._load_sync)

    def _load_sync(self) -> list[TaskRecord]:
        assert self._db is not None
        db = self._db
        rows = db.execute(
            f"SELECT rowid, {TASK_COLUMNS}, client FROM tasks ORDER BY created_at"
        ).fetchall()
        records = []
        unreadable = []
        for rowid, *row, client in rows:
            try:
                records.append(
                    TaskRecord(
                        task_id=row[0],
                        prompt_id=row[1],
                        phase=row[2],
                        version=int(row[3]),
                        submitted=bool(row[4]),
                        created_at=float(row[5]),
                        finished_at=None if row[6] is None else float(row[6]),
                        spec=json.loads(row[7]),
                        state=json.loads(row[8]),
                        backend=row[9],
                        client=client,
                    )
                )
            except (ValueError, TypeError) as exc:
                unreadable.append((rowid, row, str(exc)))
        self._set_aside_sync(unreadable)
        return records

    def _set_aside_sync(self, unreadable: list[tuple[int, Sequence[Any], str]]) -> None:
        """Move unreadable rows to UNREADABLE_TABLE (and drop those kept long enough)."""
        assert self._db is not None
        db = self._db
        now = self.wall_clock()
        db.execute("BEGIN")
        try:
            for rowid, row, reason in unreadable:
                _set_aside(db, row, reason, now)
                db.execute("DELETE FROM tasks WHERE rowid = ?", (rowid,))
            pruned = _prune_unreadable(db, now)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            for _, row, reason in unreadable:
                log.warning(
                    "skipping an unreadable journal row for task %s: %s (could not move it"
                    " to the table %s: %s; it is read again at the next start)",
                    row[0], reason, UNREADABLE_TABLE, exc, extra={"task_id": str(row[0])},
                )  # fmt: skip
            return
        for _, row, reason in unreadable:
            _said_set_aside(self.path, row[0], reason)
        if pruned:
            log.info(
                "deleted %d unreadable journal row(s) from the table %s of %s: kept %d days"
                " (at most %d are kept)",
                pruned, UNREADABLE_TABLE, self.path, UNREADABLE_KEPT_FOR // 86400,
                UNREADABLE_KEPT_AT_MOST,
            )  # fmt: skip

    async def load_idempotency_keys(self, newer_than: float) -> dict[str, KeyRecord]:
        """Keys used since `newer_than` (older ones are deleted)."""
        async with self._lock:
            return await self._at_start(partial(self._load_keys_sync, newer_than))

    def _load_keys_sync(self, newer_than: float) -> dict[str, KeyRecord]:
        assert self._db is not None
        self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (newer_than,))
        rows = self._db.execute(
            "SELECT key, task_id, created_at, fingerprint, outcome FROM idempotency"
        ).fetchall()
        keys: dict[str, KeyRecord] = {}
        for key, task_id, created_at, print_, outcome in rows:
            try:
                ended = None if outcome is None else json.loads(outcome)
            except ValueError as exc:
                log.warning("an unreadable outcome for Idempotency-Key %r: %s", key, exc)
                ended = None
            keys[key] = KeyRecord(task_id, float(created_at), print_, ended)
        return keys

    async def load_abandoned_prompts(self) -> list[AbandonedPrompt]:
        """The prompts still to remove, oldest first; those abandoned more than
        ABANDONED_KEPT_FOR ago are deleted (and logged) instead."""
        async with self._lock:
            return await self._at_start(self._load_abandoned_sync)

    def _load_abandoned_sync(self) -> list[AbandonedPrompt]:
        assert self._db is not None
        db = self._db
        too_old = self.wall_clock() - ABANDONED_KEPT_FOR
        given_up = db.execute(
            "SELECT backend, prompt_id FROM abandoned_prompts WHERE abandoned_at < ?", (too_old,)
        ).fetchall()
        db.execute("DELETE FROM abandoned_prompts WHERE abandoned_at < ?", (too_old,))
        for backend, prompt_id in given_up:
            log.warning(
                "no longer removing prompt %s from %s: abandoned there more than %d days ago",
                prompt_id, backend, ABANDONED_KEPT_FOR // 86400,
                extra={"backend": backend, "prompt_id": prompt_id},
            )  # fmt: skip
        rows = db.execute(
            "SELECT backend, prompt_id, abandoned_at FROM abandoned_prompts"
            " ORDER BY abandoned_at, rowid"
        ).fetchall()
        return [AbandonedPrompt(str(b), str(p), float(at)) for b, p, at in rows]

    # -- writes (from the event loop, never blocking)

    def record(self, record: TaskRecord) -> None:
        self._pending.tasks[record.task_id] = record
        self._wake()

    def forget(self, task_id: str) -> None:
        self._pending.tasks[task_id] = None
        self._wake()

    def set_aside(self, task_id: str, reason: str) -> None:
        """Move the task's row to UNREADABLE_TABLE: it was read, but cannot be restored
        (the caller warns, once; the row is not read again)."""
        self._pending.aside[task_id] = reason
        self._wake()

    def record_idempotency_key(self, key: str, record: KeyRecord) -> None:
        self._pending.keys[key] = record
        self._wake()

    def forget_idempotency_key(self, key: str) -> None:
        """The key is free again: its task was refused (never accepted), or the key is
        older than its 24 hours."""
        self._pending.keys[key] = None
        self._wake()

    def record_abandoned(self, backend: str, prompt_id: str) -> None:
        """The daemon gave up on `prompt_id` in `backend` (a URL): remove it there even
        after a restart."""
        self._pending.abandoned[(backend, prompt_id)] = self.wall_clock()
        self._wake()

    def forget_abandoned(self, backend: str, prompt_id: str) -> None:
        """It is removed there (or that backend no longer knows it)."""
        self._pending.abandoned[(backend, prompt_id)] = None
        self._wake()

    def _wake(self) -> None:
        self._recorded += 1
        self._wakeup.set()

    @property
    def failure(self) -> str | None:
        """Why the last write failed, while the journal cannot write; None when healthy."""
        return None if self._failure is None else self._failure[1]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: writes pending rows whenever there are some, until closed."""
        task_status.started()
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self._flush_pending()

    async def _flush_pending(self) -> None:
        while self._pending and not self._closed:
            async with self._lock:
                if self._db is None:
                    return  # closed while we waited for the lock
                # Taken only with the lock held: the flusher cancelled while it waited
                # for it (the daemon stopping) leaves them pending, for close_abandoned
                # to write. Taken before, they were lost: a cancel just before a stop
                # came back as a running task.
                changes, self._pending = self._pending, _Changes()
                upto = self._recorded
                try:
                    await trio.to_thread.run_sync(self._write_sync, changes)
                except sqlite3.Error as exc:
                    reason = f"cannot write the journal {self.path}: {exc}"
                    log.error("%s; will retry", reason)
                    self._failure = (upto, reason)
                    self._wake_flushers()
                    # Put back what is not superseded, and retry later.
                    self._pending = changes.under(self._pending)
                    await trio.sleep(1.0)
                    continue
            self.writes += 1
            self._written = upto
            self._failure = None
            self._wake_flushers()

    def _wake_flushers(self) -> None:
        self._batch_written.set()
        self._batch_written = trio.Event()

    def _write_sync(self, changes: _Changes) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN")
        try:
            for task_id, record in changes.tasks.items():
                if record is None:
                    db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO tasks (task_id, prompt_id, phase, version, submitted,"
                    " created_at, finished_at, spec, state, backend, client)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.task_id,
                        record.prompt_id,
                        record.phase,
                        record.version,
                        int(record.submitted),
                        record.created_at,
                        record.finished_at,
                        json.dumps(record.spec),
                        json.dumps(record.state),
                        record.backend,
                        record.client,
                    ),
                )
            for key, k in changes.keys.items():
                if k is None:
                    db.execute("DELETE FROM idempotency WHERE key = ?", (key,))
                    continue
                db.execute(
                    "INSERT OR REPLACE INTO idempotency"
                    " (key, task_id, created_at, fingerprint, outcome) VALUES (?, ?, ?, ?, ?)",
                    (
                        key,
                        k.task_id,
                        k.created_at,
                        k.fingerprint,
                        None if k.outcome is None else json.dumps(k.outcome),
                    ),
                )
            for (backend, prompt_id), at in changes.abandoned.items():
                if at is None:
                    db.execute(
                        "DELETE FROM abandoned_prompts WHERE backend = ? AND prompt_id = ?",
                        (backend, prompt_id),
                    )
                else:
                    db.execute(
                        "INSERT OR IGNORE INTO abandoned_prompts (backend, prompt_id, abandoned_at)"
                        " VALUES (?, ?, ?)",
                        (backend, prompt_id, at),
                    )
            now = self.wall_clock()
            for task_id, reason in changes.aside.items():
                db.execute(
                    f"INSERT INTO {UNREADABLE_TABLE} ({TASK_COLUMNS}, reason, set_aside)"
                    f" SELECT {TASK_COLUMNS}, ?, ? FROM tasks WHERE task_id = ?",
                    (reason, now, task_id),
                )
                db.execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))
            db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full, read-only) may have ended the transaction
            # already; a blind ROLLBACK would replace the real error with
            # "cannot rollback - no transaction is active".
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as exc:
                    log.warning("journal rollback failed too: %s", exc)
            raise

    async def flush(self) -> None:
        """Wait until everything recorded before this call is written.

        Raises JournalUnavailable while the journal cannot write: when the write
        that covered it failed, and also when a write failed that it came too
        late for (its own would be tried only at the retry, a second later,
        and meanwhile its task would run as if accepted). The flusher keeps
        retrying; a later flush may succeed. Later records do not hold us up,
        so a busy journal cannot starve a flush.
        """
        target = self._recorded
        while self._written < target:
            if self._failure is not None:
                raise JournalUnavailable(self._failure[1])
            if self._closed:
                raise JournalUnavailable(f"the journal {self.path} is closed")
            await self._batch_written.wait()

    async def close_abandoned(self) -> None:
        """Close after the daemon was cancelled without `aclose`: write what is pending
        once, directly, then release the file (its lock is exclusive, so a daemon
        started next in the same process could not open it otherwise)."""
        if self._closed:
            return
        self._closed = True
        self._wake_flushers()
        with trio.CancelScope(shield=True):
            async with self._lock:
                if self._db is None:
                    return
                changes, self._pending = self._pending, _Changes()
                if changes:
                    try:
                        await trio.to_thread.run_sync(self._write_sync, changes)
                    except sqlite3.Error as exc:
                        log.error("closing the journal with unwritten changes: %s", exc)
                db, self._db = self._db, None
                await trio.to_thread.run_sync(db.close)

    async def aclose(self) -> None:
        """Write what is pending (5 s at most), then close; later records are dropped.

        Call it once nothing records any more (App.shutdown stops the tasks first).
        """
        with trio.move_on_after(5.0, shield=True):
            try:
                await self.flush()
            except JournalUnavailable as exc:
                log.error("closing the journal with unwritten changes: %s", exc)
        self._closed = True
        self._wakeup.set()  # the flusher sees _closed and returns
        self._wake_flushers()
        with trio.CancelScope(shield=True):
            async with self._lock:  # never close under a write in progress
                if self._db is not None:
                    db, self._db = self._db, None
                    await trio.to_thread.run_sync(db.close)
