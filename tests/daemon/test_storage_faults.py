"""Storage faults are reported, not hidden: the image directory and the journal.

Tests run as root, where chmod stops nothing, so faults are made otherwise:
the image directory is replaced by a file, and the journal's connection is
switched to read-only (`PRAGMA query_only`), which fails every write the way
a read-only or broken disk does.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from daemon.simulator import SimulatorConfig
from daemon.tasks.journal import Journal, JournalUnavailable
from tests.daemon.harness import Daemon, payloads, running_daemon
from tests.daemon.test_journal import record
from tests.protocol.images import png


def break_image_directory(daemon: Daemon) -> Path:
    directory = daemon.app.images.directory
    shutil.rmtree(directory)
    directory.write_bytes(b"not a directory any more")
    return directory


async def make_journal_read_only(journal: Journal) -> None:
    async with journal._lock:  # a fault below the unit: no write can succeed now
        assert journal._db is not None
        journal._db.execute("PRAGMA query_only=ON")


async def fill_journals_disk(journal: Journal) -> None:
    """The disk is full: no new page. SQLite then rolls the transaction back itself."""
    async with journal._lock:
        assert journal._db is not None
        pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
        journal._db.execute(f"PRAGMA max_page_count={pages}")


async def test_a_task_whose_image_cannot_be_stored_ends_with_storage(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_daemon(tmp_path) as daemon:
            directory = break_image_directory(daemon)
            task_id = await daemon.generate()
            last = payloads(await daemon.events(task_id))[-1]
    assert last["status"] == "error"
    assert last["error"]["code"] == "storage"
    assert str(directory) in last["error"]["details"]


async def test_upload_answers_503_with_the_reason_when_images_cannot_be_stored(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with running_daemon(tmp_path) as daemon:
            directory = break_image_directory(daemon)
            response = await daemon.request(
                "POST", "/upload", png(8, 8), headers=(("Content-Type", "image/png"),)
            )
    assert response.status == 503, response.body
    message = response.json()["error"]["message"]
    assert str(directory) in message
    assert "Not a directory" in message


async def test_journal_does_not_use_a_shared_memory_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        journal.record(record("a", 1))
        await journal.flush()
        assert not (tmp_path / "j.sqlite3-shm").exists()
        assert (tmp_path / "j.sqlite3-wal").exists()  # still WAL
        nursery.cancel_scope.cancel()
    await journal.aclose()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (make_journal_read_only, "attempt to write a readonly database"),
        # Used to be logged as "cannot rollback - no transaction is active".
        (fill_journals_disk, "database or disk is full"),
    ],
)
async def test_flush_raises_with_sqlites_reason_when_the_journal_cannot_write(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: Callable[[Journal], Awaitable[None]],
    reason: str,
) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    await journal.open()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            await fault(journal)
            journal.record(record("a", 1, big=True))
            with pytest.raises(JournalUnavailable, match=reason):
                await journal.flush()
            assert journal.failure is not None
            nursery.cancel_scope.cancel()
    await journal.aclose()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(reason in message for message in errors)
    assert not any("cannot rollback" in r.getMessage() for r in caplog.records)


async def test_generate_answers_503_when_the_journal_cannot_write(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_daemon(tmp_path) as daemon:
            await make_journal_read_only(daemon.app.journal)
            first = await daemon.request("POST", "/generate", {"prompt": "a red fox"})
            second = await daemon.request("POST", "/generate", {"prompt": "a red fox"})
            # The refused task does not run on: it was taken back.
            refused = daemon.app.registry.actors()
            for actor in refused:
                await actor.finished.wait()
    for response in (first, second):
        assert response.status == 503, response.body
        assert "readonly database" in response.json()["error"]["message"]
        assert response.headers.get("retry-after") == "5"
    assert len(refused) == 1  # the second was refused before a task was made
    error = refused[0].state.error
    assert error is not None
    assert error.code == "cancelled"


async def test_tasks_created_at_once_are_each_journalled_before_their_202(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with running_daemon(tmp_path) as daemon:
            journal = daemon.app.journal
            journalled_at_202: list[bool] = []

            async def create() -> None:
                task_id = await daemon.generate()
                # The answer has arrived: its task must be on disk already.
                on_disk = {r.task_id for r in await journal.load()}
                journalled_at_202.append(task_id in on_disk)

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(create)
            assert journalled_at_202 == [True] * 20


async def test_tasks_created_at_once_each_answer_503_when_the_commit_fails(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with running_daemon(tmp_path) as daemon:
            await make_journal_read_only(daemon.app.journal)
            responses = []

            async def create() -> None:
                responses.append(await daemon.request("POST", "/generate", {"prompt": "a fox"}))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(create)
            # Each task made was taken back, none ran as if accepted (before, a task
            # that came too late for the failed write waited for the retry a
            # second later, and ran to its end meanwhile).
            for actor in daemon.app.registry.actors():
                await actor.finished.wait()
                assert actor.state.cancel_requested
                assert actor.state.error is not None
                assert actor.state.error.code == "cancelled"
    assert [r.status for r in responses] == [503] * 5
    for response in responses:
        assert "readonly database" in response.json()["error"]["message"]


async def journal_writes_again(journal: Journal) -> None:
    """The fault is gone; returns once the flusher's retry has written."""
    async with journal._lock:
        assert journal._db is not None
        journal._db.execute("PRAGMA query_only=OFF")
    while journal.failure is not None:
        await journal._batch_written.wait()


