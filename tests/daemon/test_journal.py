"""The SQLite task journal."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import trio

from daemon.tasks.journal import Journal, KeyRecord, TaskRecord


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
