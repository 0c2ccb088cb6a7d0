"""Hostile HTTP requests against the real daemon (a process, real sockets), from Hypothesis.

The invariants: the daemon never crashes, never logs an error or a
traceback, never answers 500 or an undocumented status, and answers or
closes every connection within its configured timeouts. `make fuzz` runs the
same grammar for 100,000 requests (bench/fuzz.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.grammar import requests
from tests.fuzz.harness import FuzzDaemon, exchange, fuzz_daemon, problems

EXAMPLES = 600


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzDaemon]:
    with fuzz_daemon(tmp_path_factory.mktemp("fuzz") / "data") as running:
        yield running
        assert running.process.poll() is None, "the daemon died"
        assert running.log.new_problems() == []


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_hostile_requests_get_documented_answers_in_time(
    daemon: FuzzDaemon, data: st.DataObject
) -> None:
    request = data.draw(requests(daemon.context), label="request")
    result = exchange(daemon.address, request)
    found = problems(request, result)
    assert daemon.process.poll() is None, f"the daemon crashed: {request!r}"
    found += daemon.log.new_problems()
    assert not found, found
