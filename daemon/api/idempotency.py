"""Idempotency-Key on POST /generate: the same key within 24 hours is the same task.

A client that retries a POST whose answer it never got (a dropped connection,
a proxy timeout) sends the same key and gets the taskId of the first attempt;
nothing new is submitted. A key reused with a different body is a client bug
and gets 422, as in the IETF httpapi Idempotency-Key draft.

A task is kept for `task_retention` seconds after it ends, the key for 24
hours: so each key also remembers how its task ended (in the journal, beside
the key), and a retry after the task was forgotten gets that outcome instead
of a taskId that 404s, across restarts too. Only when the outcome is unknown
(a key journalled by a version that did not keep outcomes) is the answer 410
Gone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from daemon.tasks.journal import Journal, KeyRecord
from protocol.errors import RequestError

KEY_TTL: Final = 24 * 3600.0
_VALID_KEY: Final = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, like a token


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class IdempotencyKeys:
    def __init__(
        self,
        *,
        journal: Journal | None,
        loaded: Mapping[str, KeyRecord],
        wall_clock: Callable[[], float],
    ) -> None:
        self._journal = journal
        self._keys = dict(loaded)
        self._clock = wall_clock
        self._key_of_task = {record.task_id: key for key, record in self._keys.items()}
        # Oldest first, so expiring looks only at the keys that are due: a scan of
        # every key on each keyed POST cost O(keys of the last 24 h) per request.
        # An entry whose key was forgotten or made again is stale and skipped.
        self._by_age = [(record.created_at, key) for key, record in self._keys.items()]
        heapq.heapify(self._by_age)

    def lookup(self, key: str, body: bytes) -> str | None:
        """The task this key already made, None for a new key; RequestError if misused."""
        if not _VALID_KEY.fullmatch(key):
            raise RequestError(
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
                details={"field": "Idempotency-Key"},
            )
        record = self._keys.get(key)
        if record is None or self._clock() - record.created_at > KEY_TTL:
            return None
        if record.fingerprint != fingerprint(body):
            raise RequestError(
                "this Idempotency-Key was already used with a different request",
                status_hint=422,
                # Not the task's id: keys are guessable, and the id lets anyone
                # follow (and, without api_tokens, cancel) that task.
                details={"field": "Idempotency-Key"},
            )
        return record.task_id

    def outcome(self, key: str) -> Mapping[str, Any] | None:
        """How the task of `key` ended (None: not yet, or not known)."""
        record = self._keys.get(key)
        return None if record is None else record.outcome

    def settle(self, task_id: str, outcome: Mapping[str, Any]) -> None:
        """Keep how `task_id` ended with its key (if a key made it), for later retries."""
        key = self._key_of_task.get(task_id)
        if key is None:
            return
        record = dataclasses.replace(self._keys[key], outcome=outcome)
        self._keys[key] = record
        if self._journal is not None:
            self._journal.record_idempotency_key(key, record)

    def remember(self, key: str, body: bytes, task_id: str) -> None:
        record = KeyRecord(task_id, self._clock(), fingerprint(body))
        self._keys[key] = record
        self._key_of_task[task_id] = key
        heapq.heappush(self._by_age, (record.created_at, key))
        if self._journal is not None:
            self._journal.record_idempotency_key(key, record)
        self._expire()

    def forget(self, key: str, task_id: str) -> None:
        """`task_id` was refused after all (its 202 never sent): a retry with `key`
        makes a new task instead of being told of the refused one."""
        record = self._keys.get(key)
        if record is None or record.task_id != task_id:
            return
        del self._keys[key]
        self._key_of_task.pop(task_id, None)
        if self._journal is not None:
            self._journal.forget_idempotency_key(key)

    def _expire(self) -> None:
        """Keys older than KEY_TTL go, from memory and from the journal: a daemon that
        runs for months would otherwise keep a journal row for every keyed request."""
        cutoff = self._clock() - KEY_TTL
        while self._by_age and self._by_age[0][0] < cutoff:
            created_at, key = heapq.heappop(self._by_age)
            record = self._keys.get(key)
            if record is None or record.created_at != created_at:
                continue  # stale: forgotten, or made again since
            del self._keys[key]
            self._key_of_task.pop(record.task_id, None)
            if self._journal is not None:
                self._journal.forget_idempotency_key(key)
