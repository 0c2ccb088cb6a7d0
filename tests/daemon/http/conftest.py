"""Test setup for daemon/http: every async test runs under a hang guard."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

# On the Trio clock: real seconds for real-socket tests, virtual seconds under
# autojump_clock (where a hang fails as soon as every task is blocked). Larger
# than any timeout a test waits out on purpose.
HANG_GUARD_SECONDS = 60.0


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Wrap every async test in ``trio.fail_after`` so a hang fails instead of hanging.

    pytest-trio does not run autouse async fixtures that a test does not name,
    so the guard is applied here, before pytest-trio wraps the test function.
    """
    test: Any = getattr(item, "obj", None)
    if inspect.iscoroutinefunction(test) and not hasattr(test, "hypothesis"):
        item.obj = _guarded(test)  # type: ignore[attr-defined]
    yield


def _guarded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def guarded(**kwargs: Any) -> None:
        with trio.fail_after(HANG_GUARD_SECONDS):
            await test(**kwargs)

    return guarded
