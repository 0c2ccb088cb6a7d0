"""Idempotency-Keys kept by one daemon (in memory and in its journal)."""

from __future__ import annotations

from pathlib import Path

import trio

from daemon.api.idempotency import KEY_TTL, IdempotencyKeys
from daemon.tasks.journal import Journal


async def test_a_key_past_its_24_hours_leaves_the_journal_while_the_daemon_runs(
    tmp_path: Path,
) -> None:
    # The journal dropped old keys only when a daemon started: one running for
    # months kept a row for every keyed request it ever took.
    now = 1_000_000.0
    journal = Journal(tmp_path / "journal.sqlite3")
    await journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        keys = IdempotencyKeys(journal=journal, loaded={}, wall_clock=lambda: now)
        keys.remember("order-1", b'{"prompt": "a fox"}', "t1")
        keys.settle("t1", {"taskId": "t1", "status": "completed"})
        now += KEY_TTL / 2
        keys.remember("order-2", b'{"prompt": "a cat"}', "t2")
        now += KEY_TTL / 2 + 1  # order-1 is older than 24 h now, order-2 not
        keys.remember("order-3", b'{"prompt": "a dog"}', "t3")
        await journal.flush()
        nursery.cancel_scope.cancel()
    # Read as it is on disk: newer_than=0 deletes nothing.
    assert set(await journal.load_idempotency_keys(newer_than=0.0)) == {"order-2", "order-3"}
    assert keys.lookup("order-1", b'{"prompt": "a fox"}') is None
    assert keys.outcome("order-1") is None  # nor kept in memory
    await journal.aclose()
