"""Fault-injection knobs, from Python and over POST /sim/control."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
import trio

from daemon.simulator import SimulatorConfig
from tests.simulator.conftest import Harness, probe_graph
from tests.simulator.helpers import ConnectionFailed, ws_connect

StartSim = Callable[..., Awaitable[Harness]]
MANUAL = SimulatorConfig(manual_steps=True, seed=3)


async def test_drop_websockets_cuts_sockets_without_close_frame(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(MANUAL)
        client = await h.connect("drop-me")
        bystander = await h.connect("bystander")
        prompt_id = await h.submit(probe_graph(steps=4), "drop-me")
        await h.steps_until(lambda: h.sim.running_progress().get("2", {}).get("value") == 1)

        reply = await h.http("POST", "/sim/control", json_body={"drop_websockets": True})
        assert reply.status == 200
        await client.closed.wait()
        await bystander.closed.wait()
        assert client.close_code == 1006  # abnormal closure: no close frame was sent
        assert bystander.close_code == 1006

        # The prompt keeps running; a reconnect gets executing{node} without prompt_id.
        again = await h.connect("drop-me")
        await again.wait_frames(2)
        assert again.messages()[1] == {"type": "executing", "data": {"node": "2"}}
        await h.finish(prompt_id)
        entry = await h.history(prompt_id)
        assert entry[prompt_id]["status"]["status_str"] == "success"


async def test_go_silent_keeps_sockets_open_and_delivers_nothing(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(MANUAL)
        client = await h.connect("zombie")
        h.sim.go_silent()
        prompt_id = await h.submit(probe_graph(steps=3), "zombie")
        await h.finish(prompt_id)
        await h.settle()
        assert client.types() == ["status"]  # only the greeting from before the silence
        assert not client.closed.is_set()
        assert h.sim.hub.live_count() == 1
        # New sockets are silent too, even their greeting.
        late = await ws_connect(h.nursery, h.port, "late")
        await h.settle()
        assert late.frames == []
        # HTTP still works, and says the prompt finished.
        assert (await h.history(prompt_id))[prompt_id]["status"]["completed"] is True

        reply = await h.http("POST", "/sim/control", json_body={"go_silent": False})
        assert reply.json()["silent"] is False
        second = await h.submit(probe_graph(steps=1, color=9), "zombie")
        await h.finish(second)
        await client.wait_for("executing", node=None, prompt_id=second)


async def test_restart_forgets_everything_and_cuts_sockets(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(MANUAL)
        done = await h.submit(probe_graph(steps=1, prefix="kept"))
        await h.finish(done)
        preview = {
            "1": probe_graph()["1"],
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        temp = await h.submit(preview)
        await h.finish(temp)
        temp_name = (await h.history(temp))[temp]["outputs"]["2"]["images"][0]["filename"]

        client = await h.connect("c")
        running = await h.submit(probe_graph(steps=5, color=1), "c")
        pending = await h.submit(probe_graph(steps=5, color=2), "c")
        await h.steps_until(lambda: h.sim.running_progress().get("2", {}).get("value") == 2)
        frames_before = len(client.frames)

        reply = await h.http("POST", "/sim/control", json_body={"restart": True})
        assert reply.json()["restarts"] == 1
        await client.closed.wait()
        assert len(client.frames) == frames_before  # the running prompt said nothing more
        assert (await h.http("GET", "/queue")).json() == {"queue_running": [], "queue_pending": []}
        for prompt_id in (done, running, pending):
            assert await h.history(prompt_id) == {}
        # number restarts at 0, and the cache is gone: the interrupted prompt's
        # EmptyImage (color 1) ran before the restart but is not reused after it.
        watcher = await h.connect("w")
        body = {"prompt": probe_graph(steps=1, color=1), "client_id": "w"}
        fresh = await h.http("POST", "/prompt", json_body=body)
        assert fresh.json()["number"] == 0
        await h.finish(fresh.json()["prompt_id"])
        cached = [m for m in watcher.messages() if m["type"] == "execution_cached"]
        assert cached[0]["data"]["nodes"] == []
        # Output files survive (on disk in a real ComfyUI); temp files do not.
        assert (await h.http("GET", "/view?filename=kept_00001_.png")).status == 200
        view_temp = await h.http("GET", f"/view?filename={temp_name}&type=temp")
        assert view_temp.status == 404


async def test_fail_at_by_node_id_and_class_type(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        client = await h.connect("f")
        reply = await h.http("POST", "/sim/control", json_body={"fail_at": "2"})
        assert reply.json()["fail_at"] == "2"
        first = await h.submit(probe_graph(steps=2), "f")
        index = await client.wait_for("execution_error", prompt_id=first)
        error = client.messages()[index]["data"]
        assert error["node_id"] == "2"
        assert error["node_type"] == "SlowProgress"
        assert error["exception_message"] == "simulated failure (fail_at=2)\n"
        assert error["exception_type"] == "RuntimeError"
        assert error["executed"] == ["1"]
        assert error["current_inputs"]["steps"] == [2]
        end = await client.wait_for("executing", node=None, prompt_id=first)
        assert client.types()[index:end] == ["execution_error", "status"]

        h.sim.set_fail_at("SaveImage")
        second = await h.submit(probe_graph(steps=2, color=5), "f")
        index = await client.wait_for("execution_error", prompt_id=second)
        assert client.messages()[index]["data"]["node_id"] == "3"
        assert (await h.history(second))[second]["status"]["status_str"] == "error"

        h.sim.set_fail_at(None)
        third = await h.submit(probe_graph(steps=2, color=6), "f")
        await client.wait_for("execution_success", prompt_id=third)


async def test_reject_connections_resets_until_the_window_ends(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        client = await h.connect("r")
        reply = await h.http("POST", "/sim/control", json_body={"reject_connections": 30})
        assert reply.status == 200
        assert 29 < reply.json()["rejecting_for"] <= 30
        await client.closed.wait()  # "ComfyUI went down": sockets are cut
        with pytest.raises(ConnectionFailed):
            await h.http("GET", "/queue")
        with pytest.raises(ConnectionFailed):
            await h.http("POST", "/prompt", json_body={"prompt": probe_graph()})
        upgrade = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ]
        with pytest.raises(ConnectionFailed):
            await h.http("GET", "/ws?clientId=r2", headers=upgrade)
        # The control endpoint stays reachable and can end the window early.
        state = (await h.http("GET", "/sim/state")).json()
        assert state["rejecting_for"] > 0
        await h.http("POST", "/sim/control", json_body={"reject_connections": 0})
        assert (await h.http("GET", "/queue")).status == 200
        await h.connect("r3")


async def test_restart_can_be_combined_with_downtime(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        body = {"restart": True, "reject_connections": 5}
        state = (await h.http("POST", "/sim/control", json_body=body)).json()
        assert state["restarts"] == 1
        assert state["rejecting_for"] > 4
        with pytest.raises(ConnectionFailed):
            await h.http("GET", "/prompt")


async def test_step_time_and_slow_factor_apply_to_a_running_prompt(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        # The graph asks for 10 s per step; the knob overrides it while it runs.
        h = await start_sim(SimulatorConfig(step_time=30.0, seed=1))
        client = await h.connect("s")
        prompt_id = await h.submit(probe_graph(steps=3, delay=10.0), "s")
        await client.wait_for("executing", node="2")
        state = (await h.http("POST", "/sim/control", json_body={"step_time": 0.0})).json()
        assert state["step_time"] == 0.0
        # Even the step already sleeping is cut short: the prompt now ends at once.
        await client.wait_for("executing", node=None, prompt_id=prompt_id)

        state = (await h.http("POST", "/sim/control", json_body={"slow_factor": 3})).json()
        assert state["slow_factor"] == 3.0
        assert h.sim.controls.step_seconds(0.5) == 0.0  # step_time 0 stays 0
        h.sim.set_step_time(None)
        assert h.sim.controls.step_seconds(0.5) == 1.5  # the node's own delay, slowed


async def test_manual_steps_over_http(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        client = await h.connect("m")
        await h.http("POST", "/sim/control", json_body={"manual_steps": True})
        prompt_id = await h.submit(probe_graph(steps=3), "m")
        await client.wait_for("executing", node="2")
        await h.settle()
        state = (await h.http("GET", "/sim/state")).json()
        assert state["waiting_for_step"] is True
        assert state["running"]["prompt_id"] == prompt_id
        assert state["running"]["nodes"]["2"] == {"state": "running", "value": 0.0, "max": 1.0}

        await h.http("POST", "/sim/control", json_body={"grant_steps": 2})
        await client.wait_for("progress", value=2, prompt_id=prompt_id)
        await h.settle()
        values = [m["data"]["value"] for m in client.messages() if m["type"] == "progress"]
        assert values == [1, 2]
        await h.http("POST", "/sim/control", json_body={"manual_steps": False})
        await client.wait_for("executing", node=None, prompt_id=prompt_id)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"bogus": 1}, "unknown knob"),
        ({"step_time": "fast"}, "step_time must be a number"),
        ({"slow_factor": 0}, "slow_factor must be > 0"),
        ({"fail_at": 3}, "fail_at must be"),
        ({"go_silent": "yes"}, "go_silent must be true or false"),
        ({"grant_steps": -1}, "grant_steps must be"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_control_requests_are_400(
    start_sim: StartSim, body: object, message: str
) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        reply = await h.http("POST", "/sim/control", body=json.dumps(body).encode())
        assert reply.status == 400
        assert message in reply.json()["error"]
        bad_json = await h.http("POST", "/sim/control", body=b"{nope")
        assert bad_json.status == 400


async def test_history_wait_answers_when_the_prompt_finishes(start_sim: StartSim) -> None:
    """GET /sim/history/{id}/wait: a test in another process waits without polling."""
    with trio.fail_after(10):
        h = await start_sim(MANUAL)
        prompt_id = await h.submit(probe_graph(steps=2))
        answered = trio.Event()
        replies: list[int] = []

        async def wait() -> None:
            reply = await h.http("GET", f"/sim/history/{prompt_id}/wait")
            replies.append(reply.status)
            answered.set()

        h.nursery.start_soon(wait)
        await h.steps_until(lambda: h.sim.running_progress().get("2", {}).get("value") == 1)
        assert not answered.is_set()  # still running: no answer yet
        await h.finish(prompt_id)
        await answered.wait()
        assert replies == [200]
        assert (await h.history(prompt_id))[prompt_id]["status"]["completed"] is True
