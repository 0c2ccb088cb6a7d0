"""Idempotency keys shared by every daemon: the first POST with a key claims it with
SET NX (expiring after KEY_TTL); a retry of that POST on any daemon gets the same task.

The claim comes before the task is queued, so two twins arriving at two fronts at
once make one task: the loser of the SET NX answers with the winner's task. Once
the task is in Redis' queue the claim says so (`queued`): a retry that then finds
no task was told of one that ended and was forgotten since (`task_retention`),
not of one still on its way into the queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import coredis

from daemon.api.idempotency import KEY_TTL, fingerprint
from protocol.errors import RequestError


@dataclass(frozen=True, slots=True)
class Claim:
    """The task a key made; `queued`: it reached Redis' queue (a claim by an older
    version, which did not say, counts as not)."""

    task_id: str
    queued: bool


class SharedIdempotencyKeys:
    def __init__(self, redis: coredis.Redis[bytes], prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}:idempotency:{fingerprint(key.encode())}"

    @staticmethod
    def _value(task_id: str, body: bytes, *, queued: bool) -> bytes:
        return json.dumps(
            {"taskId": task_id, "fingerprint": fingerprint(body), "queued": queued}
        ).encode()

    async def lookup(self, key: str, body: bytes) -> Claim | None:
        """The task `key` already made (None: a new key); RequestError 422 when that
        request had another body. A retry is answered with it before anything is
        checked: it submits nothing, so no queue limit nor source image may refuse it."""
        raw = await self.redis.get(self._key(key))
        return None if raw is None else self._existing(raw, body)

    @staticmethod
    def _existing(raw: bytes, body: bytes) -> Claim:
        existing = json.loads(raw)
        if existing["fingerprint"] != fingerprint(body):
            raise RequestError(
                "this Idempotency-Key was already used with a different request",
                status_hint=422,
                details={"field": "Idempotency-Key", "taskId": existing["taskId"]},
            )
        return Claim(str(existing["taskId"]), existing.get("queued") is True)

    async def claim(self, key: str, body: bytes, task_id: str) -> str | None:
        """Claim `key` for `task_id`; the task it already made if another request had it
        (RequestError 422 when that request had another body)."""
        value = self._value(task_id, body, queued=False)
        if await self.redis.set(
            self._key(key), value, ex=int(KEY_TTL), condition=coredis.PureToken.NX
        ):
            return None
        raw = await self.redis.get(self._key(key))
        if raw is None:  # expired in between: ours now
            return await self.claim(key, body, task_id)
        return self._existing(raw, body).task_id

    async def queued(self, key: str, body: bytes, task_id: str) -> None:
        """The claimed task is in Redis' queue now (the claim keeps its expiry)."""
        value = self._value(task_id, body, queued=True)
        await self.redis.set(self._key(key), value, keepttl=True, condition=coredis.PureToken.XX)

    async def release(self, key: str) -> None:
        """The claimed task was never queued: the key is free again."""
        await self.redis.delete([self._key(key)])
