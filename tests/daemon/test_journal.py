"""The SQLite task journal."""

from __future__ import annotations

from pathlib import Path

import trio

from daemon.journal import Journal, KeyRecord, TaskRecord


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
        message={"event": "progress", "version": version, "payload": {"taskId": task_id}},
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
