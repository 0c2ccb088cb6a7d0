"""The two kinds of bad input, typed by who is at fault (h11 `_util.py` style).

- `ProtocolError`: ComfyUI (the remote side of our WebSocket and HTTP client)
  sent something we cannot understand. The daemon logs it and carries on.
- `RequestError`: a client of ours sent an invalid request. It carries the HTTP
  status to answer with and a machine-readable `details` payload.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ProtocolError(Exception):
    """ComfyUI sent a frame or reply we cannot parse (bad JSON, wrong shape, truncated)."""


class RequestError(Exception):
    """A client request we refuse; `status_hint` is the HTTP status to answer with."""

    def __init__(
        self,
        message: str,
        *,
        status_hint: int = 400,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_hint = status_hint
        self.details: Mapping[str, Any] = dict(details or {})


def field_error(name: str, rule: str, **details: Any) -> RequestError:
    """A 400 naming the request field and the rule (and limit) it broke."""
    return RequestError(f"{name}: {rule}", details={"field": name, **details})
