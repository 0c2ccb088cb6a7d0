"""Idempotency keys shared by every daemon: the first POST with a key claims it in the
same Redis step that queues its task (expiring after KEY_TTL); a retry of that POST
on any daemon gets the same task.

Two twins arriving at two fronts at once make one task: the later step finds the
key claimed, writes nothing, and answers with the earlier one's task. A key never
names a task that did not reach the queue (a Redis failing midway, a front killed
between two writes): the claim is the step's last write. So a retry that finds
the key but no task is told how that task ended (SharedStore.outcome: its end's
payload, kept beside the key by whoever wrote the end): it ended and was
forgotten since (`task_retention`).
"""

from __future__ import annotations

import json

import coredis

from daemon.api.idempotency import KEY_TTL, fingerprint
from protocol.errors import RequestError


class SharedIdempotencyKeys:
    def __init__(self, redis: coredis.Redis[bytes], prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}:idempotency:{fingerprint(key.encode())}"

    def claim(self, key: str, body: bytes, task_id: str) -> tuple[str, bytes, int]:
        """The claim to write with `task_id` (SharedStore.submit): Redis key, value, TTL."""
        value = json.dumps({"taskId": task_id, "fingerprint": fingerprint(body)}).encode()
        return self._key(key), value, int(KEY_TTL)

    async def lookup(self, key: str, body: bytes) -> str | None:
        """The task `key` already made (None: a new key); RequestError 422 when that
        request had another body. A retry is answered with it before anything is
        checked: it submits nothing, so no queue limit nor source image may refuse it."""
        raw = await self.redis.get(self._key(key))
        return None if raw is None else self.existing(raw, body)

    @staticmethod
    def existing(raw: bytes, body: bytes) -> str:
        """The task of a claim found in Redis (RequestError 422: for another body)."""
        claimed = json.loads(raw)
        if claimed["fingerprint"] != fingerprint(body):
            raise RequestError(
                "this Idempotency-Key was already used with a different request",
                status_hint=422,
                # Not the task's id: keys are guessable, and the id lets anyone
                # follow (and, without api_tokens, cancel) that task.
                details={"field": "Idempotency-Key"},
            )
        return str(claimed["taskId"])
