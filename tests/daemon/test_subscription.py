"""A task's subscription to its prompt, against a real backend and the real simulator."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.comfy.backend import BackendSettings, ComfyBackend
from daemon.comfy.routing import PromptRouter
from daemon.comfy.subscription import PromptSubscription
from daemon.simulator import ComfySimulator, SimulatorConfig
from protocol import comfy
from tests.daemon.test_comfy_network import relayed_simulator
from tests.simulator.helpers import WsClient, ws_connect

GRAPH: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
    },
    "2": {"class_type": "SlowProgress", "inputs": {"image": ["1", 0], "steps": 3, "delay": 0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sub"}},
}


@asynccontextmanager
async def connected_backend() -> AsyncIterator[tuple[ComfySimulator, ComfyBackend]]:
    """A simulator stepping by hand, and a backend whose WebSocket to it is open."""
    async with trio.open_nursery() as nursery:
        sim = ComfySimulator(SimulatorConfig(manual_steps=True, step_time=0.0))
        await nursery.start(sim.run, ("127.0.0.1", 0))
        backend = ComfyBackend(BackendSettings(url=sim.url))
        await nursery.start(backend.run)
        await backend.wait_connected()
        yield sim, backend
        nursery.cancel_scope.cancel()


async def submit(backend: ComfyBackend, subscription: PromptSubscription) -> None:
    reply = await backend.http.submit(
        GRAPH, client_id=backend.client_id, prompt_id=subscription.prompt_id
    )
    assert isinstance(reply, comfy.PromptAccepted)
    subscription.submitted()


def frames_of(
    backend: ComfyBackend, prompt_id: str
) -> tuple[PromptSubscription, trio.MemoryReceiveChannel[comfy.ComfyEvent]]:
    """Subscribe, with the delivered frames kept for the test to read."""
    send, receive = trio.open_memory_channel[comfy.ComfyEvent](math.inf)
    return backend.subscribe(prompt_id, deliver=send.send_nowait), receive


async def until_prompt_ends(
    frames: trio.MemoryReceiveChannel[comfy.ComfyEvent],
) -> list[comfy.ComfyEvent]:
    events = []
    async for event in frames:
        events.append(event)
        if isinstance(event, comfy.Executing) and event.is_prompt_end:
            return events
    raise AssertionError("the events ended before the prompt did")


async def test_a_subscription_gets_its_prompts_frames_and_no_other() -> None:
    with trio.fail_after(20):
        async with connected_backend() as (sim, backend):
            ours, ours_frames = frames_of(backend, "cp-ours")
            _, other_frames = frames_of(backend, "cp-other")
            await submit(backend, ours)
            sim.grant_steps(1000)
            events = await until_prompt_ends(ours_frames)
            assert isinstance(events[0], comfy.ExecutionStart)
            assert {e.node for e in events if isinstance(e, comfy.Progress)} == {"2"}
            with pytest.raises(trio.WouldBlock):
                other_frames.receive_nowait()


async def test_closing_stops_the_frames_and_frees_the_prompt_for_a_new_subscription() -> None:
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))  # never connected
    first, first_frames = frames_of(backend, "cp-1")
    with pytest.raises(ValueError, match="already routed"):
        backend.subscribe("cp-1")
    first.close()
    first.close()  # idempotent
    second, second_frames = frames_of(backend, "cp-1")
    first.close()  # an old subscription's close leaves the new one alone
    backend.router.dispatch(comfy.ExecutionStart("cp-1"))
    assert second_frames.receive_nowait() == comfy.ExecutionStart("cp-1")
    with pytest.raises(trio.WouldBlock):
        first_frames.receive_nowait()
    second.close()
    backend.router.dispatch(comfy.ExecutionStart("cp-1"))
    with pytest.raises(trio.WouldBlock):
        second_frames.receive_nowait()


async def test_frames_are_handed_over_as_they_come_none_dropped_however_many() -> None:
    # No channel in between that could fill up: the consumer calls the task.
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    delivered: list[comfy.ComfyEvent] = []
    backend.subscribe("cp-busy", deliver=delivered.append)
    sent = [comfy.Progress("cp-busy", "2", value, 10_000) for value in range(1, 10_001)]
    for event in sent:
        backend.router.dispatch(event)
    assert delivered == sent
    assert backend.router.events_routed == len(sent)


async def test_a_route_settles_after_its_last_frame_of_a_batch_or_when_the_batch_ends() -> None:
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    calls: list[str] = []

    def deliver(event: comfy.ComfyEvent) -> None:
        calls.append(f"deliver {comfy.prompt_id_of(event)}")

    for prompt_id in ("cp-a", "cp-b"):
        settle = functools.partial(calls.append, f"settle {prompt_id}")
        backend.subscribe(prompt_id, deliver=deliver, settle=settle)
    router = backend.router
    router.dispatch(comfy.ExecutionStart("cp-a"), more=True)  # another of cp-a's follows
    router.dispatch(comfy.ExecutionStart("cp-b"))
    router.dispatch(comfy.Progress("cp-a", "3", 1, 10), more=True)  # ... that never comes
    router.end_batch()
    router.end_batch()  # nothing left to settle
    assert calls == [
        "deliver cp-a",
        "deliver cp-b",
        "settle cp-b",
        "deliver cp-a",
        "settle cp-a",
    ]


async def test_reconnected_says_so_once_per_reconnect_since_subscribing() -> None:
    with trio.fail_after(20):
        async with connected_backend() as (sim, backend):
            subscription = backend.subscribe("cp-1")
            assert not subscription.reconnected()
            before = backend.reconnects
            sim.drop_websockets()
            while backend.reconnects == before:
                await backend.reconnected.wait()
            assert subscription.reconnected()
            assert not subscription.reconnected()  # said once
            later = backend.subscribe("cp-2")
            assert not later.reconnected()  # the reconnect came before it subscribed


async def test_a_restarted_daemon_gets_the_node_comfyui_resends_when_its_socket_opens(
    tmp_path: Path,
) -> None:
    # When a socket opens, ComfyUI re-sends `executing {node}` without a prompt id.
    # A restarted daemon never saw its prompt start, and no task reconciles after
    # the first connect: the backend's own /queue reading names the frame's owner.
    id_file = tmp_path / "client-id"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sim = ComfySimulator(SimulatorConfig(manual_steps=True, step_time=0.0))
            await nursery.start(sim.run, ("127.0.0.1", 0))
            async with trio.open_nursery() as first_daemon:
                before_restart = ComfyBackend(BackendSettings(url=sim.url), client_id_file=id_file)
                first_daemon.start_soon(before_restart.run)
                await before_restart.wait_connected()
                subscription, frames = frames_of(before_restart, "cp-1")
                await submit(before_restart, subscription)
                async for event in frames:  # up to the node that waits for steps
                    if isinstance(event, comfy.Executing) and event.node == "2":
                        break
                first_daemon.cancel_scope.cancel()
            backend = ComfyBackend(BackendSettings(url=sim.url), client_id_file=id_file)
            subscription, frames = frames_of(backend, "cp-1")
            await nursery.start(backend.run)
            event = await frames.receive()
            assert isinstance(event, comfy.Executing)
            assert (event.node, event.prompt_id) == ("2", None)
            assert backend.router.running_prompt == "cp-1"
            nursery.cancel_scope.cancel()


def test_the_node_resent_on_connect_goes_to_no_prompt_once_a_newer_frame_names_one() -> None:
    # The re-send names no prompt; when the prompt it belonged to moves on (or ends)
    # before a /queue reading names it, the node is stale: nobody gets it.
    router = PromptRouter()
    delivered: list[comfy.ComfyEvent] = []
    router.open("cp-1", delivered.append)
    router.socket_opened()
    router.dispatch(comfy.Executing(node="2", prompt_id=None))
    router.dispatch(comfy.Executing(node="3", prompt_id="cp-1"))
    assert router.running_prompt == "cp-1"  # ComfyUI named it
    router.note_running("cp-1")
    assert delivered == [comfy.Executing(node="3", prompt_id="cp-1")]
    router.socket_opened()
    assert not router.ours_running  # forgotten: it may have ended meanwhile
    router.dispatch(comfy.Executing(node="3", prompt_id=None))
    router.note_running("cp-1")
    assert delivered[1:] == [comfy.Executing(node="3", prompt_id=None)]


async def test_hears_frames_until_the_client_id_changes_and_again_once_resubmitted() -> None:
    backend = ComfyBackend(BackendSettings(url="http://127.0.0.1:9"))
    subscription = backend.subscribe("cp-1")
    subscription.submitted()
    assert subscription.hears_frames()
    assert backend.unseen_submissions == 1  # counts toward the load until a `status` frame
    backend._rotate_client_id()  # what a socket ComfyUI did not close cleanly leads to
    assert not subscription.hears_frames()
    assert backend.subscribe("cp-2").hears_frames()  # a new one hears the new id
    subscription.submitted()  # submitted again, under the new id
    assert subscription.hears_frames()


def previewing(color: int) -> dict[str, Any]:
    """Node 2 sends, at each of its 3 steps, a progress text then a preview (type 1
    from a ComfyUI without feature flags): neither names its prompt."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "PreviewProgress",
            "inputs": {"image": ["1", 0], "steps": 3, "delay": 0},
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def drained(frames: trio.MemoryReceiveChannel[comfy.ComfyEvent]) -> list[comfy.ComfyEvent]:
    """The frames delivered and not read yet."""
    events = []
    while True:
        try:
            events.append(frames.receive_nowait())
        except trio.WouldBlock:
            return events


