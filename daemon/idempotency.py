"""Idempotency-Key on POST /generate: the same key within 24 hours is the same task.

A client that retries a POST whose answer it never got (a dropped connection,
a proxy timeout) sends the same key and gets the taskId of the first attempt;
nothing new is submitted. A key reused with a different body is a client bug
and gets 422, as in the IETF httpapi Idempotency-Key draft.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Final

from daemon.journal import Journal, KeyRecord
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
                details={"field": "Idempotency-Key", "taskId": record.task_id},
            )
        return record.task_id

    def remember(self, key: str, body: bytes, task_id: str) -> None:
        record = KeyRecord(task_id, self._clock(), fingerprint(body))
        self._keys[key] = record
        if self._journal is not None:
            self._journal.record_idempotency_key(key, record)
        self._expire()

    def _expire(self) -> None:
        cutoff = self._clock() - KEY_TTL
        for key in [k for k, r in self._keys.items() if r.created_at < cutoff]:
            del self._keys[key]
