"""The journal keeps a task's state fields; a finished task's message comes back the same.

Journals (and shared-store records) from before kept the last published message
instead: they are migrated on open, and still restore to that message.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
import trio

from daemon.shared.store import SharedRecord
from daemon.tasks.journal import Journal, TaskRecord
from daemon.tasks.restore import record_of, restored_task
from protocol import comfy, task
from tests.daemon.harness import running_daemon

GRAPH = {
    "1": {"class_type": "KSampler", "inputs": {}},
    "2": {"class_type": "SaveImage", "inputs": {}},
    "3": {"class_type": "PreviewImage", "inputs": {}},
}
NOW = 1_795_632_898.0


def run(task_id: str, events: list[task.TaskEvent]) -> tuple[task.TaskState, task.TaskMessage]:
    """A task fed `events` (at NOW + i): its state and the last message it published."""
    spec = task.TaskSpec(task_id=task_id, prompt_id=f"p-{task_id}", graph=GRAPH, seed=5)
    state = task.new_task(spec, NOW)
    message = task.render(state, NOW)
    for i, event in enumerate(events):
        state, effects = task.apply(state, event, NOW + i + 0.125)
        message = next((e.message for e in effects if isinstance(e, task.Publish)), message)
    return state, message


def completed(task_id: str) -> tuple[task.TaskState, task.TaskMessage]:
    p = f"p-{task_id}"
    return run(
        task_id,
        [
            task.Submitted(1),
            comfy.ExecutionStart(prompt_id=p),
            comfy.Executing(node="1", prompt_id=p),
            comfy.Progress(prompt_id=p, node="1", value=20, max=20),
            comfy.Executing(node="2", prompt_id=p),
            comfy.ExecutionSuccess(prompt_id=p),
            task.OutputsStored(("a_00001_.png", "a_00002_.png")),
        ],
    )


def failed(task_id: str) -> tuple[task.TaskState, task.TaskMessage]:
    p = f"p-{task_id}"
    return run(
        task_id,
        [
            task.Submitted(1),
            comfy.ExecutionStart(prompt_id=p),
            comfy.ExecutionCached(prompt_id=p, nodes=("1",)),
            comfy.ExecutionError(
                prompt_id=p,
                node_id="2",
                node_type="SaveImage",
                exception_message="disk full",
                exception_type="OSError",
            ),
        ],
    )


def queued(task_id: str) -> tuple[task.TaskState, task.TaskMessage]:
    return run(task_id, [task.Submitted(4)])


def restore(record: TaskRecord) -> task.TaskMessage | None:
    restored = restored_task(
        record, NOW + 60, retention=300.0, version_base=1 << 32, first_backend="gpu1"
    )
    assert restored is not None
    return restored.first_message


async def load(path: Path) -> list[TaskRecord]:
    journal = Journal(path)
    await journal.open()
    try:
        return await journal.load()
    finally:
        await journal.aclose()


async def test_a_finished_task_restores_to_the_message_it_published(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    await journal.open()
    ended = {"done": completed("done"), "bad": failed("bad")}
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for state, _ in ended.values():
            journal.record(record_of(state, backend="http://gpu1:8188"))
        await journal.flush()
        nursery.cancel_scope.cancel()
    await journal.aclose()
    with closing(sqlite3.connect(path)) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    assert "message" not in columns  # the fields, not a rendered message
    for record in await load(path):
        state, message = ended[record.task_id]
        assert record.state["stage"] == state.stage.value
        assert restore(record) == message


def write_old_journal(path: Path, rows: list[tuple[task.TaskState, task.TaskMessage]]) -> None:
    """The format before this change: each task's last message in a `message` column."""
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE tasks (task_id TEXT PRIMARY KEY, prompt_id TEXT NOT NULL,"
        " phase TEXT NOT NULL, version INTEGER NOT NULL, submitted INTEGER NOT NULL,"
        " created_at REAL NOT NULL, finished_at REAL, spec TEXT NOT NULL,"
        " message TEXT NOT NULL, backend TEXT);"
    )
    for state, message in rows:
        db.execute(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                state.task_id,
                state.prompt_id,
                state.phase.value,
                message.version,
                int(state.submitted),
                state.created_at,
                state.finished_at,
                json.dumps(task.spec_to_json(state.spec)),
                json.dumps(
                    {"event": message.event, "version": message.version, "payload": message.payload}
                ),
                "http://gpu1:8188",
            ),
        )
    db.execute("INSERT INTO tasks VALUES ('junk', 'p', 'error', 1, 1, 1.0, 2.0, '{', '{', NULL)")
    db.commit()
    db.close()