async def next_binary_frame(observer: WsClient, after: int) -> int:
    index = after + 1
    while True:
        await observer.wait_frames(index + 1)
        if isinstance(observer.frames[index], bytes):
            return index
        index += 1


async def test_after_a_reconnect_what_names_no_prompt_goes_to_the_prompt_that_runs_now() -> None:
    # Our prompt ends while the socket is away and another of ours starts: what
    # ComfyUI re-sends on connect (`executing {node}`), the texts and the type 1
    # previews belong to the new one, never to the prompt that ran before the drop.
    config = SimulatorConfig(manual_steps=True, step_time=0.0, preview_metadata=False)
    with trio.fail_after(20):
        async with relayed_simulator(config) as (sim, relay), trio.open_nursery() as nursery:
            settings = BackendSettings(
                url=relay.url, reconnect_initial_delay=0.01, reconnect_max_delay=0.05
            )
            backend = ComfyBackend(settings)
            await nursery.start(backend.run)
            await backend.wait_connected()
            old, old_frames = frames_of(backend, "cp-old")
            new, new_frames = frames_of(backend, "cp-new")
            for subscription, color in ((old, 1), (new, 2)):  # (not cached: other images)
                reply = await backend.http.submit(
                    previewing(color), client_id=backend.client_id, prompt_id=subscription.prompt_id
                )
                assert isinstance(reply, comfy.PromptAccepted)
                subscription.submitted()
            async for event in old_frames:  # up to the node that waits for steps
                if isinstance(event, comfy.Executing) and event.node == "2":
                    break
            from_before = await backend.read_queue()
            position = from_before.snapshot.position_of("cp-old")
            assert position is not None
            assert position.running
            observer = await ws_connect(nursery, int(sim.url.rsplit(":", 1)[1]), "observer")
            relay.go_down()
            while backend.is_connected():
                await backend.connected_changed.wait()
            sim.grant_steps(4)  # cp-old's 3 steps, then cp-new's first
            old_ended = await observer.wait_for(
                "status", status={"exec_info": {"queue_remaining": 1}}
            )
            await next_binary_frame(observer, old_ended)  # cp-new's first text: it runs node 2
            reconnects = backend.reconnects
            relay.come_back()
            while backend.reconnects == reconnects:
                await backend.reconnected.wait()
            sim.grant_steps(1)
            seen = []
            async for event in new_frames:  # up to cp-new's 2nd step, after the re-send
                seen.append(event)
                if isinstance(event, comfy.Progress) and event.value == 2:
                    break
            assert drained(old_frames) == []
            # The backend's own /queue reading names the owner of the re-sent node.
            resent = comfy.Executing(node="2", prompt_id=None)
            while resent not in seen:
                seen.append(await new_frames.receive())
            # A /queue reading asked for before the socket came back says nothing now.
            old.note_running(from_before)
            sim.grant_steps(100)
            after = await until_prompt_ends(new_frames)
            assert comfy.ProgressText(node_id="2", text="probe step 3/3") in after
            assert any(isinstance(event, comfy.PreviewImage) for event in after)
            assert drained(old_frames) == []
            nursery.cancel_scope.cancel()
