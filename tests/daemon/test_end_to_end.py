"""The daemon end to end: real sockets, the real simulator over HTTP and WebSocket."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.http.client import open_stream
from daemon.simulator import SimulatorConfig
from protocol.sse import SSEDecoder
from tests.daemon.harness import FAST, payloads, read_events, running_daemon


async def test_generate_answers_at_once_and_streams_to_completion(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        response = await daemon.request("POST", "/generate", {"prompt": "a red fox", "seed": 42})
        assert response.status == 202
        body = response.json()
        assert body["status"] == "queued"
        task_id = body["taskId"]
        assert body["progressUrl"] == f"/progress/{task_id}"
        assert len(task_id) >= 30

        events = await daemon.events(task_id)
        names = [e.event for e in events]
        assert names[-1] == "complete"
        assert set(names[:-1]) == {"progress"}
        ids = [int(e.id or -1) for e in events]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)

        data = payloads(events)
        steps = [d["progress"]["currentStep"] for d in data]
        assert "Sampling image..." in steps
        sampling = [d for d in data if d["progress"]["currentStep"] == "Sampling image..."]
        percentages = [d["progress"]["percentage"] for d in sampling]
        assert percentages == sorted(percentages)
        done = data[-1]
        assert done["status"] == "completed"
        result = done["result"]
        assert result["prompt"] == "a red fox"
        assert result["seed"] == 42
        assert result["workflow"] == "txt2img"
        assert result["imageUrl"].startswith("/image/")

        image = await daemon.request("GET", result["imageUrl"])
        assert image.status == 200
        assert image.headers.get("content-type") == "image/png"
        assert image.body.startswith(b"\x89PNG\r\n\x1a\n")

        status = await daemon.request("GET", f"/tasks/{task_id}")
        assert status.status == 200
        assert status.json()["status"] == "completed"


async def test_a_stream_opened_after_the_end_gets_the_terminal_event(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id = await daemon.generate()
        first = await daemon.events(task_id)
        again = await daemon.events(task_id)
        assert [e.event for e in again] == ["complete"]
        assert again[0].data == first[-1].data


async def test_resume_with_last_event_id(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id = await daemon.generate()
        events = await daemon.events(task_id)
        last = int(events[-1].id or 0)
        # Missed the last event: it comes at once.
        resumed = await daemon.events(task_id, last_event_id=last - 1)
        assert [int(e.id or 0) for e in resumed] == [last]
        # Same through the query parameter a browser can set on its first connection.
        resumed = await daemon.events(task_id, query=f"?lastEventId={last - 1}")
        assert [int(e.id or 0) for e in resumed] == [last]


async def test_resuming_after_the_terminal_event_is_204(tmp_path: Path) -> None:
    # An EventSource reconnects by itself when a stream ends, naming the last
    # event it got: after the terminal one no stream may stay open (it would
    # send heartbeats for good), and 204 tells the browser to stop retrying.
    async with running_daemon(tmp_path) as daemon:
        task_id = await daemon.generate()
        last = (await daemon.events(task_id))[-1].id
        assert last is not None
        url = f"{daemon.url}/progress/{task_id}"
        for headers, query in (((("Last-Event-ID", last),), ""), ((), f"?lastEventId={last}")):
            async with open_stream("GET", url + query, headers=headers) as response:
                assert response.status == 204
                assert [chunk async for chunk in response.chunks] == []
        # An older id still gets the end.
        resumed = await daemon.events(task_id, last_event_id=int(last) - 1)
        assert [e.id for e in resumed] == [last]


@pytest.mark.parametrize(
    ("header", "query"),
    [
        ("1\u00b2", ""),  # the byte 0xB2 read as Latin-1: a digit to str.isdigit()
        ("\u00b2", ""),
        ("9" * 5000, ""),  # more digits than int() converts
        ("", "?lastEventId=1%C2%B2"),
        ("", "?lastEventId=%E2%91%A0"),  # CIRCLED DIGIT ONE
        ("", "?lastEventId=" + "7" * 5000),
    ],
)
async def test_a_last_event_id_that_is_not_ascii_digits_is_ignored(
    tmp_path: Path, header: str, query: str
) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id = await daemon.generate()
        fresh = await daemon.events(task_id)
        headers = (("Last-Event-ID", header),) if header else ()
        decoder = SSEDecoder()
        url = f"{daemon.url}/progress/{task_id}{query}"
        async with open_stream("GET", url, headers=headers) as response:
            assert response.status == 200
            events = [e async for chunk in response.chunks for e in decoder.feed(chunk)]
        # Treated as no id at all: the stream starts from the current snapshot.
        assert [e.data for e in events] == [fresh[-1].data]


async def test_failure_at_a_node_is_an_error_event(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        assert daemon.simulator is not None
        daemon.simulator.set_fail_at("VAEDecode")
        task_id = await daemon.generate()
        events = await daemon.events(task_id)
        assert events[-1].event == "error-event"
        error = json.loads(events[-1].data)["error"]
        assert error["code"] == "comfy_error"
        assert error["nodeType"] == "VAEDecode"
        assert error["nodeId"] == "8"
        assert error["message"]


async def test_unreachable_comfyui_makes_the_task_wait_then_fail(tmp_path: Path) -> None:
    # Nothing listens on this port (we bind and close it to find a free one).
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    async with running_daemon(
        tmp_path,
        simulator=None,
        comfy_url=f"http://127.0.0.1:{port}",
        backend_wait_timeout=0.5,
    ) as daemon:
        ready = await daemon.request("GET", "/readyz")
        assert ready.status == 503
        task_id = await daemon.generate()
        data = payloads(await daemon.events(task_id))
        assert data[0]["progress"]["currentStep"] in ("Starting...", "Waiting for ComfyUI...")
        assert any(d["progress"]["currentStep"] == "Waiting for ComfyUI..." for d in data)
        assert data[-1]["status"] == "error"
        assert data[-1]["error"]["code"] == "backend_unavailable"


async def test_health_and_readiness(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        assert (await daemon.request("GET", "/healthz")).status == 200
        with trio.fail_after(5):
            while (await daemon.request("GET", "/readyz")).status != 200:
                await daemon.app.backend.connected_changed.wait()


async def test_bad_requests_are_clear(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        cases = [
            (b"{not json", 400, "not valid JSON"),
            (b"[]", 400, "must be a JSON object"),
            (json.dumps({}).encode(), 400, "prompt"),
            (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
            (json.dumps({"prompt": "x", "seed": -1}).encode(), 400, "seed"),
            (json.dumps({"prompt": "x", "promt": "typo"}).encode(), 400, "promt"),
            (json.dumps({"prompt": "x", "workflow": "nope"}).encode(), 404, "nope"),
        ]
        for raw, status, text in cases:
            response = await daemon.request("POST", "/generate", raw)
            assert response.status == status, (raw, response.body)
            error = response.json()["error"]
            assert text in error["message"] + json.dumps(error.get("details")), (raw, error)
        too_big = await daemon.request("POST", "/generate", b"x" * (2 * 1024 * 1024))
        assert too_big.status == 413
        assert (await daemon.request("GET", "/progress/unknown")).status == 404
        assert (await daemon.request("GET", "/tasks/unknown")).status == 404
        assert (await daemon.request("PUT", "/generate", {})).status == 405
        assert daemon.app.registry.created == 0  # nothing reached ComfyUI


async def test_many_subscribers_see_the_same_stream(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id = await daemon.generate()
        results: list[list[str]] = []

        async def subscribe() -> None:
            events = await daemon.events(task_id)
            results.append([e.event or "" for e in events])

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(subscribe)
        assert all(r[-1] == "complete" for r in results)


async def test_cancel(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, simulator=SimulatorConfig(step_time=0.2)) as daemon:
        task_id = await daemon.generate()
        response = await daemon.request("DELETE", f"/tasks/{task_id}")
        assert response.status == 202
        again = await daemon.request("DELETE", f"/tasks/{task_id}")
        # Idempotent: still cancelling, or (a task still in the daemon's queue ends at
        # once) already ended; never a second cancel.
        assert again.status == 202 or again.json()["cancelled"] is False
        events = await daemon.events(task_id)
        error = json.loads(events[-1].data)["error"]
        assert error["code"] == "cancelled"
        finished = await daemon.request("DELETE", f"/tasks/{task_id}")
        assert finished.status == 200
        assert finished.json()["cancelled"] is False


# ---- the seed's three message formats, field by field

SEED_PROGRESS_KEYS = {"percentage", "currentStep", "currentValue", "maxValue"}


def check_common(payload: dict[str, object], task_id: str, status: str) -> None:
    assert payload["taskId"] == task_id
    assert payload["status"] == status
    timestamp = payload["timestamp"]
    assert isinstance(timestamp, str)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", timestamp), timestamp
    progress = payload["progress"]
    assert isinstance(progress, dict)
    assert set(progress) >= SEED_PROGRESS_KEYS
    assert isinstance(progress["currentStep"], str)
    for key in ("percentage", "currentValue", "maxValue"):
        assert isinstance(progress[key], int | float), key


async def test_the_three_message_formats_field_by_field(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id = await daemon.generate(seed=7, name="Fox", description="A red fox")
        data = payloads(await daemon.events(task_id))
        for payload in data[:-1]:
            check_common(payload, task_id, "in-progress")
            assert 0 <= payload["progress"]["percentage"] <= 100
        sampling = [d for d in data if d["progress"]["currentStep"] == "Sampling image..."]
        assert sampling[-1]["progress"]["maxValue"] == 20
        done = data[-1]
        check_common(done, task_id, "completed")
        assert done["progress"]["percentage"] == 100
        assert done["progress"]["currentStep"] == "Complete"
        assert done["progress"]["currentValue"] == done["progress"]["maxValue"] == 20
        result = done["result"]
        assert set(result) >= {
            "imageUrl", "description", "prompt", "seed", "name", "workflow",
            "inpaint", "inpaintArea", "uid",
        }  # fmt: skip
        assert (result["prompt"], result["seed"], result["name"]) == ("a red fox", 7, "Fox")
        assert (result["description"], result["workflow"]) == ("A red fox", "txt2img")
        assert (result["inpaint"], result["inpaintArea"]) == (False, None)
        assert isinstance(result["uid"], int)
        image = await daemon.request("GET", result["imageUrl"])
        assert image.body.startswith(b"\x89PNG\r\n\x1a\n")

        assert daemon.simulator is not None
        daemon.simulator.set_fail_at("KSampler")
        failed_id = await daemon.generate()
        failed = payloads(await daemon.events(failed_id))[-1]
        check_common(failed, failed_id, "error")
        assert failed["progress"] == {
            "percentage": 0,
            "currentStep": "Failed",
            "currentValue": 0,
            "maxValue": 0,
            "overall": failed["progress"]["overall"],
        }
        assert isinstance(failed["error"]["message"], str)
        assert isinstance(failed["error"]["details"], str)
        assert failed["error"]["nodeType"] == "KSampler"


async def test_two_hundred_subscribers_get_live_progress_and_the_end(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        sim = daemon.simulator
        assert sim is not None
        sim.set_manual_steps(True)
        task_id = await daemon.generate()
        streams: list[list[dict[str, Any]]] = []
        connected = [trio.Event() for _ in range(200)]
        async with trio.open_nursery() as nursery:

            async def subscribe(ready: trio.Event) -> None:
                streams.append(payloads(await daemon.events(task_id, first_event=ready)))

            for ready in connected:
                nursery.start_soon(subscribe, ready)
            for ready in connected:
                await ready.wait()
            sim.set_step_time(0.05)  # live ticks, far enough apart to be seen one by one
            sim.set_manual_steps(False)
        assert len(streams) == 200
        for data in streams:
            assert data[-1]["status"] == "completed"
            values = {
                d["progress"]["currentValue"]
                for d in data
                if d["status"] == "in-progress" and d["progress"].get("nodeType") == "KSampler"
            }
            assert len(values) >= 10, values  # live progress, not just the newest snapshot
        # After the end: the terminal event at once, then the stream closes.
        late = await daemon.events(task_id)
        assert [e.event for e in late] == ["complete"]


async def test_a_checkpoint_no_backend_has_is_a_422_naming_it(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        pool = daemon.app.pool
        while not pool.capabilities:
            await pool.changed.wait()
        response = await daemon.request(
            "POST", "/generate", {"prompt": "a fox", "checkpoint": "not-installed.safetensors"}
        )
        assert response.status == 422, response.body
        error = response.json()["error"]
        assert "checkpoint not-installed.safetensors" in error["message"]
        assert error["details"]["missing"] == ["checkpoint not-installed.safetensors"]
        queue = await daemon.request_comfy("GET", "/queue")
        assert queue.json()["queue_pending"] == []  # nothing reached ComfyUI


async def test_bad_requests_reach_nothing(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        form = await daemon.request(
            "POST",
            "/generate",
            b"prompt=a+fox",
            headers=(("Content-Type", "application/x-www-form-urlencoded"),),
        )
        assert form.status == 415
        assert "application/json" in form.json()["error"]["message"]
        for raw in (b"{oops", b'{"seed": 1}', b"x" * (2 * 1024 * 1024)):
            response = await daemon.request("POST", "/generate", raw)
            assert 400 <= response.status < 500
            assert "message" in response.json()["error"]
        history = await daemon.request_comfy("GET", "/history")
        queue = await daemon.request_comfy("GET", "/queue")
        assert history.json() == {}
        assert queue.json() == {"queue_running": [], "queue_pending": []}


async def test_invalid_unicode_is_refused_at_the_door(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        for raw, field in (
            (b'{"prompt":"fox","description":"\\ud800"}', "description"),
            (b'{"prompt":"fox","description":"\xed\xa0\x80"}', "description"),
            (b'{"prompt":"fox","name":"\\ud800"}', "name"),
            (b'{"prompt":"\\ud800"}', "prompt"),
        ):
            response = await daemon.request("POST", "/generate", raw)
            assert response.status == 400, (raw, response.body)
            assert response.json()["error"]["details"]["field"] == field
        assert daemon.app.registry.created == 0


async def test_a_comfyui_that_makes_up_its_own_prompt_ids_ends_the_task_with_why(
    tmp_path: Path,
) -> None:
    # The daemon follows the prompt by the id it chose: under another one nothing of
    # it is ever heard, and the task was resubmitted as lost, again and again.
    old_comfyui = dataclasses.replace(FAST, prompt_ids=False)
    async with running_daemon(tmp_path, simulator=old_comfyui) as daemon:
        assert daemon.simulator is not None
        task_id = await daemon.generate()
        first_end_or_requeue = await read_events(
            daemon.url,
            task_id,
            stop_after=lambda e: e.event != "progress" or "requeued" in e.data,
        )
        last = json.loads(first_end_or_requeue[-1].data)
        assert last["status"] == "error", last
        assert last["error"]["code"] == "rejected"
        assert "prompt_id" in last["error"]["details"]
        assert daemon.simulator.engine.number == 1  # one POST /prompt
