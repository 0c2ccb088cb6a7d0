"""Workflows end to end: the daemon binds requests, the simulator runs what it receives.

The graph ComfyUI received is read back from the simulator's /history entry
(`prompt[2]`), so each test checks the parameters landed where they belong in
a graph the simulator accepted and ran.
"""

from __future__ import annotations

import json
import struct
import urllib.parse
from pathlib import Path
from typing import Any

import trio

from daemon.http.client import ClientResponse, http_request
from daemon.simulator.png import encode_png
from tests.daemon.harness import Daemon, payloads, running_daemon
from tests.protocol.workflow_samples import txt2img_definition

PARAMETERS = {"negativePrompt", "width", "height", "steps", "cfg", "sampler", "scheduler"}


async def upload(daemon: Daemon, body: bytes, content_type: str = "image/png") -> ClientResponse:
    return await http_request(
        "POST",
        daemon.url + "/upload",
        headers=[("Content-Type", content_type)],
        body=body,
        timeout=10,
    )


async def comfy(daemon: Daemon, path: str) -> ClientResponse:
    """GET from the simulator, directly."""
    return await http_request("GET", daemon.bound.comfy_url + path, timeout=10)


async def submitted_graph(daemon: Daemon, task_id: str) -> dict[str, Any]:
    """The graph the simulator received for a task (its /history entry's prompt[2])."""
    actor = daemon.app.registry.get(task_id)
    assert actor is not None
    history = (await comfy(daemon, f"/history/{actor.prompt_id}")).json()
    entry = history[actor.prompt_id]
    assert entry["status"]["status_str"] == "success"
    graph: dict[str, Any] = entry["prompt"][2]
    return graph


async def finish(daemon: Daemon, task_id: str) -> dict[str, Any]:
    """The task's last event, which must be `complete`; returns its result."""
    data = payloads(await daemon.events(task_id))
    assert data[-1]["status"] == "completed", data[-1]
    result: dict[str, Any] = data[-1]["result"]
    return result