async def test_a_journal_that_kept_messages_is_migrated_and_restores_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    rows = {"done": completed("done"), "bad": failed("bad"), "wip": queued("wip")}
    write_old_journal(path, list(rows.values()))
    records = {r.task_id: r for r in await load(path)}
    assert set(records) == {"done", "bad", "wip"}  # the unreadable row is set aside
    for task_id in ("done", "bad"):
        assert restore(records[task_id]) == rows[task_id][1]
    wip = records["wip"]
    assert (wip.phase, wip.submitted, wip.backend) == ("queued", True, "http://gpu1:8188")
    assert wip.state["stage"] == "submitted"
    resumed = restored_task(wip, NOW, retention=300.0, version_base=7, first_backend=None)
    assert resumed is not None
    assert (resumed.state.stage, resumed.backend_name) == (
        task.Stage.SUBMITTED,
        "http://gpu1:8188",
    )
    # Migrated once: a second open finds the new format and changes nothing.
    again = {r.task_id: r for r in await load(path)}
    assert again == records


def test_a_shared_store_record_that_kept_a_message_still_loads() -> None:
    state, message = completed("done")
    new = record_of(state, backend=None)
    old = {
        "record": {
            **{
                k: v
                for k, v in json.loads(SharedRecord(new).to_json())["record"].items()
                if k != "state"
            },
            "message": {
                "event": message.event,
                "version": message.version,
                "payload": message.payload,
            },
        },
        "holder": None,
        "backendUrl": None,
    }
    loaded = SharedRecord.from_json(json.dumps(old).encode())
    assert loaded.finished
    assert restore(loaded.record) == message
    assert SharedRecord.from_json(SharedRecord(new).to_json()) == SharedRecord(new)


async def test_a_record_that_cannot_be_restored_is_set_aside_at_the_first_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It reads as a row (valid JSON), but names no phase the daemon knows.
    path = tmp_path / "data" / "journal.sqlite3"
    state, _ = queued("odd")
    odd = dataclasses.replace(record_of(state, None), phase="pondering")
    journal = Journal(path)
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.record(odd)
        await journal.flush()
        nursery.cancel_scope.cancel()
    await journal.aclose()

    def restore_warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if "cannot restore" in r.getMessage()]
        caplog.clear()
        return found

    async with running_daemon(tmp_path) as first:
        assert first.app.registry.get("odd") is None
    (warning,) = restore_warnings()
    assert "cannot restore task odd" in warning
    assert f"the table unreadable_tasks of {path}" in warning
    async with running_daemon(tmp_path) as second:
        assert second.app.registry.get("odd") is None
    assert restore_warnings() == []
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT task_id, phase FROM unreadable_tasks").fetchall() == [
            ("odd", "pondering")
        ]
        assert db.execute("SELECT count(*) FROM tasks WHERE task_id = 'odd'").fetchone() == (0,)


def test_a_task_restored_while_cancelling_goes_on_cancelling() -> None:
    """A cancel answered 202 before a crash is carried out after the restart."""
    state, _ = run("c", [task.Submitted(1), task.CancelRequested()])
    assert state.cancel_requested
    record = record_of(state, backend="http://gpu1:8188")
    resumed = restored_task(record, NOW, retention=300.0, version_base=7, first_backend=None)
    assert resumed is not None
    assert resumed.resumed
    assert resumed.state.cancel_requested
    assert task.render(resumed.state, NOW).payload["progress"]["currentStep"] == "Cancelling..."
    # Not cancelling: not made so by the restart.
    state, _ = queued("q")
    again = restored_task(
        record_of(state, None), NOW, retention=300.0, version_base=7, first_backend=None
    )
    assert again is not None
    assert not again.state.cancel_requested
