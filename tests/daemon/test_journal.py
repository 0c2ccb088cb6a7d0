"""The SQLite task journal."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import trio
import trio.testing

from daemon.tasks.journal import (
    ABANDONED_KEPT_FOR,
    UNREADABLE_KEPT_FOR,
    AbandonedPrompt,
    Journal,
    KeyRecord,
    TaskRecord,
)


def record(task_id: str, version: int, phase: str = "running", *, big: bool = False) -> TaskRecord:
    """`big`: a row that needs new pages (a prompt of 64 KiB)."""
    return TaskRecord(
        task_id=task_id,
        prompt_id=f"p-{task_id}",
        phase=phase,
        version=version,
        submitted=True,
        created_at=1.0,
        finished_at=None if phase == "running" else 2.0,
        spec={
            "taskId": task_id,
            "promptId": f"p-{task_id}",
            "graph": {},
            "prompt": "x" * 65536 if big else "",
        },
        state={"stage": "running", "version": version, "createdAt": 1.0},
    )


async def test_records_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for version in range(10):
            journal.record(record("a", version))
        journal.record(record("b", 1, phase="completed"))
        journal.record(record("c", 1))
        journal.forget("c")
        await journal.flush()
        nursery.cancel_scope.cancel()
    await journal.aclose()

    again = Journal(path)
    await again.open()
    loaded = {r.task_id: r for r in await again.load()}
    assert set(loaded) == {"a", "b"}
    assert loaded["a"].version == 9  # only the newest state of a task is kept
    assert loaded["b"].phase == "completed"
    assert loaded["b"].finished_at == 2.0
    await again.aclose()


async def test_a_record_the_flusher_was_cancelled_before_writing_is_written_at_close(
    tmp_path: Path,
) -> None:
    # The daemon stops (the flusher is cancelled) while the flusher waits for the
    # journal's lock (a load or a close holds it): it had already taken the
    # pending records and dropped them, so a task cancelled just before a stop
    # came back as running after the restart.
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        async with journal._lock:  # held as by another journal operation
            journal.record(record("a", 7, phase="error"))
            await trio.testing.wait_all_tasks_blocked()  # the flusher waits for the lock
            nursery.cancel_scope.cancel()
    await journal.close_abandoned()  # how the App closes a journal after a cancel

    again = Journal(path)
    await again.open()
    loaded = {r.task_id: r for r in await again.load()}
    assert set(loaded) == {"a"}
    assert (loaded["a"].phase, loaded["a"].version) == ("error", 7)
    await again.aclose()


async def test_writes_are_coalesced(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for version in range(100):
            journal.record(record("a", version))
        await journal.flush()
        nursery.cancel_scope.cancel()
    assert journal.writes <= 2
    await journal.aclose()


async def test_idempotency_keys_expire(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.record_idempotency_key("old", KeyRecord("t1", 100.0, "a"))
        journal.record_idempotency_key("new", KeyRecord("t2", 200.0, "b"))
        await journal.flush()
        nursery.cancel_scope.cancel()
    assert await journal.load_idempotency_keys(newer_than=150.0) == {
        "new": KeyRecord("t2", 200.0, "b")
    }
    await journal.aclose()


async def test_a_journal_from_before_pools_is_read_and_gains_the_backend_column(
    tmp_path: Path,
) -> None:

    path = tmp_path / "journal.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, prompt_id TEXT NOT NULL,"
        " phase TEXT NOT NULL, version INTEGER NOT NULL, submitted INTEGER NOT NULL,"
        " created_at REAL NOT NULL, finished_at REAL, spec TEXT NOT NULL, message TEXT NOT NULL);"
        "INSERT INTO tasks VALUES ('old', 'p-old', 'running', 3, 1, 1.0, NULL,"
        ' \'{"taskId": "old", "promptId": "p-old", "graph": {}}\','
        ' \'{"event": "progress", "version": 3, "payload": {}}\');'
    )
    old.commit()
    old.close()
    journal = Journal(path)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        (loaded,) = await journal.load()
        assert (loaded.task_id, loaded.submitted, loaded.backend) == ("old", True, None)
        journal.record(dataclasses.replace(record("new", 1), backend="http://gpu2:8188"))
        await journal.flush()
        nursery.cancel_scope.cancel()
    await journal.aclose()
    reopened = Journal(path)
    await reopened.open()
    backends = {r.task_id: r.backend for r in await reopened.load()}
    assert backends == {"old": None, "new": "http://gpu2:8188"}
    await reopened.aclose()


async def test_a_key_s_outcome_is_kept_and_old_key_tables_gain_the_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE idempotency (key TEXT PRIMARY KEY, task_id TEXT NOT NULL,"
        " created_at REAL NOT NULL, fingerprint TEXT NOT NULL);"
        "INSERT INTO idempotency VALUES ('before', 't0', 100.0, 'f0');"
    )
    old.commit()
    old.close()
    ended = {"taskId": "t1", "status": "completed", "result": {"seed": 5}}
    journal = Journal(path)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.record_idempotency_key("after", KeyRecord("t1", 200.0, "f1", ended))
        await journal.flush()
        nursery.cancel_scope.cancel()
    await journal.aclose()
    reopened = Journal(path)
    await reopened.open()
    assert await reopened.load_idempotency_keys(newer_than=0.0) == {
        "before": KeyRecord("t0", 100.0, "f0", None),
        "after": KeyRecord("t1", 200.0, "f1", ended),
    }
    await reopened.aclose()


async def write_and_close(path: Path, *records: TaskRecord) -> None:
    journal = Journal(path)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for r in records:
            journal.record(r)
        await journal.flush()
        nursery.cancel_scope.cancel()
    await journal.aclose()


async def load_once(path: Path, now: float) -> list[TaskRecord]:
    journal = Journal(path, wall_clock=lambda: now)
    await journal.open()
    try:
        return await journal.load()
    finally:
        await journal.aclose()


def unreadable_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    return [m for m in messages if "unreadable" in m]


async def test_an_unreadable_row_is_set_aside_once_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.sqlite3"
    await write_and_close(path, record("good", 1))
    with closing(sqlite3.connect(path)) as db:
        db.execute(
            "INSERT INTO tasks VALUES ('broken', 'p-broken', 'running', 'three', 1, 1.0,"
            " NULL, '{', '{}', NULL, NULL)"
        )
        db.commit()

    first = await load_once(path, now=1000.0)
    assert [r.task_id for r in first] == ["good"]
    (warning,) = unreadable_warnings(caplog)
    assert "task broken" in warning
    assert f"the table unreadable_tasks of {path}" in warning

    second = await load_once(path, now=2000.0)
    assert second == first
    assert unreadable_warnings(caplog) == []
    # Kept as it was, beside why and when, for an operator to look at.
    with closing(sqlite3.connect(path)) as db:
        kept = db.execute("SELECT task_id, version, spec, set_aside FROM unreadable_tasks")
        assert kept.fetchall() == [("broken", "three", "{", 1000.0)]
        assert db.execute("SELECT task_id FROM tasks").fetchall() == [("good",)]


async def test_unreadable_rows_are_kept_30_days_then_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.sqlite3"
    await write_and_close(path)
    with closing(sqlite3.connect(path)) as db:
        db.execute(
            "INSERT INTO tasks VALUES ('broken', 'p', 'running', 1, 1, 1.0, NULL,"
            " '{', '{}', NULL, NULL)"
        )
        db.commit()
    await load_once(path, now=0.0)
    await load_once(path, now=UNREADABLE_KEPT_FOR - 1)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM unreadable_tasks").fetchone() == (1,)
    caplog.clear()
    caplog.set_level(logging.INFO)
    await load_once(path, now=UNREADABLE_KEPT_FOR + 1)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM unreadable_tasks").fetchone() == (0,)
    assert any(
        "deleted 1 unreadable journal row(s) from the table unreadable_tasks" in r.getMessage()
        for r in caplog.records
    )


async def test_abandoned_prompts_are_kept_until_removed_or_a_week_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.sqlite3"
    now = 1_000_000.0
    journal = Journal(path, wall_clock=lambda: now)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.record_abandoned("http://gpu1:8188", "p-removed")
        journal.record_abandoned("http://gpu1:8188", "p-kept")
        now += 1
        journal.record_abandoned("http://gpu2:8188", "p-old")
        journal.forget_abandoned("http://gpu1:8188", "p-removed")
        await journal.flush()
        nursery.cancel_scope.cancel()
    await journal.aclose()

    now += ABANDONED_KEPT_FOR - 1
    reopened = Journal(path, wall_clock=lambda: now)
    await reopened.open()
    assert await reopened.load_abandoned_prompts() == [
        AbandonedPrompt("http://gpu1:8188", "p-kept", 1_000_000.0),
        AbandonedPrompt("http://gpu2:8188", "p-old", 1_000_001.0),
    ]
    assert unreadable_warnings(caplog) == []
    now += 0.5  # p-kept is more than a week old now, p-old not yet
    assert await reopened.load_abandoned_prompts() == [
        AbandonedPrompt("http://gpu2:8188", "p-old", 1_000_001.0)
    ]
    await reopened.aclose()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "no longer removing prompt p-kept from http://gpu1:8188" in warning