async def test_an_idempotency_key_whose_post_was_refused_503_may_be_retried(
    tmp_path: Path,
) -> None:
    """The 503 says try again: the retry must not be told its refused task was taken."""
    key = (("Idempotency-Key", "retry-after-503"),)
    body = {"prompt": "a red fox", "seed": 3}
    with trio.fail_after(20):
        async with running_daemon(tmp_path) as daemon:
            await make_journal_read_only(daemon.app.journal)
            refused = await daemon.request("POST", "/generate", body, headers=key)
            assert refused.status == 503, refused.body
            while_broken = await daemon.request("POST", "/generate", body, headers=key)
            await journal_writes_again(daemon.app.journal)
            retried = await daemon.request("POST", "/generate", body, headers=key)
            assert retried.status == 202, retried.body
            task_id = retried.json()["taskId"]
            last = payloads(await daemon.events(task_id))[-1]
            again = await daemon.request("POST", "/generate", body, headers=key)
            await daemon.app.journal.flush()
            keys = await daemon.app.journal.load_idempotency_keys(0)
    assert while_broken.status == 503, while_broken.body
    assert while_broken.headers.get("idempotent-replayed") is None
    assert retried.headers.get("idempotent-replayed") is None
    assert last["status"] == "completed"
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["taskId"] == task_id
    assert keys["retry-after-503"].task_id == task_id


async def test_twins_of_a_post_refused_503_are_not_told_its_task_was_taken(
    tmp_path: Path,
) -> None:
    """A twin arriving while the first waits for the journal hears how that ends."""
    key = (("Idempotency-Key", "twins-503"),)
    body = {"prompt": "a red fox", "seed": 3}
    with trio.fail_after(20):
        async with running_daemon(tmp_path) as daemon:
            await make_journal_read_only(daemon.app.journal)
            responses = []

            async def create() -> None:
                responses.append(await daemon.request("POST", "/generate", body, headers=key))

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(create)
    assert [r.status for r in responses] == [503] * 5, [r.body for r in responses]


async def test_cancels_asked_at_once_are_each_journalled_before_their_202(
    tmp_path: Path,
) -> None:
    """A kill -9 right after the 202 must not lose the cancel: the restarted daemon
    would run the task on (or resubmit it) as if nobody had asked."""
    with trio.fail_after(30):
        async with running_daemon(tmp_path, simulator=SimulatorConfig(step_time=0.2)) as daemon:
            journal = daemon.app.journal
            task_ids = [await daemon.generate() for _ in range(20)]
            journalled_at_202: list[bool] = []

            async def cancel(task_id: str) -> None:
                response = await daemon.request("DELETE", f"/tasks/{task_id}")
                assert response.status == 202, response.body
                # The answer has arrived: the cancel must be on disk already.
                [on_disk] = [r for r in await journal.load() if r.task_id == task_id]
                journalled_at_202.append(bool(on_disk.state.get("cancelRequested")))

            async with trio.open_nursery() as nursery:
                for task_id in task_ids:
                    nursery.start_soon(cancel, task_id)
            assert journalled_at_202 == [True] * 20
            for actor in daemon.app.registry.actors():
                await actor.finished.wait()
