"""max_queued_tasks_per_client in shared mode: one client's tasks, counted over every front.

A client that spreads its requests over several fronts (a load balancer does
that for it) must not get past its limit; a task that ended, on whichever
daemon, frees its place.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from daemon.http.client import ClientResponse, http_request
from tests.daemon.harness import read_events
from tests.daemon.redis_server import redis_server
from tests.daemon.test_shared import front, last, simulator, worker

LIMIT = "max_queued_tasks_per_client=1"
TOKEN_A = ("Authorization", "Bearer token-a-0123456789abcdef")
TOKEN_B = ("Authorization", "Bearer token-b-0123456789abcdef")


async def post(url: str, *headers: tuple[str, str], prompt: str = "a red fox") -> ClientResponse:
    return await http_request(
        "POST",
        f"{url}/generate",
        headers=[("Content-Type", "application/json"), *headers],
        body=json.dumps({"prompt": prompt, "seed": 7}).encode(),
        timeout=10,
    )


def checked_tokens(tmp_path: Path) -> str:
    """The setting that makes fronts check both tokens: only then is a token a client."""
    path = tmp_path / "tokens"
    path.write_text("token-a-0123456789abcdef\ntoken-b-0123456789abcdef\n", encoding="utf-8")
    return f"api_tokens_file={path}"


async def test_a_client_s_limit_counts_its_tasks_at_every_front(tmp_path: Path) -> None:
    tokens = checked_tokens(tmp_path)
    with trio.fail_after(60):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f1", redis.url, LIMIT, tokens) as first,
            front(tmp_path, "f2", redis.url, LIMIT, tokens) as second,
        ):
            keyed = ("Idempotency-Key", "limit-1")
            accepted = await post(first.url, TOKEN_A, keyed)
            assert accepted.status == 202, accepted.body
            # No worker: the task waits in the service's queue, unfinished.
            elsewhere = await post(second.url, TOKEN_A, prompt="a second fox")
            assert elsewhere.status == 429, elsewhere.body
            assert "the most one client may have" in elsewhere.json()["error"]["message"]
            assert elsewhere.headers.get("retry-after") is not None
            # A retry submits nothing: it is its task, limit or not.
            retried = await post(second.url, TOKEN_A, keyed)
            assert retried.status == 202, retried.body
            assert retried.json()["taskId"] == accepted.json()["taskId"]
            # Another client has its own count.
            other = await post(second.url, TOKEN_B)
            assert other.status == 202, other.body


async def test_a_task_ended_by_a_worker_frees_its_client_s_place(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f1", redis.url, LIMIT) as first,
            front(tmp_path, "f2", redis.url, LIMIT) as second,
            simulator(manual=False) as sim,
            worker(tmp_path, "w", redis.url, sim.url),
        ):
            accepted = await post(first.url, TOKEN_A)
            assert accepted.status == 202, accepted.body
            task_id = accepted.json()["taskId"]
            done = await read_events(second.url, task_id)
            assert last(done)["status"] == "completed"
            again = await post(second.url, TOKEN_A, prompt="the next fox")
            assert again.status == 202, again.body


async def test_a_cancelled_waiting_task_frees_its_client_s_place(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with (
            redis_server(tmp_path / "redis") as redis,
            front(tmp_path, "f1", redis.url, LIMIT) as first,
        ):
            accepted = await post(first.url, TOKEN_A)
            assert accepted.status == 202, accepted.body
            task_id = accepted.json()["taskId"]
            assert (await post(first.url, TOKEN_A, prompt="b")).status == 429
            cancel = await http_request("DELETE", f"{first.url}/tasks/{task_id}", timeout=10)
            assert cancel.status == 202, cancel.body  # no worker had it: ended at once
            again = await post(first.url, TOKEN_A, prompt="c")
            assert again.status == 202, again.body
            assert (await post(first.url, TOKEN_A, prompt="d")).status == 429
