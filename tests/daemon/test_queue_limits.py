"""Queue flood: max_queued_tasks, the per-client limit, and who a client is."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import trio

from daemon.api.clients import client_address, client_key, parse_networks
from daemon.comfy.backend import QUEUE_READ_SPACING, BackendSettings, ComfyBackend
from daemon.config import ConfigError, load
from daemon.http.client import ClientResponse
from daemon.http.types import Headers
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol.sse import ServerSentEvent
from tests.daemon.harness import Daemon, read_events, running_daemon

HELD = SimulatorConfig(step_time=0.01, manual_steps=True)  # prompts wait for grant_steps()
PROXIES = parse_networks("10.0.0.0/8, ::1")


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # Not a trusted proxy: its headers say nothing.
        ("198.51.100.7:5000", [("x-forwarded-for", "203.0.113.1")], "198.51.100.7"),
        ("198.51.100.7:5000", [("x-real-ip", "203.0.113.1")], "198.51.100.7"),
        # A trusted proxy: the rightmost address that is not one of ours.
        ("10.0.0.2:5000", [("x-forwarded-for", "1.1.1.1, 203.0.113.1, 10.0.0.3")], "203.0.113.1"),
        (
            "10.0.0.2:5000",
            [("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")],
            "2.2.2.2",
        ),
        ("10.0.0.2:5000", [("x-real-ip", "203.0.113.9")], "203.0.113.9"),
        ("[::1]:5000", [("x-forwarded-for", "2001:db8::5")], "2001:db8::5"),
        # Nothing usable: the proxy itself.
        ("10.0.0.2:5000", [("x-forwarded-for", "bogus")], "10.0.0.2"),
        ("10.0.0.2:5000", [], "10.0.0.2"),
    ],
)
def test_client_address(peer: str, headers: list[tuple[str, str]], expected: str) -> None:
    assert client_address(Headers(headers), peer, PROXIES) == expected


def test_a_checked_token_is_the_client_whatever_the_address() -> None:
    key = partial(client_key, trusted=PROXIES, tokens_checked=True)
    one = key(Headers([("authorization", "Bearer s3cret")]), "1.2.3.4:1")
    two = key(Headers([("authorization", "bearer s3cret")]), "5.6.7.8:1")
    other = key(Headers([("authorization", "Bearer other")]), "1.2.3.4:1")
    assert one == two != other
    assert "s3cret" not in one
    assert key(Headers([]), "1.2.3.4:1") == "address:1.2.3.4"
    unchecked = Headers([("authorization", "Bearer s3cret")])
    assert client_key(unchecked, "1.2.3.4:1", PROXIES, tokens_checked=False) == "address:1.2.3.4"


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ConfigError, match="nginx"):
        load(config_file=None, environ={}, flags={"trusted_proxies": "127.0.0.1, nginx"})


async def post(daemon: Daemon, *headers: tuple[str, str]) -> ClientResponse:
    return await daemon.request("POST", "/generate", {"prompt": "a red fox"}, headers=headers)


async def test_past_max_queued_tasks_generate_answers_429(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_daemon(tmp_path, simulator=HELD, max_queued_tasks=2) as daemon:
            accepted = [await post(daemon) for _ in range(2)]
            refused = await post(daemon)
            # A task that ends (the queued one, cancelled) makes room again.
            second = accepted[1].json()["taskId"]
            assert (await daemon.request("DELETE", f"/tasks/{second}")).status == 202
            actor = daemon.app.registry.get(second)
            assert actor is not None
            await actor.finished.wait()
            again = await post(daemon)
    assert [r.status for r in accepted] == [202, 202]
    assert refused.status == 429, refused.body
    assert refused.headers.get("retry-after") == "10"
    assert "2 tasks are waiting or running" in refused.json()["error"]["message"]
    assert again.status == 202, again.body


async def test_the_per_client_limit_counts_by_token_when_tokens_are_checked(
    tmp_path: Path,
) -> None:
    token_a = ("Authorization", "Bearer token-a-0123456789abcdef")
    token_b = ("Authorization", "Bearer token-b-0123456789abcdef")
    with trio.fail_after(20):
        async with running_daemon(
            tmp_path,
            simulator=HELD,
            max_queued_tasks_per_client=1,
            api_tokens="token-a-0123456789abcdef token-b-0123456789abcdef",
        ) as daemon:
            statuses = {
                "token a": await post(daemon, token_a),
                "token a again": await post(daemon, token_a),
                "token b": await post(daemon, token_b),
            }
    assert {name: r.status for name, r in statuses.items()} == {
        "token a": 202,
        "token a again": 429,
        "token b": 202,
    }
    assert "the most one client may have" in statuses["token a again"].json()["error"]["message"]


async def test_an_unchecked_token_does_not_make_a_new_client(tmp_path: Path) -> None:
    """Without api_tokens a token is whatever the client sends: a new one with each
    request escaped the per-client limit. The address counts."""
    with trio.fail_after(20):
        async with running_daemon(
            tmp_path, simulator=HELD, max_queued_tasks_per_client=1
        ) as daemon:
            first = await post(daemon, ("Authorization", "Bearer made-up-1"))
            second = await post(daemon, ("Authorization", "Bearer made-up-2"))
            untokened = await post(daemon)
    assert first.status == 202, first.body
    assert second.status == 429, second.body
    assert untokened.status == 429, untokened.body


async def test_the_per_client_limit_counts_by_address(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_daemon(
            tmp_path,
            simulator=HELD,
            max_queued_tasks_per_client=1,
            trusted_proxies="127.0.0.1",
        ) as daemon:
            statuses = {
                "address": await post(daemon),
                "address again": await post(daemon),
                # We are 127.0.0.1, a trusted proxy here: the header names the client.
                "proxied client": await post(daemon, ("X-Forwarded-For", "203.0.113.1")),
                "proxied again": await post(daemon, ("X-Forwarded-For", "203.0.113.1")),
            }
    assert {name: r.status for name, r in statuses.items()} == {
        "address": 202,
        "address again": 429,
        "proxied client": 202,
        "proxied again": 429,
    }


async def test_the_per_client_limit_counts_the_tasks_a_restart_brings_back(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        sim = ComfySimulator(HELD)
        port = await nursery.start(sim.run, ("127.0.0.1", 0))
        settings = {"comfy_url": f"http://127.0.0.1:{port}", "max_queued_tasks_per_client": 1}
        async with running_daemon(tmp_path, simulator=None, **settings) as before:
            first = await post(before)
            assert first.status == 202, first.body
        # The task is still unfinished after the restart: it still counts.
        async with running_daemon(tmp_path, simulator=None, **settings) as after:
            refused = await post(after)
            # It ends (cancelled): its client has room again.
            task_id = first.json()["taskId"]
            assert (await after.request("DELETE", f"/tasks/{task_id}")).status == 202
            # A prompt already running sits at a parked step: it sees the interrupt
            # only when the step moves on (or it completes first: it ends either way).
            sim.grant_steps(10_000)
            actor = after.app.registry.get(task_id)
            assert actor is not None
            await actor.finished.wait()
            again = await post(after)
        nursery.cancel_scope.cancel()
    assert refused.status == 429, refused.body
    assert "the most one client may have" in refused.json()["error"]["message"]
    assert again.status == 202, again.body


async def test_a_flood_of_new_tasks_shares_queue_readings(tmp_path: Path) -> None:
    """Each new task used to force a fresh GET /queue (megabytes with thousands queued)."""
    tasks = 20
    with trio.fail_after(60):
        # Every prompt goes to ComfyUI (room for all), so each position comes from /queue.
        async with running_daemon(
            tmp_path, simulator=HELD, queue_poll_interval=1.0, backend_max_pending=tasks + 1
        ) as daemon:
            started = trio.current_time()
            ids = [await daemon.generate() for _ in range(tasks)]
            async with trio.open_nursery() as nursery:
                for task_id in ids[1:]:  # the first one runs; the others wait in line
                    nursery.start_soon(
                        partial(read_events, daemon.url, task_id, stop_after=shows_position)
                    )
            reads = daemon.app.backend.queue_reads
            seconds = trio.current_time() - started
    # Readings are shared: about one per poll interval while this ran (however long
    # a loaded machine made that), not one per task.
    assert reads < tasks - 1, (reads, seconds)  # fewer than one per waiting task
    assert reads <= seconds / 1.0 + 3, (reads, seconds)


def shows_position(event: ServerSentEvent) -> bool:
    return json.loads(event.data).get("queue") is not None


def test_a_costly_queue_is_read_less_often() -> None:
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    assert backend.queue_read_spacing(1.0) == 1.0
    backend.queue_read_cost = 0.25  # a queue of thousands of prompts: megabytes to read
    assert backend.queue_read_spacing(1.0) == 0.25 * QUEUE_READ_SPACING
