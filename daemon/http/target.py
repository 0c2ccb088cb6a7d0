"""Request-target parsing shared by the server and the router.

Routing works on the raw path split at ``/`` and then percent-decoded segment
by segment, so an encoded ``%2F`` stays inside its segment instead of
creating a new one.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

# A URI scheme and "://": the start of an absolute-form target (RFC 3986 3.1).
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class BadTarget(ValueError):
    """The request target cannot be decoded (invalid percent-encoded UTF-8, or a
    URL that does not parse), or is in a form the daemon does not serve."""


def check_form(method: str, target: str) -> None:
    """Raise BadTarget for a request-target in a form the daemon does not serve.

    Served: origin-form (``/a?b``), absolute-form (``http://host/a``), and
    asterisk-form (``*``) for OPTIONS only (RFC 9112 3.2.4). Authority-form is
    for CONNECT alone, which the daemon does not serve; anything else (``foo``)
    is no request-target at all.
    """
    if target.startswith("/") or _ABSOLUTE_FORM.match(target):
        return
    if target == "*" and method == "OPTIONS":
        return
    raise BadTarget(f"request target {target!r} is neither origin-form nor absolute-form")


def split_target(target: str) -> tuple[str, str]:
    """Split a request target into its raw path and raw query string.

    Accepts origin-form (``/a?b``) and absolute-form (``http://host/a?b``);
    anything else (``*``, authority-form) keeps its text as the path (of those
    the server lets only ``OPTIONS *`` through: :func:`check_form`).
    Raises BadTarget for an absolute-form target urlsplit refuses (``http://[/``).
    """
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    if "://" in target:
        try:
            parts = urlsplit(target)
        except ValueError:
            raise BadTarget(f"request target {target!r} is not a valid URL") from None
        return parts.path or "/", parts.query
    return target, ""


def decode_segment(raw: str) -> str:
    """Percent-decode one path segment as UTF-8, strictly."""
    try:
        return unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadTarget(f"path segment {raw!r} is not valid percent-encoded UTF-8") from None


def path_segments(raw_path: str) -> list[str]:
    """The decoded segments of a raw path: ``"/a/b%20c"`` -> ``["a", "b c"]``.

    ``"/"`` gives ``[""]``; a trailing slash gives a trailing empty segment.
    """
    return [decode_segment(part) for part in raw_path.split("/")[1:]]


def decode_path(raw_path: str) -> str:
    """The whole path percent-decoded (for ``Request.path``)."""
    return decode_segment(raw_path)


def parse_query(raw_query: str) -> dict[str, str]:
    """The first value of each query parameter (blank values kept)."""
    result: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        result.setdefault(key, value)
    return result