async def comfy_inputs(daemon: Daemon) -> list[str]:
    """The files in ComfyUI's input folder (LoadImage's choices)."""
    info = (await comfy(daemon, "/object_info/LoadImage")).json()
    names: list[str] = info["LoadImage"]["input"]["required"]["image"][0]
    return names


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_get_workflows_lists_the_shipped_ones_with_their_parameters(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        response = await daemon.request("GET", "/workflows")
        assert response.status == 200
        listed = {w["name"]: w for w in response.json()["workflows"]}
        assert set(listed) == {"txt2img", "inpaint"}
        txt2img = {p["name"]: p for p in listed["txt2img"]["parameters"]}
        assert PARAMETERS | {"prompt", "seed", "checkpoint"} <= set(txt2img)
        assert txt2img["width"] == {
            "name": "width",
            "type": "integer",
            "required": False,
            "default": 512,
            "min": 64,
            "max": 2048,
            "multipleOf": 8,
            "description": "image width in pixels",
        }
        assert txt2img["checkpoint"]["default"] == daemon.app.config.default_checkpoint
        inpaint = {p["name"]: p for p in listed["inpaint"]["parameters"]}
        assert listed["inpaint"]["inpaint"] is True
        assert listed["txt2img"]["inpaint"] is False
        assert inpaint["image"]["required"]
        assert inpaint["inpaintArea"]["required"]
        assert "width" not in inpaint  # the source image decides the size


async def test_txt2img_binds_every_parameter(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, default_checkpoint="sd_xl_base_1.0.safetensors") as daemon:
        task_id = await daemon.generate(
            prompt="a red fox",
            negativePrompt="blurry",
            seed=123456789,
            width=192,
            height=128,
            steps=3,
            cfg=4.5,
            sampler="dpmpp_2m",
            scheduler="karras",
            name="Fox",
            description="A fox in the snow",
        )
        result = await finish(daemon, task_id)
        graph = await submitted_graph(daemon, task_id)
        assert graph["6"]["inputs"]["text"] == "a red fox"
        assert graph["7"]["inputs"]["text"] == "blurry"
        assert graph["5"]["inputs"] == {"width": 192, "height": 128, "batch_size": 1}
        sampler = graph["3"]["inputs"]
        assert sampler["seed"] == 123456789
        assert (sampler["steps"], sampler["cfg"]) == (3, 4.5)
        assert (sampler["sampler_name"], sampler["scheduler"]) == ("dpmpp_2m", "karras")
        assert graph["4"]["inputs"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"

        assert result["imageUrl"] == result["imageUrls"][0]
        assert len(result["imageUrls"]) == 1
        expected = {
            "prompt": "a red fox",
            "seed": 123456789,
            "name": "Fox",
            "description": "A fox in the snow",
            "workflow": "txt2img",
            "inpaint": False,
            "inpaintArea": None,
        }
        assert expected.items() <= result.items()
        assert isinstance(result["uid"], int)
        assert result["uid"] > 1_600_000_000_000  # creation time in ms
        image = await daemon.request("GET", result["imageUrl"])
        assert png_size(image.body) == (192, 128)


async def test_a_seed_left_out_is_drawn_and_reported(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        task_id = await daemon.generate(steps=1)
        result = await finish(daemon, task_id)
        graph = await submitted_graph(daemon, task_id)
        assert isinstance(result["seed"], int)
        assert graph["3"]["inputs"]["seed"] == result["seed"]
        assert graph["3"]["inputs"]["steps"] == 1
        assert graph["5"]["inputs"]["width"] == 512  # the default


async def test_inpainting_a_generated_image(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        first = await finish(daemon, await daemon.generate(width=256, height=192, steps=2))
        source = (await daemon.request("GET", first["imageUrl"])).body
        area = {"x": 64, "y": 32, "width": 128, "height": 96}
        response = await daemon.request(
            "POST",
            "/generate",
            {
                "prompt": "a hat",
                "inpaint": True,
                "image": first["imageUrl"],
                "inpaintArea": area,
                "seed": 5,
                "steps": 2,
                "name": "Fox",
                "description": "the fox, with a hat",
            },
        )
        assert response.status == 202, response.body
        task_id = response.json()["taskId"]
        result = await finish(daemon, task_id)
        assert result["inpaint"] is True
        assert result["inpaintArea"] == area
        assert result["workflow"] == "inpaint"
        assert (result["seed"], result["prompt"], result["name"]) == (5, "a hat", "Fox")
        assert result["description"] == "the fox, with a hat"
        assert result["imageUrl"] != first["imageUrl"]

        graph = await submitted_graph(daemon, task_id)
        stored_name = first["imageUrl"].rsplit("/", 1)[1]
        assert graph["4"] == {"class_type": "LoadImage", "inputs": {"image": stored_name}}
        assert graph["5"]["inputs"] == {"value": 0.0, "width": 256, "height": 192}
        assert graph["6"]["inputs"] == {"value": 1.0, "width": 128, "height": 96}
        assert (graph["7"]["inputs"]["x"], graph["7"]["inputs"]["y"]) == (64, 32)
        assert graph["8"]["inputs"]["mask"] == ["7", 0]
        assert graph["9"]["inputs"]["seed"] == 5
        assert graph["9"]["inputs"]["latent_image"] == ["8", 0]
        # ComfyUI got the very bytes the daemon served as the source.
        query = urllib.parse.urlencode({"filename": stored_name, "type": "input"})
        assert (await comfy(daemon, f"/view?{query}")).body == source
        inpainted = await daemon.request("GET", result["imageUrl"])
        assert png_size(inpainted.body) == (256, 192)


async def test_upload_then_inpaint_it(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        picture = encode_png(96, 64, [bytes((10, 200, 30)) * 96] * 64)
        response = await upload(daemon, picture)
        assert response.status == 201, response.body
        reply = response.json()
        assert (reply["width"], reply["height"], reply["contentType"]) == (96, 64, "image/png")
        assert response.headers.get("location") == reply["imageUrl"]
        served = await daemon.request("GET", reply["imageUrl"])
        assert served.body == picture
        name = reply["imageUrl"].rsplit("/", 1)[1]
        assert await comfy_inputs(daemon) == []  # kept here until a task needs it

        # An absolute URL works too: it is what a browser's img.src holds.
        area = {"x": 0, "y": 0, "width": 96, "height": 64}
        task_id = await daemon.generate(
            workflow="inpaint", image=daemon.url + reply["imageUrl"], inpaintArea=area, steps=1
        )
        result = await finish(daemon, task_id)
        assert (result["inpaint"], result["inpaintArea"]) == (True, area)
        graph = await submitted_graph(daemon, task_id)
        assert graph["4"]["inputs"]["image"] == name
        assert graph["5"]["inputs"]["width"] == 96
        assert await comfy_inputs(daemon) == [name]  # sent by the task, to its backend


async def test_uploads_that_are_refused(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, max_upload_bytes=4096) as daemon:
        small = encode_png(8, 8, [bytes(3 * 8)] * 8)
        cases = [
            (await upload(daemon, small, "image/gif"), 415, "Content-Type must be"),
            (await upload(daemon, small, "application/octet-stream"), 415, "Content-Type"),
            (await upload(daemon, b"not a picture"), 400, "not a readable image"),
            (await upload(daemon, small, "image/jpeg"), 400, "is a PNG image"),
            (await upload(daemon, b""), 400, "the body is empty"),
            (await upload(daemon, small + b"\0" * 5000), 413, ""),
        ]
        for response, status, text in cases:
            assert response.status == status, (status, response.body)
            if text:
                assert text in response.json()["error"]["message"]
        assert await comfy_inputs(daemon) == []
        assert list((tmp_path / "data" / "images").iterdir()) == []


async def test_upload_and_inpaint_are_accepted_while_comfyui_is_down(tmp_path: Path) -> None:
    # Nothing listens on this port (we bind and close it to find a free one).
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    comfy_url = f"http://127.0.0.1:{port}"
    async with running_daemon(tmp_path, simulator=None, comfy_url=comfy_url) as daemon:
        response = await upload(daemon, encode_png(8, 8, [bytes(3 * 8)] * 8))
        assert response.status == 201, response.body
        area = {"x": 0, "y": 0, "width": 8, "height": 8}
        task_id = await daemon.generate(
            workflow="inpaint", image=response.json()["imageUrl"], inpaintArea=area
        )
        status = await daemon.request("GET", f"/tasks/{task_id}")
        assert status.json()["status"] == "in-progress"


async def test_invalid_requests_never_reach_comfyui(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        picture = encode_png(96, 64, [bytes(3 * 96)] * 64)
        # Stored by the daemon only, so ComfyUI has not seen it (an upload would forward it).
        name = await daemon.app.images.save(picture)
        url = f"/image/{name}"
        webp = await daemon.app.images.save(b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(8))
        inside = {"x": 0, "y": 0, "width": 8, "height": 8}
        cases: list[tuple[dict[str, Any], int, str, dict[str, Any]]] = [
            ({"width": 100}, 400, "width: must be a multiple of 8", {"multipleOf": 8}),
            ({"width": 4096}, 400, "width: must be at most 2048", {"max": 2048}),
            ({"steps": 0}, 400, "steps: must be at least 1", {"min": 1}),
            ({"cfg": 99}, 400, "cfg: must be at most 30", {"max": 30}),
            # Too large for a float: math.isfinite raised OverflowError (a 500).
            ({"cfg": 10**400}, 400, "cfg: must be at most 30", {"max": 30}),
            ({"cfg": -(10**400)}, 400, "cfg: must be at least 0", {"min": 0}),
            ({"sampler": "magic"}, 400, "sampler: must be one of euler", {}),
            ({"checkpoint": "../x"}, 400, "checkpoint: must be a checkpoint file name", {}),
            ({"workflow": "img2vid"}, 404, "unknown workflow 'img2vid'", {}),
            ({"inpaint": True, "width": 512}, 400, "width: is not a parameter of workflow", {}),
            ({"inpaint": True, "image": url}, 400, "inpaintArea: is required", {}),
            ({"workflow": "txt2img", "inpaint": True}, 400, "inpaint: workflow 'txt2img'", {}),
            (
                {"inpaint": True, "image": url, "inpaintArea": {**inside, "x": 90}},
                400,
                "inpaintArea: must lie inside the 96x64 source image (x + width = 98 > 96)",
                {"imageWidth": 96, "imageHeight": 64},
            ),
            (
                {
                    "inpaint": True,
                    "image": "/image/nothing_here_0123456.png",
                    "inpaintArea": inside,
                },
                400,
                "image: there is no image /image/nothing_here_0123456.png on this daemon",
                {},
            ),
            (
                {"inpaint": True, "image": f"/image/{webp}", "inpaintArea": inside},
                400,
                f"image: /image/{webp} cannot be a source: not a PNG or JPEG image",
                {},
            ),
            (
                {"inpaint": True, "image": "/view?filename=x.png", "inpaintArea": inside},
                400,
                "image: must be the URL of an image from this daemon",
                {},
            ),
        ]
        for fields, status, message, details in cases:
            response = await daemon.request("POST", "/generate", {"prompt": "x", **fields})
            assert response.status == status, (fields, response.body)
            error = response.json()["error"]
            assert error["message"].startswith(message), (fields, error)
            assert details.items() <= error["details"].items(), (fields, error)
        unknown = await daemon.request("POST", "/generate", {"prompt": "x", "workflow": "nope"})
        assert unknown.json()["error"]["details"]["known"] == ["inpaint", "txt2img"]
        assert daemon.app.registry.created == 0
        assert (await comfy(daemon, "/history")).json() == {}
        assert (await comfy(daemon, "/queue")).json() == {"queue_running": [], "queue_pending": []}
        assert await comfy_inputs(daemon) == []


async def test_a_workflow_that_saves_several_images(tmp_path: Path) -> None:
    definition = txt2img_definition()
    graph = definition["graph"]
    graph["5"]["inputs"]["batch_size"] = 2  # one SaveImage, two images...
    graph["10"] = {  # ...and a second SaveImage
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "second", "images": ["8", 0]},
    }
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    del definition["parameters"]["tiled"]
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "several.json").write_text(json.dumps(definition), encoding="utf-8")
    async with running_daemon(tmp_path, workflows_dir=str(workflows)) as daemon:
        listed = (await daemon.request("GET", "/workflows")).json()["workflows"]
        assert [w["name"] for w in listed] == ["inpaint", "several", "txt2img"]
        task_id = await daemon.generate(workflow="several", width=64, seed=11)
        result = await finish(daemon, task_id)
        urls = result["imageUrls"]
        assert len(urls) == 4  # 2 images from each SaveImage
        assert result["imageUrl"] == urls[0]
        assert len(set(urls)) == 4
        bodies = [(await daemon.request("GET", url)).body for url in urls]
        assert all(png_size(body) == (64, 512) for body in bodies)
        assert result["workflow"] == "several"
