"""HTTP behaviour beyond the transcripts: routing, /api, queue and history edges, files."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest
import trio

from daemon.simulator import SimulatorConfig
from tests.simulator.conftest import Harness, probe_graph

StartSim = Callable[..., Awaitable[Harness]]
MANUAL = SimulatorConfig(manual_steps=True, seed=4)


def multipart(fields: dict[str, str | tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, str]]]:
    boundary = "xYzBoundary"
    body = b""
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = f'form-data; name="{name}"; filename="{filename}"'
            body += f"--{boundary}\r\nContent-Disposition: {head}\r\n\r\n".encode() + data + b"\r\n"
        else:
            head = f'form-data; name="{name}"'
            body += f"--{boundary}\r\nContent-Disposition: {head}\r\n\r\n{value}\r\n".encode()
    body += f"--{boundary}--\r\n".encode()
    return body, [("Content-Type", f"multipart/form-data; boundary={boundary}")]


async def test_routing_404_405_head_options(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        missing = await h.http("GET", "/nope")
        assert (missing.status, missing.body) == (404, b"404: Not Found")
        wrong = await h.http("DELETE", "/queue")
        assert wrong.status == 405
        assert set(wrong.headers["allow"].split(",")) == {"GET", "HEAD", "POST"}
        head = await h.http("HEAD", "/api/queue")
        assert head.status == 200
        assert head.body == b""
        assert (await h.http("OPTIONS", "/prompt")).status == 200
        not_ws = await h.http("GET", "/ws")
        assert not_ws.status == 400


async def test_every_route_answers_under_api(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        client = await h.connect("api", path="/api/ws")
        assert client.messages()[0]["data"]["sid"] == "api"
        prompt_id = await h.submit(probe_graph(steps=1), "api")
        await client.wait_for("executing", node=None, prompt_id=prompt_id)
        for path in (
            "/api/prompt",
            "/api/queue",
            "/api/history",
            f"/api/history/{prompt_id}",
            "/api/view?filename=probe_00001_.png",
            "/api/system_stats",
            "/api/object_info",
            "/api/object_info/KSampler",
            "/api/features",
        ):
            assert (await h.http("GET", path)).status == 200, path
        assert (await h.http("GET", "/api")).status == 404
        assert (await h.http("GET", "/api/sim/state")).status == 404  # control is not mounted twice


async def test_origin_check_only_for_loopback_hosts(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        port = h.port

        async def status(host: str, origin: str) -> int:
            reply = await h.http("GET", "/prompt", headers=[("Host", host), ("Origin", origin)])
            return reply.status

        assert await status(f"127.0.0.1:{port}", f"http://127.0.0.1:{port}") == 200
        assert await status(f"127.0.0.1:{port}", f"http://localhost:{port}") == 403
        assert await status(f"127.0.0.1:{port}", "http://127.0.0.1:9999") == 403
        assert await status(f"localhost:{port}", "http://localhost") == 200  # no port: names only
        assert await status("comfy.example:80", "http://evil.example") == 200  # not loopback
        assert (
            await h.http("GET", "/sim/state", headers=[("Origin", "http://evil")])
        ).status == 200


async def test_queue_order_number_front_delete_and_clear(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(MANUAL)
        client = await h.connect("q")
        running = await h.submit(probe_graph(steps=2, color=1), "q")
        await client.wait_for("executing", node="2")
        a = await h.submit(probe_graph(color=2), "q")
        b = await h.submit(probe_graph(color=3), "q", front=True)
        c = await h.submit(probe_graph(color=4), "q", number=0.5)
        reply = await h.http(
            "POST", "/prompt", json_body={"prompt": probe_graph(color=5), "number": "x"}
        )
        assert reply.status == 500
        queue = (await h.http("GET", "/queue")).json()
        assert [item[1] for item in queue["queue_running"]] == [running]
        numbers = {item[1]: item[0] for item in queue["queue_pending"]}
        assert numbers == {a: 1, b: -2, c: 0.5}

        # Deleting the running prompt does nothing; deleting a pending one announces it.
        await h.http("POST", "/queue", json_body={"delete": [running]})
        await h.settle()
        count = len(client.frames)
        await h.http("POST", "/queue", json_body={"delete": [a]})
        await h.settle()
        assert client.types()[count:] == ["status"]
        assert client.messages()[-1]["data"]["status"]["exec_info"]["queue_remaining"] == 3
        # ComfyUI announces twice when the last pending prompt goes (wipe, then delete).
        await h.http("POST", "/queue", json_body={"delete": [b]})
        await h.http("POST", "/queue", json_body={"delete": [c]})
        await h.settle()
        assert client.types()[-3:] == ["status", "status", "status"]
        await h.http("POST", "/queue", json_body={"clear": True})
        await h.settle()
        assert client.messages()[-1]["data"]["status"]["exec_info"]["queue_remaining"] == 1
        await h.finish(running)
        for prompt_id in (a, b, c):
            assert await h.history(prompt_id) == {}
        malformed = await h.http("POST", "/queue", body=b"{")
        assert malformed.status == 500


async def test_front_runs_first(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(MANUAL)
        client = await h.connect("f")
        first = await h.submit(probe_graph(steps=1, color=1), "f")
        await client.wait_for("executing", node="2")
        normal = await h.submit(probe_graph(steps=1, color=2), "f")
        urgent = await h.submit(probe_graph(steps=1, color=3), "f", front=True)
        await h.finish(normal)
        starts = [
            m["data"]["prompt_id"] for m in client.messages() if m["type"] == "execution_start"
        ]
        assert starts == [first, urgent, normal]


async def test_interrupt_variants(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(MANUAL)
        client = await h.connect("i")
        # Idle interrupt is harmless: the flag is reset when the next prompt starts.
        assert (await h.http("POST", "/interrupt")).status == 200
        prompt_id = await h.submit(probe_graph(steps=3), "i")
        await h.steps_until(lambda: h.sim.running_progress().get("2", {}).get("value") == 1)
        await h.http("POST", "/interrupt", json_body={"prompt_id": "someone-else"})
        await h.steps_until(lambda: h.sim.running_progress().get("2", {}).get("value") == 2)
        await h.http("POST", "/interrupt", body=b"not json")  # a global interrupt
        await h.finish(prompt_id)
        await client.wait_for("executing", node=None, prompt_id=prompt_id)
        messages = client.messages()
        end = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
        assert (end["node_id"], end["node_type"], end["executed"]) == ("2", "SlowProgress", ["1"])
        assert [m["data"]["value"] for m in messages if m["type"] == "progress"] == [1, 2]
        # A node that never ticks notices the flag at the next node boundary.
        second = await h.submit(probe_graph(steps=1, color=8), "i")
        await h.steps_until(lambda: h.sim.waiting_for_step)
        await h.http("POST", "/interrupt", json_body={})
        await h.finish(second)
        end = client.messages()[-3]["data"]
        assert end["node_id"] == "2"
        assert (await h.http("POST", "/interrupt", body=b"[1]")).status == 500


async def test_history_list_offset_delete_clear(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(SimulatorConfig(step_time=0.0, seed=4))
        client = await h.connect("h")
        ids = []
        for color in range(4):
            ids.append(await h.submit(probe_graph(steps=1, color=color), "h"))
        await client.wait_for("executing", node=None, prompt_id=ids[-1])
        assert list((await h.http("GET", "/history")).json()) == ids
        assert list((await h.http("GET", "/history?max_items=2")).json()) == ids[2:]
        assert list((await h.http("GET", "/history?offset=1&max_items=2")).json()) == ids[1:3]
        assert (await h.http("GET", "/history?max_items=x")).status == 500
        await h.http("POST", "/history", json_body={"delete": [ids[0], "unknown"]})
        assert list((await h.http("GET", "/history")).json()) == ids[1:]
        await h.http("POST", "/history", json_body={"clear": True})
        assert (await h.http("GET", "/history")).json() == {}
        assert (await h.http("GET", "/history/never-seen")).json() == {}


async def test_prompt_options(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim(SimulatorConfig(step_time=0.0, seed=4))
        client = await h.connect("o")
        graph = probe_graph(steps=1)
        graph["4"] = {
            "class_type": "SaveImage",
            "inputs": {"images": ["1", 0], "filename_prefix": "x"},
        }
        body = {
            "prompt": graph,
            "client_id": "o",
            "prompt_id": "mine-1",
            "partial_execution_targets": ["4"],
            "extra_data": {"api_key_comfy_org": "secret", "extra_pnginfo": {"w": 1}},
        }
        reply = await h.http("POST", "/prompt", json_body=body)
        assert reply.json() == {"prompt_id": "mine-1", "number": 0, "node_errors": {}}
        await client.wait_for("executing", node=None, prompt_id="mine-1")
        entry = (await h.history("mine-1"))["mine-1"]
        assert entry["prompt"][3] == {"extra_pnginfo": {"w": 1}, "client_id": "o"}  # no secret
        assert entry["prompt"][4] == ["4"]
        assert list(entry["outputs"]) == ["4"]
        executing = [m["data"]["node"] for m in client.messages() if m["type"] == "executing"]
        assert executing == ["1", "4", None]  # only what node 4 needs ran

        # One valid and one broken output: accepted, with the broken one's node_errors.
        graph = probe_graph(steps=1, color=3)
        graph["4"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
        reply = await h.http("POST", "/prompt", json_body={"prompt": graph})
        assert reply.status == 200
        assert reply.json()["node_errors"]["4"]["errors"][0]["type"] == "required_input_missing"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"[]", 400),  # counted, then no_prompt
        (b'"hello"', 400),
        (b"42", 500),
        (b'{"prompt": [1]}', 500),
        (b'{"prompt": []}', 400),
        (b'{"prompt": {"1": "EmptyImage"}}', 400),  # a node that is a string
        (b'{"prompt": {"1": {"class_type": ["x"]}}}', 500),
        (b'{"prompt": {"1": {"class_type": "SaveImage"}}}', 400),  # no inputs
        (b"\xff\xfe", 500),
    ],
)
async def test_odd_prompt_bodies(start_sim: StartSim, body: bytes, status: int) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        reply = await h.http("POST", "/prompt", body=body)
        assert reply.status == status, reply.body
        if status == 500:
            assert reply.body == b"500 Internal Server Error\n\nServer got itself in trouble"


async def test_validation_of_cycles_and_bad_links(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        graph = probe_graph()
        graph["1"] = {
            "class_type": "SlowProgress",
            "inputs": {"image": ["2", 0], "steps": 1, "delay": 0},
        }
        reply = await h.http("POST", "/prompt", json_body={"prompt": graph})
        assert reply.status == 400
        assert reply.json()["error"]["type"] == "prompt_outputs_failed_validation"

        graph = probe_graph()
        graph["2"]["inputs"]["image"] = ["1", 0, 0]
        error = (await h.http("POST", "/prompt", json_body={"prompt": graph})).json()
        assert error["node_errors"]["2"]["errors"][0]["type"] == "bad_linked_input"

        graph = probe_graph()
        graph["3"]["inputs"]["images"] = ["99", 0]  # the output node itself links nowhere
        error = (await h.http("POST", "/prompt", json_body={"prompt": graph})).json()
        reason = error["node_errors"]["3"]["errors"][0]
        assert reason["type"] == "exception_during_validation"
        assert error["error"]["details"] == "Exception when validating node: '99'"


async def test_view_and_upload_edges(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        data = os.urandom(3000) + b"\r\n--xYzBound\r\n\r\n" + os.urandom(100) + b"\r\n"
        body, headers = multipart({"image": ("blob.png", data), "subfolder": "a/b", "type": "temp"})
        reply = await h.http("POST", "/upload/image", body=body, headers=headers)
        assert reply.json() == {"name": "blob.png", "subfolder": "a/b", "type": "temp"}
        view = await h.http("GET", "/view?filename=blob.png&subfolder=a/b&type=temp")
        assert view.body == data  # binary content survives the multipart round trip
        annotated = await h.http("GET", "/view?filename=blob.png%20[temp]&subfolder=a/b")
        assert annotated.status == 200  # "name [temp]" picks the folder over type=
        dropped = await h.http("GET", "/view?filename=a/b/blob.png%20[temp]")
        assert dropped.status == 404  # a path in filename is reduced to its basename
        assert (
            await h.http("GET", "/view?filename=blob.png&subfolder=../x&type=temp")
        ).status == 403
        assert (await h.http("GET", "/view?filename=/etc/passwd")).status == 400
        assert (await h.http("GET", "/view")).status == 404

        # Same name, different bytes: numbered; identical bytes: reuse that number.
        for expected in ("blob (1).png", "blob (1).png"):
            body, headers = multipart(
                {"image": ("blob.png", b"other"), "subfolder": "a/b", "type": "temp"}
            )
            assert (await h.http("POST", "/upload/image", body=body, headers=headers)).json()[
                "name"
            ] == expected
        body, headers = multipart({"image": ("x.png", b"1"), "type": "bogus"})
        assert (await h.http("POST", "/upload/image", body=body, headers=headers)).status == 500
        body, headers = multipart({"image": ("../x.png", b"1")})
        assert (await h.http("POST", "/upload/image", body=body, headers=headers)).status == 400
        body, headers = multipart({"image": ("", b"1")})
        assert (await h.http("POST", "/upload/image", body=body, headers=headers)).status == 400
        body, headers = multipart({"image": "just text"})
        assert (await h.http("POST", "/upload/image", body=body, headers=headers)).status == 500
        assert (await h.http("POST", "/upload/image", json_body={"image": 1})).status == 400


async def test_object_info_lists_every_node(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        info = (await h.http("GET", "/object_info")).json()
        assert set(info) >= {
            "EmptyImage", "SlowProgress", "FailingNode", "PreviewProgress", "SaveImage",
            "PreviewImage", "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage",
            "KSampler", "VAEDecode", "VAEEncode", "VAEEncodeForInpaint", "LoadImage",
            "SolidMask", "MaskComposite", "ImageScale",
        }  # fmt: skip
        sampler = info["KSampler"]
        assert sampler["input_order"]["required"] == [
            "model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
            "negative", "latent_image", "denoise",
        ]  # fmt: skip
        assert info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP", "VAE"]
        assert info["LoadImage"]["output_name"] == ["IMAGE", "MASK"]
        assert info["SaveImage"]["output_node"] is True


async def test_expect_100_continue_and_keep_alive(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        stream = await trio.open_tcp_stream("127.0.0.1", h.port)
        async with stream:
            body = b'{"prompt": {}}'
            head = (
                f"POST /prompt HTTP/1.1\r\nHost: 127.0.0.1:{h.port}\r\n"
                f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
            )
            await stream.send_all(head.encode())
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(4096)
            assert received.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(
                body + f"GET /prompt HTTP/1.1\r\nHost: x:{h.port}\r\n\r\n".encode()
            )
            while received.count(b"HTTP/1.1 ") < 3 or not received.endswith(b"}}"):
                received += await stream.receive_some(4096)
        assert b"HTTP/1.1 400 " in received  # prompt_no_outputs
        assert received.endswith(b'{"exec_info": {"queue_remaining": 0}}')  # same connection
