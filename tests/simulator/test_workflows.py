"""Real workflows on the stock nodes: txt2img, inpainting, previews, validation errors."""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from daemon.simulator import SimulatorConfig
from daemon.simulator.png import encode_png
from protocol.imagesize import ImageInfo, image_info
from tests.simulator.conftest import Harness
from tests.simulator.helpers import Binary

StartSim = Callable[..., Awaitable[Harness]]
FEATURE_FLAGS = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}


def txt2img(
    *, seed: int = 42, steps: int = 4, width: int = 512, height: int = 512
) -> dict[str, Any]:
    """The default ComfyUI workflow, API format."""
    return {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": width, "height": height, "batch_size": 1},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 8.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"},
        },
    }


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_txt2img_ticks_per_sampler_step_and_saves_a_png(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        client = await h.connect("t2i")
        prompt_id = await h.submit(txt2img(steps=4), "t2i")
        await client.wait_for("executing", node=None, prompt_id=prompt_id)
        messages = client.messages()
        executing = [m["data"]["node"] for m in messages if m["type"] == "executing"]
        # ComfyUI's staging: depth-first from the output, the loader first (it feeds
        # the decoder that feeds SaveImage), then ready nodes in discovery order.
        assert executing == ["4", "5", "7", "6", "3", "8", "9", None]
        ticks = [
            (m["data"]["node"], m["data"]["value"], m["data"]["max"])
            for m in messages
            if m["type"] == "progress"
        ]
        assert ticks == [("3", i, 4) for i in range(1, 5)]
        executed = next(m["data"] for m in messages if m["type"] == "executed")
        image = executed["output"]["images"][0]
        assert image == {"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}

        view = await h.http("GET", "/view?filename=ComfyUI_00001_.png&subfolder=&type=output")
        assert view.status == 200
        assert view.headers["content-type"] == "image/png"
        assert png_size(view.body) == (512, 512)
        assert b"tEXtprompt" in view.body  # the graph is embedded, as ComfyUI does

        # Same graph again: fully cached, same file reported; a new seed draws anew.
        again = await h.submit(txt2img(steps=4), "t2i")
        start = len(client.frames)
        await client.wait_for("executing", node=None, prompt_id=again)
        tail = client.messages()[start:]
        cached = next(m["data"]["nodes"] for m in tail if m["type"] == "execution_cached")
        assert sorted(cached) == ["3", "4", "5", "6", "7", "8", "9"]
        assert not [m for m in tail if m["type"] == "progress"]
        new_seed = await h.submit(txt2img(seed=43, steps=4), "t2i")
        await client.wait_for("executing", node=None, prompt_id=new_seed)
        other = await h.http("GET", "/view?filename=ComfyUI_00002_.png")
        assert other.status == 200
        assert other.body != view.body


async def test_images_are_deterministic_across_simulators(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        bodies = []
        for _ in range(2):
            h = await start_sim(SimulatorConfig(step_time=0.0, seed=5))
            client = await h.connect("d")
            prompt_id = await h.submit(txt2img(width=64, height=96), "d")
            await client.wait_for("executing", node=None, prompt_id=prompt_id)
            bodies.append((await h.http("GET", "/view?filename=ComfyUI_00001_.png")).body)
        assert bodies[0] == bodies[1]
        assert png_size(bodies[0]) == (64, 96)


async def test_sampler_previews_follow_the_legacy_and_metadata_orders(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        config = SimulatorConfig(
            step_time=0.0, sampler_previews=True, preview_size=128, seed=2, preview_format="png"
        )
        h = await start_sim(config)
        legacy = await h.connect("legacy")
        prompt_id = await h.submit(txt2img(steps=2, width=256, height=128), "legacy")
        await legacy.wait_for("executing", node=None, prompt_id=prompt_id)
        types = legacy.types()
        first = types.index("progress")
        assert types[first - 1 : first + 2] == ["progress_state", "progress", "binary:1"]
        preview = next(Binary.parse(f) for f in legacy.frames if isinstance(f, bytes))
        assert preview.second_u32 == 2  # PNG
        assert png_size(preview.payload) == (128, 64)  # fitted into 128, aspect kept

        flagged = await h.connect("flagged")
        await flagged.ws.send_message(
            json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
        )
        await flagged.wait_for("feature_flags")
        prompt_id = await h.submit(txt2img(seed=9, steps=2), "flagged")
        await flagged.wait_for("executing", node=None, prompt_id=prompt_id)
        types = flagged.types()
        first = types.index("progress")
        assert types[first - 2 : first + 1] == ["progress_state", "binary:4", "progress"]
        assert "binary:1" not in types


async def test_sampler_previews_are_jpeg_by_default_with_their_type_in_the_metadata(
    start_sim: StartSim,
) -> None:
    with trio.fail_after(10):
        config = SimulatorConfig(
            step_time=0.0, sampler_previews=True, sampler_progress_text=True, seed=3
        )
        h = await start_sim(config)
        flagged = await h.connect("flagged")
        await flagged.ws.send_message(json.dumps(FEATURE_FLAGS))
        await flagged.wait_for("feature_flags")
        prompt_id = await h.submit(txt2img(steps=3, width=256, height=128), "flagged")
        await flagged.wait_for("executing", node=None, prompt_id=prompt_id)
        binaries = [Binary.parse(f) for f in flagged.frames if isinstance(f, bytes)]
        texts = [b.payload[b.second_u32 :].decode() for b in binaries if b.event_type == 3]
        assert texts == ["step 1/3", "step 2/3", "step 3/3"]
        previews = [b for b in binaries if b.event_type == 4]
        assert len(previews) == 3
        for preview in previews:
            metadata = json.loads(preview.payload[: preview.second_u32])
            assert metadata["image_type"] == "image/jpeg"
            assert metadata["prompt_id"] == prompt_id
            image = preview.payload[preview.second_u32 :]
            assert image_info(image) == ImageInfo("jpeg", 512, 256)  # fitted into 512
        # Each step shows the picture a step further on.
        assert len({p.payload for p in previews}) == 3


async def test_legacy_mode_ignores_the_feature_flag_and_sends_type_1_jpeg(
    start_sim: StartSim,
) -> None:
    with trio.fail_after(10):
        config = SimulatorConfig(
            step_time=0.0, sampler_previews=True, preview_metadata=False, seed=4
        )
        h = await start_sim(config)
        client = await h.connect("old")
        await client.ws.send_message(json.dumps(FEATURE_FLAGS))
        prompt_id = await h.submit(txt2img(steps=2, width=64, height=64), "old")
        await client.wait_for("executing", node=None, prompt_id=prompt_id)
        types = client.types()
        assert "feature_flags" not in types  # an old ComfyUI does not answer
        assert "binary:4" not in types
        previews = [Binary.parse(f) for f in client.frames if isinstance(f, bytes)]
        assert [(p.event_type, p.second_u32) for p in previews] == [(1, 1), (1, 1)]  # JPEG
        assert image_info(previews[0].payload) == ImageInfo("jpeg", 512, 512)


async def test_inpainting_with_an_uploaded_image(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()
        picture = encode_png(96, 64, [bytes((10, 200, 30)) * 96] * 64)
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="cat.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + picture
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = [("Content-Type", f"multipart/form-data; boundary={boundary}")]
        upload = await h.http("POST", "/upload/image", body=body, headers=headers)
        assert upload.json() == {"name": "cat.png", "subfolder": "", "type": "input"}
        info = (await h.http("GET", "/object_info/LoadImage")).json()
        assert info["LoadImage"]["input"]["required"]["image"][0] == ["cat.png"]

        graph = txt2img(steps=2)
        graph["10"] = {"class_type": "LoadImage", "inputs": {"image": "cat.png"}}
        graph["11"] = {
            "class_type": "SolidMask",
            "inputs": {"value": 1.0, "width": 96, "height": 64},
        }
        graph["12"] = {
            "class_type": "MaskComposite",
            "inputs": {
                "destination": ["10", 1],
                "source": ["11", 0],
                "x": 0,
                "y": 0,
                "operation": "add",
            },
        }
        graph["13"] = {
            "class_type": "VAEEncodeForInpaint",
            "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["12", 0], "grow_mask_by": 6},
        }
        graph["3"]["inputs"]["latent_image"] = ["13", 0]
        del graph["5"]
        graph["14"] = {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["8", 0],
                "upscale_method": "bilinear",
                "width": 48,
                "height": 0,
                "crop": "disabled",
            },
        }
        graph["9"]["inputs"]["images"] = ["14", 0]
        graph["9"]["inputs"]["filename_prefix"] = "inpaint/result"
        client = await h.connect("inpaint")
        prompt_id = await h.submit(graph, "inpaint")
        await client.wait_for("executing", node=None, prompt_id=prompt_id)
        entry = (await h.history(prompt_id))[prompt_id]
        assert entry["status"]["status_str"] == "success"
        image = entry["outputs"]["9"]["images"][0]
        assert image == {"filename": "result_00001_.png", "subfolder": "inpaint", "type": "output"}
        view = await h.http("GET", "/view?filename=result_00001_.png&subfolder=inpaint")
        assert png_size(view.body) == (48, 32)  # width 48, height from the aspect ratio


async def test_stock_node_validation_errors(start_sim: StartSim) -> None:
    with trio.fail_after(10):
        h = await start_sim()

        async def errors_of(graph: dict[str, Any]) -> dict[str, Any]:
            reply = await h.http("POST", "/prompt", json_body={"prompt": graph})
            assert reply.status == 400
            body = reply.json()
            assert body["error"]["type"] == "prompt_outputs_failed_validation"
            node_errors: dict[str, Any] = body["node_errors"]
            return node_errors

        graph = txt2img()
        graph["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
        error = (await errors_of(graph))["4"]["errors"][0]
        assert error["type"] == "value_not_in_list"
        assert error["details"].startswith("ckpt_name: 'nope.safetensors' not in [")

        graph = txt2img()
        graph["3"]["inputs"]["sampler_name"] = "magic"
        error = (await errors_of(graph))["3"]["errors"][0]
        assert error["details"].startswith("sampler_name: 'magic' not in (list of length ")
        assert error["extra_info"]["input_config"] is None  # long lists are not echoed

        graph = txt2img(width=8, height=99999)
        errors = (await errors_of(graph))["5"]["errors"]
        assert [e["type"] for e in errors] == ["value_smaller_than_min", "value_bigger_than_max"]
        assert errors[0]["message"] == "Value 8 smaller than min of 16"

        graph = txt2img()
        graph["8"]["inputs"]["samples"] = ["4", 0]  # MODEL into a LATENT input
        error = (await errors_of(graph))["8"]["errors"][0]
        assert error["type"] == "return_type_mismatch"
        assert error["details"] == "samples, received_type(MODEL) mismatch input_type(LATENT)"

        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        node_errors = await errors_of(graph)
        error = node_errors["1"]["errors"][0]
        assert error["type"] == "custom_validation_failed"
        assert error["details"] == "image - Invalid image file: missing.png"
        assert node_errors["1"]["dependent_outputs"] == ["2"]

        graph = txt2img()
        graph["3"]["inputs"]["cfg"] = "8.5"  # converted, and stored converted
        prompt_id = (await h.http("POST", "/prompt", json_body={"prompt": graph})).json()[
            "prompt_id"
        ]
        queue = (await h.http("GET", "/queue")).json()
        items = queue["queue_running"] + queue["queue_pending"]
        item = next(i for i in items if i[1] == prompt_id)
        assert item[2]["3"]["inputs"]["cfg"] == 8.5
