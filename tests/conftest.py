"""Shared test configuration.

Every async test runs under a Trio-clock `fail_after` guard, so a test that
hangs fails instead of hanging CI (with the autojump clock a deadlock fails at
once; autojump tests get a day of virtual time).
Override the budget with `@pytest.mark.guard(seconds)`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

DEFAULT_GUARD_SECONDS = 60.0
# On the autojump clock virtual time is free and a deadlock jumps straight to
# the deadline, so a generous budget costs nothing and still fails fast.
AUTOJUMP_GUARD_SECONDS = 24 * 3600.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guard(seconds): the Trio-clock time limit of an async test")


def _guarded(fn: Callable[..., Awaitable[Any]], seconds: float) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(seconds):
            return await fn(*args, **kwargs)

    return wrapper


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            marker = item.get_closest_marker("guard")
            if marker:
                seconds = float(marker.args[0])
            elif "autojump_clock" in item.fixturenames:
                seconds = AUTOJUMP_GUARD_SECONDS
            else:
                seconds = DEFAULT_GUARD_SECONDS
            item.obj = _guarded(item.obj, seconds)
