"""Idempotency-Keys kept by one daemon (in memory and in its journal)."""

from __future__ import annotations

from pathlib import Path

import trio

from daemon.api.idempotency import KEY_TTL, IdempotencyKeys, fingerprint
from daemon.tasks.journal import Journal, KeyRecord


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


def test_keys_expire_by_their_own_age_whatever_order_they_came_in() -> None:
    # Loaded from the journal in no set order, one forgotten and made again
    # later: each key goes when it is 24 h old, not before, and only once.
    now = 1_000_000.0
    body = b'{"prompt": "a fox"}'
    loaded = {
        "young": KeyRecord("t-young", now - 100.0, fingerprint(body)),
        "old": KeyRecord("t-old", now - KEY_TTL + 10.0, fingerprint(body)),
    }
    keys = IdempotencyKeys(journal=None, loaded=loaded, wall_clock=lambda: now)
    keys.forget("young", "t-young")
    now += 50.0
    keys.remember("young", body, "t-young-again")  # made again, younger
    assert keys.lookup("old", body) is None  # 24 h and 40 s old: gone
    assert keys.lookup("young", body) == "t-young-again"
    now += KEY_TTL - 60.0  # the first "young" would be past 24 h; the second is not
    keys.remember("other", body, "t-other")
    assert keys.lookup("young", body) == "t-young-again"
    now += 100.0  # the second "young" is 24 h and 40 s old
    keys.remember("last", body, "t-last")
    assert keys.lookup("young", body) is None
    assert keys.lookup("other", body) == "t-other"
